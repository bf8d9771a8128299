"""Mixture-of-experts training against transformers: the total loss with the router's
load-balancing term, gradients of routers and experts, dropless routing, router metrics."""

import numpy as np
import pytest
import torch

import hf_reference
import jax
import jax.numpy as jnp
from coach_jax import models
from coach_jax.models import moe
from coach_jax.models.config import MoeSpec
from coach_jax.train import loss as loss_lib
from coach_jax.train.step import router_metrics

LENGTH = 20
SWIGLU = lambda gate, up: jax.nn.silu(gate) * up  # noqa: E731
PADDED = {0: 0, 1: 6}  # row -> padding tokens at its end


def _batch(vocab: int):
    """Two rows, the second right-padded; the first 5 tokens of each row are prompt."""
    rng = np.random.RandomState(4)
    tokens = rng.randint(0, vocab, (2, LENGTH + 1)).astype(np.int32)
    segments = np.ones((2, LENGTH), np.int32)
    for row, pad in PADDED.items():
        if pad:
            segments[row, -pad:] = 0
    mask = (segments > 0).astype(np.int32)
    mask[:, :5] = 0
    mask[:, -1] = 0  # transformers' shifted labels cannot supervise the last position
    positions = np.tile(np.arange(LENGTH, dtype=np.int32), (2, 1))
    return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "loss_mask": mask,
            "segment_ids": segments, "positions": positions,
            "source_ids": np.zeros((2, LENGTH), np.int32)}


def _torch_loss_and_grads(model, batch):
    """transformers' loss (cross-entropy + router_aux_loss_coef * load balancing, padding
    excluded through the attention mask) and its gradients."""
    inputs = torch.as_tensor(batch["inputs"], dtype=torch.long)
    labels = torch.as_tensor(np.where(batch["loss_mask"] > 0, batch["targets"], -100))
    # transformers shifts labels itself: give it the label of token t at position t.
    shifted = torch.cat([torch.full((2, 1), -100), labels], dim=1)[:, :-1]
    model.zero_grad()
    out = model(input_ids=inputs, attention_mask=torch.as_tensor(batch["segment_ids"] > 0),
                labels=shifted, output_router_logits=True)
    out.loss.backward()
    return out, {name: p.grad.numpy().copy() for name, p in model.named_parameters()}


def _ours(cfg, params, batch, config):
    def total(p):
        sums = loss_lib.batch_sums(cfg, p, batch, config)
        return sums["numerator"] / sums["denominator"] + sums["router_objective"], sums
    (value, sums), grads = jax.value_and_grad(total, has_aux=True)(params)
    return float(value), sums, grads


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "gpt_oss"])
def test_total_loss_and_gradients_equal_transformers(family, tmp_path):
    hf_model = hf_reference.build(family, output_router_logits=True, router_aux_loss_coef=0.3)
    hf_model.train()  # no dropout in these configs; train mode keeps the aux loss on
    hf_model.save_pretrained(tmp_path)
    cfg, params = models.load_hf(tmp_path)
    assert cfg.moe.output_router_logits and cfg.moe.aux_loss_coef == 0.3
    batch = _batch(cfg.vocab_size)
    out, torch_grads = _torch_loss_and_grads(hf_model, batch)
    value, sums, grads = _ours(cfg, params, batch, loss_lib.LossConfig())
    print(f"{family}: loss {value:.6f} vs {out.loss.item():.6f}, aux "
          f"{float(sums['router_aux']):.6f} vs {out.aux_loss.item():.6f}")
    assert abs(float(sums["router_aux"]) - out.aux_loss.item()) <= 1e-5
    assert abs(value - out.loss.item()) <= 1e-5

    layer = "layers" if cfg.scan_layers else "layers_0"
    index = (0,) if cfg.scan_layers else ()
    mlp = jax.tree.map(lambda x: np.asarray(x[index] if index else x), grads[layer]["mlp"])
    hf = "model.layers.0.mlp"
    gate_up = torch_grads[f"{hf}.experts.gate_up_proj"]
    down = torch_grads[f"{hf}.experts.down_proj"]
    experts = mlp["experts"]
    if family == "gpt_oss":  # [E, D, 2F], gate and up columns alternating; router+bias
        pairs = [(mlp["gate"]["kernel"].T, torch_grads[f"{hf}.router.weight"]),
                 (mlp["gate"]["bias"], torch_grads[f"{hf}.router.bias"]),
                 (experts["gate_proj"], gate_up[..., ::2]),
                 (experts["up_proj"], gate_up[..., 1::2]), (experts["down_proj"], down),
                 (experts["gate_bias"], torch_grads[f"{hf}.experts.gate_up_proj_bias"][:, ::2]),
                 (experts["down_bias"], torch_grads[f"{hf}.experts.down_proj_bias"])]
    else:  # [E, 2F, D]: gate rows, then up
        f = cfg.moe.expert_size
        pairs = [(mlp["gate"]["kernel"].T, torch_grads[f"{hf}.gate.weight"]),
                 (experts["gate_proj"].transpose(0, 2, 1), gate_up[:, :f]),
                 (experts["up_proj"].transpose(0, 2, 1), gate_up[:, f:]),
                 (experts["down_proj"].transpose(0, 2, 1), down)]
    for ours, theirs in pairs:
        scale = np.abs(theirs).max()
        assert scale > 0
        assert np.abs(ours - theirs).max() <= 1e-4 * scale


