"""Optimizers: `weight_decay` is the same decoupled rule, p <- p - lr(t) * wd * p off norms
and biases, whichever optimizer the command line picks; every registered optimizer builds
from every shipped recipe and trains the lab model."""

import functools
import glob
import importlib.util
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from coach_jax import config as config_module
from coach_jax import models, train
from coach_jax.train import optimizers, param_groups
from coach_jax.train.loss import LossConfig, batch_sums

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Shaped like the model's parameters (layers stacked, norm scales, a bias, an embedding and
# an LM head), with few distinct shapes: the tests run eagerly and each new shape compiles.
SHAPES = {"embed_tokens": (16, 8), "lm_head": (8, 16), "norm": {"scale": (8,)},
          "layers": {"input_layernorm": {"scale": (2, 8)},
                     "self_attn": {"q_proj": {"kernel": (2, 8, 8), "bias": (2, 8)}},
                     "mlp": {"up_proj": {"kernel": (2, 8, 16)},
                             "down_proj": {"kernel": (2, 16, 8)}}}}
NUM_LAYERS = 2
WD = 0.1
STEPS = 5
WARMUP_LINEAR = train.ScheduleConfig("warmup_linear", warmup_steps=2)
# Native decay is tested against the optax factories in test_train_step; these chain ours.
CHAINED = ["sgd", "adam", "adafactor", "muon", "adopt"]


@functools.cache
def tiny_params():
    rng = np.random.default_rng(0)
    return jax.tree.map(lambda shape: jnp.asarray(rng.normal(1.0, 0.5, shape), jnp.float32),
                        SHAPES, is_leaf=lambda x: isinstance(x, tuple))


