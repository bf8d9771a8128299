"""train_step: token-exact loss, gradient accumulation, parameter groups, optimizers."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from coach_jax import models, train
from coach_jax.train import optimizers, param_groups

CFG = models.ModelConfig(model_type="llama", vocab_size=64, hidden_size=32,
                         intermediate_size=48, num_layers=3, num_heads=4, num_kv_heads=2,
                         head_dim=8)
B, T = 8, 16
SGD = train.OptimizerConfig("sgd", learning_rate=0.5, grad_clip_norm=None,
                            schedule=train.ScheduleConfig("constant"))


def make_batch(seed=0, num_sources=2):
    """Packed rows (2-3 segments, padding at the end) with uneven supervision per row."""
    rng = np.random.default_rng(seed)
    segment_ids = np.zeros((B, T), np.int32)
    positions = np.zeros((B, T), np.int32)
    for b in range(B):
        cuts = sorted(rng.choice(np.arange(2, T - 2), 2, replace=False))
        bounds = [0, cuts[0], cuts[1], T - b % 3]
        for s in range(3):
            segment_ids[b, bounds[s]:bounds[s + 1]] = s + 1
            positions[b, bounds[s]:bounds[s + 1]] = np.arange(bounds[s + 1] - bounds[s])
    density = np.linspace(0.1, 0.9, B)[:, None]  # row 0 barely supervised, row 7 mostly
    loss_mask = ((rng.random((B, T)) < density) & (segment_ids > 0)).astype(np.int32)
    return {"inputs": rng.integers(0, 64, (B, T)).astype(np.int32),
            "targets": rng.integers(0, 64, (B, T)).astype(np.int32),
            "loss_mask": loss_mask, "segment_ids": segment_ids, "positions": positions,
            "source_ids": rng.integers(0, num_sources, (B, T)).astype(np.int32)}


def fresh_params(cfg=CFG):
    return models.init(cfg, seed=0)


def run(optimizer=SGD, groups=train.ParamGroups(), steps=1, cfg=CFG, batch=None, **kwargs):
    state, step_config, parts = train.setup(cfg, fresh_params(cfg), optimizer, groups, 10,
                                            num_sources=2, **kwargs)
    step = train.compile_train_step(step_config, parts)
    metrics = []
    for i in range(steps):
        state, m = step(state, batch if batch is not None else make_batch(i))
        metrics.append(jax.device_get(m))
    return state, metrics, parts


@pytest.mark.parametrize("normalization", ["tokens", "examples"])
def test_micro_batches_equal_one_big_batch(normalization):
    batch = make_batch()
    per_micro = batch["loss_mask"].reshape(4, -1).sum(axis=1)
    assert len(set(per_micro.tolist())) == 4  # uneven supervision across micro-batches
    loss = train.LossConfig(normalization)
    one, m1, _ = run(batch=batch, loss=loss, micro_batches=1)
    four, m4, _ = run(batch=batch, loss=loss, micro_batches=4)
    assert m1[0]["loss"] == pytest.approx(m4[0]["loss"], rel=1e-6)
    assert m1[0]["grad_norm"] == pytest.approx(m4[0]["grad_norm"], rel=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
                 one.params, four.params)
    # Averaging micro-batch means (what optax.MultiSteps does) would give another loss.
    means = [batch["loss_mask"].reshape(4, -1)[i].sum() for i in range(4)]
    assert len(set(means)) > 1


def _numpy_losses(batch, params):
    logits = np.asarray(models.apply(CFG, params, batch["inputs"], batch["positions"],
                                     batch["segment_ids"]), np.float64)
    logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1,
                                                                             keepdims=True)) \
        - logits.max(-1, keepdims=True)
    nll = -np.take_along_axis(logp, batch["targets"][..., None], -1)[..., 0]
    return nll, logits


def test_loss_matches_a_hand_computation():
    batch = make_batch(3)
    params = fresh_params()
    nll, _ = _numpy_losses(batch, params)
    mask = batch["loss_mask"].astype(bool)
    tokens = nll[mask].sum() / mask.sum()
    per_example = []
    for b in range(B):
        for s in np.unique(batch["segment_ids"][b]):
            sel = mask[b] & (batch["segment_ids"][b] == s)
            if s > 0 and sel.any():
                per_example.append(nll[b][sel].mean())
    examples = np.mean(per_example)
    _, m, _ = run(batch=batch)
    assert m[0]["loss"] == pytest.approx(tokens, rel=1e-5)
    assert m[0]["supervised_tokens"] == mask.sum()
    _, m, _ = run(batch=batch, loss=train.LossConfig("examples"))
    assert m[0]["loss"] == pytest.approx(examples, rel=1e-5)
    # Per source: the same hand computation split by source id.
    _, m, _ = run(batch=batch)
    for source in (0, 1):
        sel = mask & (batch["source_ids"] == source)
        assert m[0]["source_loss"][source] == pytest.approx(nll[sel].mean(), rel=1e-5)
        assert m[0]["source_tokens"][source] == sel.sum()


def test_padding_and_unsupervised_tokens_never_count():
    batch = make_batch(4)
    changed = dict(batch)
    unsupervised = batch["loss_mask"] == 0
    changed["targets"] = np.where(unsupervised, (batch["targets"] + 7) % 64, batch["targets"])
    _, a, _ = run(batch=batch)
    _, b, _ = run(batch=changed)
    assert a[0]["loss"] == b[0]["loss"]


def test_z_loss_and_label_smoothing_match_a_hand_computation():
    batch = make_batch(5)
    nll, logits = _numpy_losses(batch, fresh_params())
    mask = batch["loss_mask"].astype(bool)
    lse = np.log(np.exp(logits).sum(-1))
    smoothed = 0.9 * nll + 0.1 * (lse - logits.mean(-1)) + 1e-3 * lse ** 2
    _, m, _ = run(batch=batch, loss=train.LossConfig(z_loss=1e-3, label_smoothing=0.1))
    assert m[0]["loss"] == pytest.approx(smoothed[mask].mean(), rel=1e-5)
    assert m[0]["nll"] == pytest.approx(nll[mask].mean(), rel=1e-5)


def test_metrics_are_consistent():
    state, m, parts = run(steps=2)
    assert int(state.step) == 2
    assert m[1]["learning_rate"] == pytest.approx(0.5)
    assert m[0]["finite"] and 0 <= m[0]["token_accuracy"] <= 1
    assert m[0]["update_norm"] == pytest.approx(0.5 * m[0]["grad_norm"], rel=1e-5)  # sgd


# ---- optimizers --------------------------------------------------------------------------

HPARAMS = {
    "adamw": dict(b1=0.8, b2=0.95, eps=1e-6, weight_decay=0.05),
    "adam": dict(b1=0.85, b2=0.99, eps=1e-7),
    "sgd": dict(momentum=0.8, nesterov=True),
    "lion": dict(b1=0.95, b2=0.98, weight_decay=0.1),
    "adafactor": dict(decay_rate=0.7, min_dim_size_to_factor=8, weight_decay_rate=0.01),
    "lamb": dict(b1=0.8, b2=0.99, weight_decay=0.02),
    "nadamw": dict(b1=0.8, weight_decay=0.03),
    "muon": dict(beta=0.9, ns_steps=4, adam_b1=0.8),  # its decay: tests/test_optimizers.py
    "schedule_free_adamw": dict(b1=0.8, weight_decay=0.01, warmup_steps=0),
    "prodigy": dict(betas=(0.8, 0.95), weight_decay=0.01),
    "adopt": dict(b1=0.8, b2=0.99),
    "optax.contrib.ademamix": dict(b3=0.99, alpha=3.0, weight_decay=0.01),
}


def _gradients(params, seed):
    keys = jax.random.split(jax.random.key(seed), len(jax.tree.leaves(params)))
    leaves = [jax.random.normal(k, x.shape) * 0.1 for k, x in zip(keys, jax.tree.leaves(params))]
    return jax.tree.unflatten(jax.tree.structure(params), leaves)


@pytest.mark.parametrize("name", list(HPARAMS))
def test_optimizer_from_config_equals_the_optax_factory(name):
    params = fresh_params()
    labels = param_groups.labels(params, train.ParamGroups(), CFG.num_layers)
    config = train.OptimizerConfig(name, learning_rate=3e-3, hparams=HPARAMS[name],
                                   grad_clip_norm=None, schedule=train.ScheduleConfig("constant"))
    ours, _ = train.make_optimizer(config, labels, total_steps=10)
    factory = optimizers.resolve_factory(name)
    extra = {}
    accepted = set(optimizers.inspect.signature(factory).parameters)
    for mask_name in ("mask", "weight_decay_mask"):
        if mask_name in accepted:
            extra[mask_name] = optimizers.decay_mask
    if "muon_weight_dimension_numbers" in accepted:
        extra["muon_weight_dimension_numbers"] = optimizers.muon_dimensions
    direct = factory(3e-3, **HPARAMS[name], **extra)
    results = []
    for tx in (ours, direct):
        @jax.jit
        def three_steps(p):
            state = tx.init(p)
            for i in range(3):
                updates, state = tx.update(_gradients(params, i), state, p)
                p = optax.apply_updates(p, updates)
            return p
        results.append(three_steps(params))
    moved = jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()), results[0], params)
    assert max(jax.tree.leaves(moved)) > 0
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), *results)


def test_weight_decay_skips_norms_and_biases():
    params = fresh_params()
    labels = param_groups.labels(params, train.ParamGroups(), CFG.num_layers)
    config = train.OptimizerConfig("adamw", 1e-2, hparams={"weight_decay": 0.5},
                                   grad_clip_norm=None, schedule=train.ScheduleConfig("constant"))
    tx, _ = train.make_optimizer(config, labels, 10)
    zeros = jax.tree.map(jnp.zeros_like, params)
    updates, _ = tx.update(zeros, tx.init(params), params)
    assert not np.asarray(updates["norm"]["scale"]).any()
    assert not np.asarray(updates["layers"]["input_layernorm"]["scale"]).any()
    assert np.asarray(updates["layers"]["mlp"]["up_proj"]["kernel"]).any()


def test_muon_orthogonalises_each_stacked_layer_on_its_own():
    stacked = fresh_params()
    unrolled_cfg = models.ModelConfig(**{**CFG.__dict__, "scan_layers": False})
    unrolled = {k: v for k, v in stacked.items() if k != "layers"}
    for i in range(CFG.num_layers):
        unrolled[f"layers_{i}"] = jax.tree.map(lambda x: x[i], stacked["layers"])
    assert jax.tree.structure(unrolled) == jax.tree.structure(models.param_shapes(unrolled_cfg))
    config = train.OptimizerConfig("muon", 1e-2, grad_clip_norm=None,
                                   schedule=train.ScheduleConfig("constant"))
    stacked_grads = jax.tree.map(
        lambda x: jnp.cos(jnp.arange(x.size).reshape(x.shape) * 0.37), stacked)
    unrolled_grads = {k: v for k, v in stacked_grads.items() if k != "layers"}
    for i in range(CFG.num_layers):
        unrolled_grads[f"layers_{i}"] = jax.tree.map(lambda x: x[i], stacked_grads["layers"])
    final = []
    for params, grads, cfg in ((stacked, stacked_grads, CFG),
                               (unrolled, unrolled_grads, unrolled_cfg)):
        labels = param_groups.labels(params, train.ParamGroups(), cfg.num_layers)
        tx, _ = train.make_optimizer(config, labels, 10)

        @jax.jit
        def two_steps(p, grads):
            state = tx.init(p)
            for _ in range(2):
                updates, state = tx.update(grads, state, p)
                p = optax.apply_updates(p, updates)
            return p
        final.append(two_steps(params, grads))
    for i in range(CFG.num_layers):
        jax.tree.map(lambda s, u: np.testing.assert_allclose(s[i], u, rtol=1e-5, atol=1e-6),
                     final[0]["layers"], final[1][f"layers_{i}"])
    dims = optimizers.muon_dimensions(stacked)
    assert dims["embed_tokens"] is None and dims["norm"]["scale"] is None
    assert dims["layers"]["self_attn"]["o_proj"]["kernel"] == optax.contrib.MuonDimensionNumbers(
        (1, 2), (3,))


def test_schedule_free_evaluates_the_averaged_parameters():
    config = train.OptimizerConfig("schedule_free_adamw", 1e-2, grad_clip_norm=None,
                                   schedule=train.ScheduleConfig("constant", warmup_steps=2))
    state, metrics, parts = run(config, steps=3)
    trainable, _ = param_groups.split(state.params, parts.label_tree)
    averaged = train.eval_params(config, state.opt_state, trainable)
    expected = optax.contrib.schedule_free_eval_params(state.opt_state[0], trainable)
    jax.tree.map(np.testing.assert_array_equal, averaged, expected)
    assert not np.array_equal(averaged["embed_tokens"], state.params["embed_tokens"])
    assert metrics[0]["learning_rate"] == 0.0 and metrics[2]["learning_rate"] == 1e-2


# ---- parameter groups ----------------------------------------------------------------------


def test_frozen_groups_do_not_move_and_hold_no_optimizer_state():
    groups = train.ParamGroups(rules=(("embed_tokens", "frozen"), ("^norm/", "frozen")))
    before = fresh_params()
    adamw = train.OptimizerConfig("adamw", 1e-2, schedule=train.ScheduleConfig("constant"))
    state, _, parts = run(adamw, groups, steps=2)
    np.testing.assert_array_equal(state.params["embed_tokens"], before["embed_tokens"])
    np.testing.assert_array_equal(state.params["norm"]["scale"], before["norm"]["scale"])
    assert not np.array_equal(state.params["lm_head"], before["lm_head"])
    state_shapes = {x.shape for x in jax.tree.leaves(state.opt_state)}
    assert (64, 32) not in state_shapes  # embed_tokens: no moments
    assert (64, 32) not in {x.shape for x in jax.tree.leaves(parts.label_tree)
                            if hasattr(x, "shape")}
    assert param_groups.describe(parts.label_tree, state.params)["frozen"] == 64 * 32 + 32


def test_learning_rate_multipliers():
    groups = train.ParamGroups(rules=(("lm_head", 0.25),))
    before = fresh_params()
    state, _, _ = run(SGD, groups, batch=make_batch())
    reference, _, _ = run(SGD, batch=make_batch())
    head_moved = np.asarray(state.params["lm_head"]) - np.asarray(before["lm_head"])
    reference_moved = np.asarray(reference.params["lm_head"]) - np.asarray(before["lm_head"])
    np.testing.assert_allclose(head_moved, 0.25 * reference_moved, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("scan_layers", [True, False])
def test_train_only_the_last_layers(scan_layers):
    cfg = models.ModelConfig(**{**CFG.__dict__, "scan_layers": scan_layers})
    before = fresh_params(cfg)
    adamw = train.OptimizerConfig("adamw", 1e-2, hparams={"weight_decay": 0.1},
                                  schedule=train.ScheduleConfig("constant"))
    state, _, _ = run(adamw, train.ParamGroups(trainable_last_layers=1), steps=2, cfg=cfg)
    layer = (lambda p, i: jax.tree.map(lambda x: x[i], p["layers"])) if scan_layers else (
        lambda p, i: p[f"layers_{i}"])
    for i in range(2):
        jax.tree.map(np.testing.assert_array_equal, layer(state.params, i), layer(before, i))
    moved = jax.tree.map(lambda a, b: bool((a != b).any()), layer(state.params, 2),
                         layer(before, 2))
    assert all(jax.tree.leaves(moved))


# ---- errors and schedules ------------------------------------------------------------------


def test_configuration_errors_list_the_valid_choices():
    labels = param_groups.labels(fresh_params(), train.ParamGroups(), CFG.num_layers)
    with pytest.raises(train.OptimizerConfigError,
                       match=r"'adamw' does not accept 'beta1'; it accepts: b1, b2, eps"):
        train.make_optimizer(train.OptimizerConfig("adamw", hparams={"beta1": 0.9}), labels, 10)
    with pytest.raises(train.OptimizerConfigError, match=r"unknown optimizer 'adamx'.*adamw, adam"):
        train.make_optimizer(train.OptimizerConfig("adamx"), labels, 10)
    with pytest.raises(train.OptimizerConfigError, match="not found in optax"):
        train.make_optimizer(train.OptimizerConfig("optax.contrib.nothing"), labels, 10)
    with pytest.raises(ValueError, match=r"unknown schedule 'cosine'; expected one of constant"):
        train.ScheduleConfig("cosine")
    with pytest.raises(train.OptimizerConfigError, match="replaces the schedule"):
        train.make_optimizer(train.OptimizerConfig("schedule_free_adamw"), labels, 10)
    with pytest.raises(ValueError, match="matches no parameter"):
        run(groups=train.ParamGroups(rules=(("embedding", "frozen"),)))
    with pytest.raises(ValueError, match=r"train.lr_multipliers: 'lm_head' has multiplier "
                                         r"'slow'; it must be a positive number"):
        train.ParamGroups(rules=(("lm_head", "slow"),))
    with pytest.raises(train.OptimizerConfigError, match="nothing to train"):
        run(groups=train.ParamGroups(rules=((".", "frozen"),)))


def test_schedules():
    peak = 1.0
    cosine = train.make_schedule(train.ScheduleConfig("warmup_cosine", warmup_steps=10,
                                                      end_ratio=0.1), peak, 110)
    assert [float(cosine(s)) for s in (0, 5, 10)] == pytest.approx([0, 0.5, 1.0])
    assert float(cosine(60)) == pytest.approx(0.55) and float(cosine(110)) == pytest.approx(0.1)
    linear = train.make_schedule(train.ScheduleConfig("warmup_linear", warmup_ratio=0.1),
                                 peak, 100)
    assert float(linear(10)) == pytest.approx(1.0) and float(linear(55)) == pytest.approx(0.5)
    wsd = train.make_schedule(train.ScheduleConfig("wsd", warmup_steps=10, decay_ratio=0.2),
                              peak, 100)
    assert [float(wsd(s)) for s in (5, 10, 79, 80, 90, 100)] == pytest.approx(
        [0.5, 1, 1, 1, 0.5, 0])
    constant = train.make_schedule(train.ScheduleConfig("constant"), peak, 100)
    assert float(constant(0)) == float(constant(99)) == 1.0
    with pytest.raises(ValueError, match="warmup_steps or warmup_ratio, not both"):
        train.ScheduleConfig(warmup_steps=3, warmup_ratio=0.1)


def test_non_finite_loss_is_detected_and_named():
    params = fresh_params()
    params["lm_head"] = params["lm_head"].at[0, 0].set(jnp.nan)
    state, step_config, parts = train.setup(CFG, params, SGD, train.ParamGroups(), 10,
                                            num_sources=2)
    _, metrics = train.compile_train_step(step_config, parts)(state, make_batch())
    metrics = jax.device_get(metrics)
    assert not metrics["finite"]
    with pytest.raises(train.NonFiniteError, match="step 7: non-finite loss"):
        train.check_finite(metrics, 7)


@pytest.mark.parametrize("chunk", [0, 40, 128])
def test_chunked_cross_entropy_equals_the_plain_one(chunk):
    from coach_jax.train.loss import chunked_token_losses, token_losses
    params = fresh_params()
    batch = make_batch(6)
    config = train.LossConfig(chunk_tokens=chunk, z_loss=1e-3, label_smoothing=0.1)
    hidden = models.hidden_states(CFG, params, batch["inputs"], batch["positions"],
                                  batch["segment_ids"])

    def total(h, p, chunked):
        logits_fn = lambda x: models.logits_from_hidden(CFG, p, x)
        if chunked:
            objective, _, _ = chunked_token_losses(h, batch["targets"], logits_fn, config)
        else:
            objective, _, _ = token_losses(logits_fn(h), batch["targets"], config)
        return (objective * batch["loss_mask"]).sum()

    plain = jax.value_and_grad(total, argnums=(0, 1))(hidden, params, False)
    chunked = jax.value_and_grad(total, argnums=(0, 1))(hidden, params, True)
    assert float(plain[0]) == pytest.approx(float(chunked[0]), rel=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
                 plain[1], chunked[1])
    accuracy = [chunked_token_losses(hidden, batch["targets"],
                                     lambda x: models.logits_from_hidden(CFG, params, x),
                                     config)[2], token_losses(
        models.logits_from_hidden(CFG, params, hidden), batch["targets"], config)[2]]
    np.testing.assert_array_equal(*accuracy)


@pytest.mark.parametrize("remat", ["full", "dots", "save_attention"])
def test_remat_policies_change_memory_not_results(remat):
    batch = make_batch(7)
    plain, m_plain, _ = run(batch=batch)
    cfg = models.ModelConfig(**{**CFG.__dict__, "remat": remat})
    rematted, m_remat, _ = run(batch=batch, cfg=cfg)
    assert m_plain[0]["loss"] == pytest.approx(m_remat[0]["loss"], rel=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
                 plain.params, rematted.params)