def test_the_aux_weight_follows_config_json_unless_set():
    cfg = models.ModelConfig.from_hf_dict(hf_reference.FAMILIES["mixtral"]().to_dict())
    assert not cfg.moe.output_router_logits
    assert loss_lib.LossConfig().aux_weight(cfg) == 0.0  # as transformers: off by default
    assert loss_lib.LossConfig(router_aux_loss=0.5).aux_weight(cfg) == 0.5
    on = hf_reference.FAMILIES["mixtral"]()
    on.output_router_logits = True
    cfg_on = models.ModelConfig.from_hf_dict(on.to_dict())
    assert loss_lib.LossConfig().aux_weight(cfg_on) == on.router_aux_loss_coef


def _loop_reference(x, experts, weights, gate, up, down):
    """Expert by expert, token by token: what a capacity-free MoE computes."""
    out = np.zeros_like(x)
    for n in range(x.shape[0]):
        for e, w in zip(experts[n], weights[n]):
            h = x[n] @ gate[e]
            out[n] += w * (((h / (1 + np.exp(-h))) * (x[n] @ up[e])) @ down[e])
    return out


def test_every_token_on_one_expert_is_computed_dropless():
    rng = np.random.RandomState(0)
    n, d, f, num_experts = 64, 8, 12, 4
    x = rng.randn(n, d).astype(np.float32)
    gate, up = (rng.randn(num_experts, d, f).astype(np.float32) * 0.3 for _ in range(2))
    down = rng.randn(num_experts, f, d).astype(np.float32) * 0.3
    experts = np.stack([np.full(n, 2), rng.randint(0, 2, n)], axis=1).astype(np.int32)
    weights = rng.rand(n, 2).astype(np.float32)
    got = moe.grouped_experts(jnp.asarray(x), jnp.asarray(experts), jnp.asarray(weights),
                              *map(jnp.asarray, (gate, up, down)), SWIGLU)
    np.testing.assert_allclose(got, _loop_reference(x, experts, weights, gate, up, down),
                               atol=1e-5)