def gradients(params, seed):
    """Fixed pseudo-gradients, made on the host (no compilation)."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda x: jnp.asarray(rng.normal(0, 0.1, x.shape), x.dtype), params)


def trajectory(tx, params, steps=STEPS):
    """The parameters after each of `steps` updates with fixed per-step gradients; run
    eagerly: the tests share the compiled operations, which is cheaper than compiling
    each optimizer."""
    state, out, p = tx.init(params), [], params
    for i in range(steps):
        updates, state = tx.update(gradients(params, i), state, p)
        p = optax.apply_updates(p, updates)
        out.append(p)
    return out


def ours(name, hparams, *, schedule=WARMUP_LINEAR, groups=train.ParamGroups(),
         decay_norms_and_biases=False, lr=1e-2):
    params = tiny_params()
    labels = param_groups.labels(params, groups, NUM_LAYERS)
    config = train.OptimizerConfig(name, lr, hparams=hparams, grad_clip_norm=None,
                                   schedule=schedule,
                                   decay_norms_and_biases=decay_norms_and_biases)
    return train.make_optimizer(config, labels, total_steps=STEPS + 1)


def assert_trees_close(a, b, rtol=1e-6, atol=1e-7):
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=rtol, atol=atol), a, b)


def is_decayed(path):
    return path.rsplit("/", 1)[-1] not in ("scale", "bias")


def leaf_at(tree, key_path):
    for key in key_path:
        tree = tree[key.key]
    return tree


# ---- the rule ----------------------------------------------------------------------------


def test_adam_with_weight_decay_equals_adamw():
    """The chained decay reproduces AdamW: scheduled lr (warmup included), group
    multiplier, mask, clipping."""
    params = tiny_params()
    groups = train.ParamGroups(rules=(("lm_head|embed_tokens", 0.5),))
    labels = param_groups.labels(params, groups, NUM_LAYERS)
    config = train.OptimizerConfig("adam", 1e-2, hparams={"weight_decay": WD},
                                   schedule=WARMUP_LINEAR)
    tx, schedule = train.make_optimizer(config, labels, total_steps=STEPS + 1)
    mask = jax.tree_util.tree_map_with_path(
        lambda p, _: is_decayed(models.decoder.path_str(p)), params)
    reference = optax.chain(optax.clip_by_global_norm(1.0), optax.multi_transform(
        {g: optax.adamw(lambda s, m=param_groups.multiplier(g): schedule(s) * m,
                        weight_decay=WD, mask=mask) for g in ("lr_x1", "lr_x0.5")}, labels))
    got, want = trajectory(tx, params), trajectory(reference, params)
    assert_trees_close(got, want)
    assert not np.allclose(got[-1]["lm_head"], params["lm_head"])


def test_sgd_decay_is_lr_times_wd_times_p_outside_the_momentum():
    """By hand: trace = g + m * trace; p <- p - lr(t) * trace - lr(t) * wd * p. The decay
    never enters the momentum (it is not L2) and skips norms and biases."""
    lr, momentum = 0.5, 0.9
    lrs = [0.0, 0.5 * lr, lr, 0.75 * lr, 0.5 * lr]  # warmup 2, then linear to 0 over 4
    tx, schedule = ours("sgd", {"weight_decay": WD, "momentum": momentum}, lr=lr)
    np.testing.assert_allclose([schedule(t) for t in range(STEPS)], lrs, rtol=1e-6)
    params = tiny_params()
    got = trajectory(tx, params)[-1]

    flat = {models.decoder.path_str(k): np.asarray(v, np.float64)
            for k, v in jax.tree_util.tree_flatten_with_path(params)[0]}
    grads = [{models.decoder.path_str(k): np.asarray(v, np.float64)
              for k, v in jax.tree_util.tree_flatten_with_path(gradients(params, i))[0]}
             for i in range(STEPS)]
    trace = {k: np.zeros_like(v) for k, v in flat.items()}
    for t in range(STEPS):
        for k, p in flat.items():
            trace[k] = grads[t][k] + momentum * trace[k]
            decay = lrs[t] * WD * p if is_decayed(k) else 0.0
            flat[k] = p - lrs[t] * trace[k] - decay
    for k, v in jax.tree_util.tree_flatten_with_path(got)[0]:
        np.testing.assert_allclose(v, flat[models.decoder.path_str(k)], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("name", CHAINED)
def test_chained_decay_follows_the_optimizer_own_update(name):
    """Each step: ours(wd) = the optax factory's own update - lr(t) * wd * p on decayed
    leaves, after any sign, normalisation or parameter scaling of that update."""
    tx, schedule = ours(name, {"weight_decay": WD})
    params = tiny_params()
    factory = optimizers.resolve_factory(name)
    extra = ({"muon_weight_dimension_numbers": optimizers.muon_dimensions}
             if name == "muon" else {})
    plain = factory(schedule, **extra)

    p, state, plain_state = params, tx.init(params), plain.init(params)
    for i in range(3):
        g = gradients(params, i)
        updates, state = tx.update(g, state, p)
        expected, plain_state = plain.update(g, plain_state, p)
        rate = schedule(i) * WD
        expected = jax.tree_util.tree_map_with_path(
            lambda k, u, x: u - rate * x if is_decayed(models.decoder.path_str(k)) else u,
            expected, p)
        assert_trees_close(updates, expected, rtol=1e-5, atol=1e-9)
        p = optax.apply_updates(p, updates)


def test_schedule_free_and_prodigy_keep_their_own_decay_and_gain_the_mask():
    """Unmasked they equal optax's own; masked, norms and biases take the update they take
    without decay (first step: nothing else differs yet), the rest the decayed one."""
    constant = train.ScheduleConfig("constant")
    params = tiny_params()
    # Prodigy's learning rate multiplies its own step-size estimate: 1.0, and a first
    # estimate large enough for the decay to show in one step.
    for name, theirs, lr, hparams in (
            ("schedule_free_adamw", optax.contrib.schedule_free_adamw(
                1e-2, warmup_steps=None, weight_decay=WD), 1e-2, {}),
            ("prodigy", optax.contrib.prodigy(1.0, estim_lr0=1e-2, weight_decay=WD), 1.0,
             {"estim_lr0": 1e-2})):
        everything, _ = ours(name, {"weight_decay": WD, **hparams}, schedule=constant,
                             decay_norms_and_biases=True, lr=lr)
        assert_trees_close(trajectory(everything, params, 3), trajectory(theirs, params, 3))
        masked, _ = ours(name, {"weight_decay": WD, **hparams}, schedule=constant, lr=lr)
        none, _ = ours(name, {"weight_decay": 0.0, **hparams}, schedule=constant, lr=lr)
        first = [trajectory(tx, params, 1)[0] for tx in (masked, none, everything)]
        for path, leaf in jax.tree_util.tree_flatten_with_path(first[0])[0]:
            decayed = is_decayed(models.decoder.path_str(path))
            reference = first[2] if decayed else first[1]
            np.testing.assert_allclose(leaf, leaf_at(reference, path), rtol=1e-6, atol=1e-9)
            if decayed:  # and the decay shows
                assert np.abs(leaf - leaf_at(first[1], path)).max() > 1e-5, (name, path)


def test_schedule_free_without_warmup_trains():
    """No warmup (a constant schedule) is no warmup, not a learning rate held at 0, which
    optax's warmup_steps=0 gives."""
    tx, _ = ours("schedule_free_adamw", {}, schedule=train.ScheduleConfig("constant"))
    params = tiny_params()
    moved = trajectory(tx, params, 2)[-1]["lm_head"] - params["lm_head"]
    assert np.abs(moved).min() > 1e-3


def test_weight_decay_is_accepted_by_every_optimizer_and_others_still_checked():
    for name in optimizers.FACTORIES:
        assert "weight_decay" in optimizers.accepted_hparams(optimizers.resolve_factory(name))
    with pytest.raises(optimizers.UnknownHparamsError, match=r"'sgd' does not accept 'b1'.*"
                       r"momentum, nesterov, accumulator_dtype, weight_decay"):
        train.OptimizerConfig("sgd", hparams={"b1": 0.9, "weight_decay": 0.1})


# ---- every optimizer, every recipe --------------------------------------------------------


def recipes(monkeypatch):
    """Every configs/*.py get_config(), read as the CLI does: from the repository root."""
    monkeypatch.chdir(ROOT)
    monkeypatch.syspath_prepend(ROOT)
    for path in sorted(glob.glob(os.path.join(ROOT, "configs", "*.py"))):
        spec = importlib.util.spec_from_file_location(f"recipe_{os.path.basename(path)}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        yield os.path.basename(path), module.get_config()


def optimizer_config(c, name):
    """The OptimizerConfig config.resolve builds (schedule-free optimizers get the constant
    schedule they need), without the model or data resolve also checks."""
    c = c.copy_and_resolve_references()
    c.optimizer.name = name
    if name in optimizers.SCHEDULE_FREE:
        c.schedule.name = "constant"
    return config_module.optimizer_config(c)


def test_every_optimizer_builds_from_every_recipe(monkeypatch):
    params = tiny_params()
    labels = param_groups.labels(params, train.ParamGroups(), NUM_LAYERS)
    grads = gradients(params, 0)
    built = {}
    for recipe, c in recipes(monkeypatch):
        assert c.optimizer.weight_decay is not None, recipe  # the case that used to fail
        for name in optimizers.FACTORIES:
            config = optimizer_config(c, name)
            built.setdefault(repr(config), (config, []))[1].append(f"{recipe}:{name}")
    assert len({n.split(":")[0] for _, names in built.values() for n in names}) >= 6
    for config, names in built.values():
        tx, _ = train.make_optimizer(config, labels, total_steps=100)
        updates, _ = tx.update(grads, tx.init(params), params)
        norm = float(optax.tree.norm(updates))
        assert np.isfinite(norm), names


# ---- the lab model, three steps each ------------------------------------------------------


def lab_batch(seed, rows=2, length=64):
    rng = np.random.default_rng(seed)
    return {"inputs": rng.integers(0, 1024, (rows, length)).astype(np.int32),
            "targets": rng.integers(0, 1024, (rows, length)).astype(np.int32),
            "loss_mask": np.ones((rows, length), np.int32),
            "segment_ids": np.ones((rows, length), np.int32),
            "positions": np.tile(np.arange(length, dtype=np.int32), (rows, 1)),
            "source_ids": np.zeros((rows, length), np.int32)}


def test_every_optimizer_trains_the_lab_model_with_the_default_recipe(monkeypatch):
    """Three steps each on assets/lab/base with configs/default.py's optimizer settings
    (weight decay 0.01 here, so the decay path runs). The model's loss and gradient, the
    one `train_step` differentiates (`loss.batch_sums`), compile once for all optimizers;
    the updates run eagerly (a whole train_step per optimizer compiles in ~15 s)."""
    model_cfg, params = models.load_hf(os.path.join(ROOT, "assets", "lab", "base"))
    c = dict(recipes(monkeypatch))["default.py"]
    c.optimizer.weight_decay = 0.01
    labels = param_groups.labels(params, train.ParamGroups(), model_cfg.num_layers)

    @jax.jit
    def loss_and_grads(p, batch):
        def numerator(q):
            sums = batch_sums(model_cfg, q, batch, LossConfig())
            return sums["numerator"], sums["denominator"]
        (total, count), grads = jax.value_and_grad(numerator, has_aux=True)(p)
        return total / count, jax.tree.map(lambda g: g / count, grads)

    _every_optimizer_moves_every_parameter(c, labels, params, loss_and_grads)


def _every_optimizer_moves_every_parameter(c, labels, params, loss_and_grads):
    """Three steps of each optimizer from `params`: finite losses, every leaf moved."""
    peak = c.optimizer.learning_rate
    for name in optimizers.FACTORIES:
        # Prodigy's learning rate multiplies its own estimate: 1.0 by convention.
        c.optimizer.learning_rate = 1.0 if name == "prodigy" else peak
        tx, _ = train.make_optimizer(optimizer_config(c, name), labels, total_steps=3)
        p, state, losses = params, tx.init(params), []
        for i in range(3):
            loss, grads = loss_and_grads(p, lab_batch(i))
            updates, state = tx.update(grads, state, p)
            p = optax.apply_updates(p, updates)
            losses.append(float(loss))
        assert np.all(np.isfinite(losses)), (name, losses)
        moved = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), p, params)
        assert all(jax.tree.leaves(moved)), (name, moved)