@pytest.mark.parametrize("block, biased", [(8, False), (128, False), (8, True)])
def test_blocks_and_ragged_dot_give_the_same_values_and_gradients(block, biased):
    """The CPU/GPU block path against TPU's ragged_dot path, uneven groups (one empty, one
    beyond a block), forward and backward; with per-expert biases and gpt-oss's clamped
    SwiGLU too."""
    rng = np.random.default_rng(1)
    d, f, sizes = 8, 12, jnp.asarray([3, 0, 21, 9], jnp.int32)
    rows = jnp.asarray(rng.normal(size=(int(sizes.sum()), d)), jnp.float32)
    weights = [jnp.asarray(rng.normal(size=shape) * 0.3, jnp.float32)
               for shape in ((4, d, f), (4, d, f), (4, f, d))]
    glu = SWIGLU
    biases = None
    if biased:
        glu = moe.expert_glu(_gpt_oss_like_cfg(limit=0.5))
        biases = tuple(jnp.asarray(rng.normal(size=(4, f)), jnp.float32) for _ in range(2))
    def value(path):
        return lambda r, *w: (path(r, sizes, *w, glu, biases) ** 2).sum()
    block_path = lambda *a: moe._block_mlp(*a, block=block)
    for argnum in range(4):
        np.testing.assert_allclose(
            jax.grad(value(block_path), argnum)(rows, *weights),
            jax.grad(value(moe._ragged_mlp), argnum)(rows, *weights), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(block_path(rows, sizes, *weights, glu, biases),
                               moe._ragged_mlp(rows, sizes, *weights, glu, biases), atol=1e-5)


def test_router_losses_count_only_real_tokens(tmp_path):
    """Padding changes neither the load-balancing loss nor the expert shares."""
    hf_reference.build("mixtral").save_pretrained(tmp_path)
    cfg, params = models.load_hf(tmp_path)
    batch = _batch(cfg.vocab_size)
    config = loss_lib.LossConfig()
    sums = loss_lib.batch_sums(cfg, params, batch, config)
    garbage = dict(batch, inputs=np.where(batch["segment_ids"] > 0, batch["inputs"], 3))
    again = loss_lib.batch_sums(cfg, params, garbage, config)
    assert float(sums["router_aux"]) == pytest.approx(float(again["router_aux"]), abs=1e-6)
    np.testing.assert_array_equal(sums["expert_counts"], again["expert_counts"])
    real = int((batch["segment_ids"] > 0).sum())
    np.testing.assert_array_equal(np.asarray(sums["expert_counts"]).sum(-1),
                                  [real * cfg.moe.top_k] * cfg.num_layers)
    metrics = router_metrics(sums)
    assert metrics["expert_share_max"].shape == (cfg.num_layers,)
    assert np.all(metrics["expert_share_max"] >= 1 / cfg.moe.num_experts)
    assert np.all(metrics["expert_share_min"] <= 1 / cfg.moe.num_experts)


def test_a_moe_run_trains_and_logs_its_routers(tmp_path, capsys):
    """A from-scratch Mixtral-shaped model with the load-balancing loss on, two micro-batches:
    metrics.jsonl has the router losses and the expert shares of every layer, and the loss
    falls."""
    import json
    import os
    from test_trainer import tiny_config
    from coach_jax.train.loop import train_and_evaluate
    config = tiny_config(tmp_path, **{"train.steps": 12, "train.log_every": 4,
                                      "train.micro_batches": 2, "data.eval": "",
                                      "train.global_batch_size": 16,
                                      "train.router_aux_loss": 0.05,
                                      "optimizer.learning_rate": 3e-3})
    config.model.init.update(model_type="mixtral", num_local_experts=4, num_experts_per_tok=2)
    train_and_evaluate(config, str(tmp_path / "run"))
    assert "router aux" in capsys.readouterr().out  # the progress line
    with open(os.path.join(tmp_path, "run", "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f if "router_aux_loss" in line]
    assert [r["step"] for r in records] == [1, 4, 8, 12]
    for record in records:
        assert len(record["expert_share_max"]) == len(record["expert_share_min"]) == 2
        assert all(lo <= 0.25 <= hi for lo, hi in zip(record["expert_share_min"],
                                                      record["expert_share_max"]))
        assert record["router_loss"] == pytest.approx(0.05 * record["router_aux_loss"])
        assert record["router_aux_loss"] >= 2.0 - 1e-4  # top 2: at least k when balanced
    assert records[-1]["loss"] < records[0]["loss"]
    with open(os.path.join(tmp_path, "run", "report.md")) as f:
        report = f.read()
    first, last = records[0], records[-1]
    assert "## Experts" in report
    assert (f"| 1 | {first['expert_share_max'][1]:.1%} -> {last['expert_share_max'][1]:.1%} | "
            f"{first['expert_share_min'][1]:.1%} -> {last['expert_share_min'][1]:.1%} |"
            ) in report


def test_lora_on_a_moe_model_adapts_attention_and_experts(tmp_path):
    """all-linear on Mixtral: the attention projections and the experts (never the
    router); a LoRA forward equals the base at step 0 (B = 0)."""
    import dataclasses
    from coach_jax import adapters
    from coach_jax.models.lora import EXPERT_MODULES, LoraSpec, is_adapter_path, join_base
    hf_reference.build("mixtral").save_pretrained(tmp_path)
    cfg, params = models.load_hf(tmp_path)
    modules, layers = adapters.resolve(cfg, "all-linear")
    assert modules == ("self_attn/q_proj", "self_attn/k_proj", "self_attn/v_proj",
                       "self_attn/o_proj") + EXPERT_MODULES and layers is None
    with pytest.raises(adapters.TargetError, match="match no projection"):
        adapters.resolve(cfg, ("gate_proj",))  # Mixtral's experts are w1 / gate_up_proj
    lora_cfg = dataclasses.replace(cfg, projection="lora", lora=LoraSpec(4, 8.0, modules))
    adapter = models.init(lora_cfg, 0, only=is_adapter_path)
    assert set(adapter["layers"]["mlp"]["experts"]) == {
        "gate_proj_lora", "up_proj_lora", "down_proj_lora"}
    tokens = np.random.RandomState(0).randint(0, 160, (1, 12)).astype(np.int32)
    np.testing.assert_allclose(models.apply(lora_cfg, join_base(params, adapter), tokens),
                               models.apply(cfg, params, tokens), atol=1e-6)


def test_parameter_counts_separate_all_from_active():
    """Tiny Mixtral: 4 experts, top 2, so half of the experts' weights are active."""
    from coach_jax import memory
    cfg = models.ModelConfig.from_hf_dict(hf_reference.FAMILIES["mixtral"]().to_dict())
    total, active = memory.parameter_counts(cfg)
    experts = cfg.num_layers * 4 * 3 * cfg.hidden_size * cfg.moe.expert_size
    assert total == models.count_params(jax.tree.map(
        lambda s: np.zeros(s.shape, np.int8), models.param_shapes(cfg)))
    assert total - active == experts // 2


def _routed_batch(vocab: int, rows: int = 8, length: int = 24) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, vocab, (rows, length + 1)).astype(np.int32)
    segments = np.ones((rows, length), np.int32)
    segments[::3, 18:] = 0  # padding the routers must not count
    return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
            "loss_mask": (rng.random((rows, length)) < 0.6).astype(np.int32) * (segments > 0),
            "segment_ids": segments,
            "positions": np.tile(np.arange(length, dtype=np.int32), (rows, 1)),
            "source_ids": np.zeros((rows, length), np.int32)}


@pytest.mark.parametrize("family,mesh_shape", [
    ("qwen2_moe", (2, 1, 4, 1)),  # expert x data; a dense layer and a shared expert
    ("mixtral", (1, 2, 4, 1)),    # expert x fsdp, scanned layers
])
def test_an_expert_parallel_step_equals_one_device(family, mesh_shape, tmp_path):
    """One SGD step with the router's auxiliary loss, experts split over the mesh's
    expert axis: loss, gradient norm and new parameters equal one device's."""
    from coach_jax import parallel, train
    hf_reference.build(family, output_router_logits=True,
                       router_aux_loss_coef=0.3).save_pretrained(tmp_path)
    cfg, params = models.load_hf(tmp_path)
    params = jax.tree.map(np.asarray, params)  # a step donates its state
    batch = _routed_batch(cfg.vocab_size)
    optimizer = train.OptimizerConfig("sgd", 0.1, schedule=train.ScheduleConfig("constant"))
    step_config, parts = train.prepare(cfg, params, optimizer, train.ParamGroups(), 10)
    create = lambda p: train.create_state(p, parts)
    state, single = train.compile_train_step(step_config, parts)(create(params), batch)

    mesh = parallel.make_mesh(mesh_shape)
    _, shardings = parallel.state_shardings(create, params, cfg, mesh)
    experts = shardings.params["layers" if cfg.scan_layers else "layers_0"]["mlp"]["experts"]
    assert "expert" in experts["gate_proj"].spec
    rows = parallel.batch_sharding(mesh)
    step = train.compile_train_step(step_config, parts, shardings, rows)
    sharded_state, sharded = step(parallel.place(create(params), shardings),
                                  parallel.global_batch(batch, rows), None)
    for key in ("loss", "grad_norm", "router_aux_loss"):
        np.testing.assert_allclose(float(sharded[key]), float(single[key]), rtol=1e-5)
    for a, b in zip(jax.tree.leaves(sharded_state.params), jax.tree.leaves(state.params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)


def _gpt_oss_like_cfg(limit: float = 7.0) -> models.ModelConfig:
    """gpt-oss's mixture (router and expert biases, clamped SwiGLU, 4 experts, top 2) on
    a tiny decoder (its family's tensors are another step's)."""
    return models.ModelConfig(
        model_type="mixtral", vocab_size=64, hidden_size=16, intermediate_size=24,
        num_layers=1, num_heads=2, num_kv_heads=1, head_dim=8, feed_forward=("moe",),
        moe=MoeSpec(4, 2, 24, normalize_top_k=True, router_bias=True,
                    expert_bias=True, swiglu_limit=limit, swiglu_alpha=1.702))


def test_gpt_oss_experts_equal_transformers_gpt_oss_mlp():
    """The router with its bias, softmax over the chosen logits, experts with biases and
    interleaved gate/up columns through the clamped SwiGLU: transformers' GptOssMLP on
    the same weights (de-interleaved into our gate and up) gives our output; without the
    clamp it does not."""
    import dataclasses
    import transformers
    from transformers.models.gpt_oss import modeling_gpt_oss
    from coach_jax import parallel
    torch.manual_seed(0)
    hf = transformers.GptOssConfig(hidden_size=16, intermediate_size=24, num_local_experts=4,
                                   num_experts_per_tok=2, swiglu_limit=0.5)
    mlp = modeling_gpt_oss.GptOssMLP(hf)
    for p in mlp.parameters():
        torch.nn.init.normal_(p, std=0.5)
    x = torch.randn(4, 5, 16)
    expected = mlp(x)[0].detach().numpy()
    gate_up = mlp.experts.gate_up_proj.detach().numpy()  # [E, D, 2F], gate columns even
    bias = mlp.experts.gate_up_proj_bias.detach().numpy()
    params = {"gate": {"kernel": mlp.router.weight.detach().numpy().T,
                       "bias": mlp.router.bias.detach().numpy()},
              "experts": {"gate_proj": gate_up[..., ::2], "up_proj": gate_up[..., 1::2],
                          "down_proj": mlp.experts.down_proj.detach().numpy(),
                          "gate_bias": bias[:, ::2], "up_bias": bias[:, 1::2],
                          "down_bias": mlp.experts.down_proj_bias.detach().numpy()}}
    cfg = _gpt_oss_like_cfg(limit=0.5)
    segments = np.ones((4, 5), np.int32)
    def ours(cfg, mesh=None):
        def apply(p, x):
            return moe.MoeFeedForward(cfg).apply({"params": p}, x, segments)
        fn = jax.jit(parallel.traced_on_mesh(apply, mesh))
        args = jax.tree.map(jnp.asarray, (params, x.numpy()))
        if mesh is not None:
            args = parallel.place(args, jax.tree.map(lambda _: parallel.replicated(mesh), args))
        return np.asarray(fn(*args))
    np.testing.assert_allclose(ours(cfg), expected, atol=1e-5)
    # The biases' shards follow their experts (and the tensor-split mlp axis).
    expert_parallel = ours(cfg, parallel.make_mesh((1, 2, 2, 2)))
    np.testing.assert_allclose(expert_parallel, expected, atol=1e-5)
    unclamped = dataclasses.replace(cfg, moe=dataclasses.replace(cfg.moe, swiglu_limit=1e9))
    assert np.abs(ours(unclamped) - expected).max() > 1e-2