def test_every_optimizer_trains_a_lora_adapter_on_the_lab_model(monkeypatch):
    """The same with LoRA (the lab_lora recipe): only A and B, every one of them moves."""
    from coach_jax import adapters
    from coach_jax.models.lora import LoraSpec, is_adapter_path
    import dataclasses
    base_cfg, base = models.load_hf(os.path.join(ROOT, "assets", "lab", "base"))
    c = dict(recipes(monkeypatch))["lab_lora.py"]
    model_cfg = dataclasses.replace(base_cfg, projection="lora", lora=LoraSpec(
        c.adapter.rank, c.adapter.alpha, adapters.resolve(base_cfg, c.adapter.targets)[0]))
    adapter = jax.tree.map(lambda x: x + 0.01, models.init(model_cfg, 0, only=is_adapter_path))
    labels = param_groups.labels(adapter, train.ParamGroups(), model_cfg.num_layers)

    @jax.jit
    def loss_and_grads(p, batch):
        def numerator(q):
            sums = batch_sums(model_cfg, adapters.union(base, q), batch, LossConfig())
            return sums["numerator"], sums["denominator"]
        (total, count), grads = jax.value_and_grad(numerator, has_aux=True)(p)
        return total / count, jax.tree.map(lambda g: g / count, grads)

    _every_optimizer_moves_every_parameter(c, labels, adapter, loss_and_grads)
