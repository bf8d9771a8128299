"""Every path lowers for TPU and CUDA on this CPU-only machine (`jax.export`).

What a TPU or GPU compiler would reject at the lowering stage fails here instead: a Pallas
kernel given block sizes it cannot take, a Mosaic kernel left for XLA to partition, a
cuDNN call outside its limits, a trace that only works for the CPU. Nothing is compiled
for the accelerator, so speed, memory and the compiled kernels' numerics still need the
hardware (docs/architecture.md, "Attention kernels").

Parameters and batches are abstract (`jax.ShapeDtypeStruct`): lowering needs shapes only.
The same lowered step serves packed and unpacked rows (segment ids and positions are
values, not shapes). `auto` attention must become splash for TPU and cuDNN for CUDA (each
lowering is searched for the kernel's custom call). cuDNN's lowering asks the installed
cuDNN library for its version, which a CPU machine lacks; the tests pin CUDNN_VERSION
(cuDNN 9.8, the oldest the CUDA 12 jax wheels accept), and only then lower for CUDA.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib.util
import os
from unittest import mock

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

import hf_reference
from coach_jax import adapters, models, parallel, sampling, train
from coach_jax.models import attention, quantize
from coach_jax.models.decoder import select
from coach_jax.models.lora import LoraSpec, is_adapter_path
from coach_jax.train.evaluation import compile_eval_step

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CUDNN_VERSION = 90800
ROWS, LENGTH = 2, 128  # one splash block: the smallest length splash takes
SPLASH_CALL = "tpu_custom_call"
CUDNN_CALL = "__cudnn$fmha"
# cuDNN's attention calls are not on jax.export's list of stable custom calls: allowed here.
CUDNN_TARGETS = [f"__cudnn$fmha{kind}{direction}" for kind in ("Softmax", "ScaleBiasSoftmax")
                 for direction in ("", "Backward")]
# Each family recipe of configs/ and its architecture (a tiny stand-in from
# tests/hf_reference.py); a recipe missing here fails test_every_recipe_has_a_stand_in.
RECIPE_FAMILIES = {
    "gemma2_2b": "gemma2", "gemma3_1b": "gemma3_text", "llama3_1_8b_qlora": "llama3",
    "llama3_2_1b": "llama3", "llama3_2_1b_lora": "llama3", "llama3_2_1b_qlora": "llama3",
    "olmo2_1b": "olmo2", "olmo3_7b_lora": "olmo3", "phi4_mini": "phi4_mini", "qwen2_5_0_5b": "qwen2",
    "qwen2_5_0_5b_lora": "qwen2", "qwen2_5_0_5b_qlora": "qwen2", "qwen3_0_6b": "qwen3",
    "smollm3_3b": "smollm3_window", "qwen3_30b_a3b_lora": "qwen3_moe",
    "mixtral_8x7b_qlora": "mixtral", "gpt_oss_20b_lora": "gpt_oss",
    "gpt_oss_20b_qlora": "gpt_oss", "qwen3_5_0_8b": "qwen3_5", "qwen3_5_moe_lora": "qwen3_5_moe",
    "gemma4_e2b": "gemma4_text",
}
LAB_RECIPES = ("default", "lab_bad_coach", "lab_coach_too_hard", "lab_lora", "lab_pretrain")


@contextlib.contextmanager
def cudnn_installed():
    """The cuDNN version lowering for CUDA asks the library for (see the module doc)."""
    from jax._src.cudnn import fused_attention_stablehlo
    with mock.patch.object(fused_attention_stablehlo, "check_cudnn_version",
                           lambda: CUDNN_VERSION):
        yield


def recipe(name: str):
    path = os.path.join(ROOT, "configs", f"{name}.py")
    spec = importlib.util.spec_from_file_location(f"recipe_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def lab_model(**runtime) -> models.ModelConfig:
    return models.ModelConfig.from_hf_dir(os.path.join(ROOT, "assets", "lab", "base"),
                                          **{**LAB_RUNTIME, **runtime})


LAB_RUNTIME = dict(compute_dtype="bfloat16", param_dtype="float32", remat="none",
                   attention="auto", scan_layers=True)


def stand_in(family: str, head_dim: int | None = None, **runtime) -> models.ModelConfig:
    """The family's tiny architecture; an MLP width of 128 so QLoRA's blocks of 64 tile
    (and `head_dim` where o_proj's input must tile too)."""
    hf = hf_reference.FAMILIES[family]()
    hf.intermediate_size = 128
    if head_dim is not None:
        hf.head_dim = head_dim
    return models.ModelConfig.from_hf_dict(hf.to_dict(), **{**LAB_RUNTIME, **runtime})


def abstract_batch(rows: int = ROWS, length: int = LENGTH) -> dict[str, jax.ShapeDtypeStruct]:
    keys = ("inputs", "targets", "loss_mask", "segment_ids", "positions", "source_ids")
    return {k: jax.ShapeDtypeStruct((rows, length), jnp.int32) for k in keys}


@dataclasses.dataclass
class Step:
    """A jitted train step, abstract arguments to lower it with, and (on a mesh) where
    each argument lives."""

    fn: object
    args: tuple
    shardings: tuple | None = None


def train_step(cfg: models.ModelConfig, *, micro_batches: int = 1, rows: int = ROWS,
               mesh: jax.sharding.Mesh | None = None, lora_rank: int = 0,
               quantize_base: str = "none", quantize_block: int = 16,
               loss: train.LossConfig = train.LossConfig()
               ) -> Step:
    """The train step a run builds (train.prepare + compile_train_step), for `cfg`: with a
    LoRA adapter on a frozen base (quantized for QLoRA) when `lora_rank` is set."""
    params = models.param_shapes(cfg)
    base = None
    if lora_rank:
        base = params
        if quantize_base != "none":
            base = jax.eval_shape(
                lambda b: quantize.quantize_base(b, quantize_base, quantize_block), base)
        cfg = dataclasses.replace(cfg, projection="lora", lora=LoraSpec(
            lora_rank, 2.0 * lora_rank, adapters.resolve(cfg, "all-linear")[0]))
        params = select(models.param_shapes(cfg), is_adapter_path)
    optimizer = train.OptimizerConfig("adamw", 1e-4, hparams=dict(weight_decay=0.01),
                                      schedule=train.ScheduleConfig("constant"))
    step_config, parts = train.prepare(cfg, params, optimizer, train.ParamGroups(), 100,
                                       loss=loss, micro_batches=micro_batches)
    create = functools.partial(train.create_state, parts=parts)
    if mesh is None:
        fn = train.compile_train_step(step_config, parts)
        return Step(fn, (jax.eval_shape(create, params), abstract_batch(rows), base))
    state, shardings = parallel.state_shardings(create, params, cfg, mesh)
    base_sharding = None if base is None else jax.tree.map(lambda _: parallel.replicated(mesh),
                                                           base)
    batch, rows_sharding = abstract_batch(rows), parallel.batch_sharding(mesh)
    fn = train.compile_train_step(step_config, parts, shardings, rows_sharding, base_sharding)
    return Step(fn, (state, batch, base),
                (shardings, {k: rows_sharding for k in batch}, base_sharding))


def export(fn, platform: str, *args, cudnn: bool | None = None, **kwargs
           ) -> jax.export.Exported:
    """`fn` lowered and serialized for `platform`; with the cuDNN library pinned when
    `cudnn` (default: for CUDA, as on a GPU machine; not for TPU, as on a TPU VM). Traced
    afresh: jit caches would keep an earlier trace."""
    jax.clear_caches()
    checks = [jax.export.DisabledSafetyCheck.custom_call(t) for t in CUDNN_TARGETS]
    with cudnn_installed() if (platform == "cuda" if cudnn is None else cudnn) \
            else contextlib.nullcontext():
        return jax.export.export(fn, platforms=(platform,), disabled_checks=checks)(*args,
                                                                                   **kwargs)


def lowers_with(exported: jax.export.Exported, platform: str, kernel: str | None) -> None:
    """The lowering has `kernel`'s custom call (splash for TPU, cuDNN for CUDA), or none
    of either when `kernel` is None."""
    text = exported.mlir_module()
    calls = {"splash": SPLASH_CALL in text, "cudnn": CUDNN_CALL in text}
    expected = {name: name == kernel for name in calls}
    assert calls == expected, f"{platform}: kernels {calls}, expected {expected}"


# Where `auto` attention goes on each platform, with 16-bit compute and no soft-cap.
AUTO_KERNEL = {"tpu": "splash", "cuda": "cudnn"}


@pytest.mark.parametrize("platform", ["tpu", "cuda"])
@pytest.mark.parametrize("remat, scan", [("none", True), ("full", True), ("dots", True),
                                         ("dots_no_batch", True), ("save_attention", True),
                                         ("none", False), ("full", False)])
def test_the_lab_train_step_lowers(platform, remat, scan):
    """bf16 compute, every remat policy scanned, two unrolled."""
    step = train_step(lab_model(remat=remat, scan_layers=scan))
    lowers_with(export(step.fn, platform, *step.args), platform, AUTO_KERNEL[platform])


@pytest.mark.parametrize("platform", ["tpu", "cuda"])
def test_the_lab_recipe_with_gradient_accumulation_lowers(platform):
    step = train_step(lab_model(), micro_batches=2, rows=4)
    lowers_with(export(step.fn, platform, *step.args), platform, AUTO_KERNEL[platform])


def test_every_recipe_has_a_stand_in():
    names = {f[:-3] for f in os.listdir(os.path.join(ROOT, "configs")) if f.endswith(".py")}
    assert names == set(RECIPE_FAMILIES) | set(LAB_RECIPES), \
        "a recipe in configs/ needs its family in RECIPE_FAMILIES (or LAB_RECIPES)"


@pytest.mark.parametrize("platform", ["tpu", "cuda"])
@pytest.mark.parametrize("name", sorted(RECIPE_FAMILIES))
def test_each_family_recipe_lowers(name, platform):
    """The recipe's runtime settings (compute dtype, remat, scan, attention, adapter,
    micro-batches, loss chunks) on a tiny model of its family."""
    c = recipe(name)
    mxfp4 = c.adapter.quantize_base == "mxfp4"  # blocks of 32: o_proj's heads must tile
    cfg = stand_in(RECIPE_FAMILIES[name], head_dim=32 if mxfp4 else None,
                   compute_dtype=c.model.dtype,
                   param_dtype=c.model.param_dtype, remat=c.model.remat,
                   attention=c.model.attention, scan_layers=c.model.scan_layers)
    lora = c.adapter.kind == "lora"
    step = train_step(cfg, micro_batches=c.train.micro_batches, rows=c.train.micro_batches,
                      lora_rank=c.adapter.rank if lora else 0,
                      quantize_base=c.adapter.quantize_base if lora else "none",
                      quantize_block=32 if mxfp4 else 16,
                      loss=train.LossConfig(chunk_tokens=c.train.chunk_tokens))
    with cudnn_installed():  # on a GPU machine
        expected = attention.choose(cfg.attention, platform, attention.AttentionShape(
            LENGTH, cfg.head_dim, cfg.compute_dtype, cfg.attn_logit_softcapping,
            cfg.attention_sinks)).implementation
    if platform == "tpu" and cfg.attention == "auto":
        # soft-capped Gemma 2 too; gpt-oss's sinks have no fused kernel
        assert expected == ("xla" if cfg.attention_sinks else "splash")
    lowers_with(export(step.fn, platform, *step.args), platform,
                None if expected == "xla" else expected)


@pytest.mark.parametrize("platform", ["tpu", "cuda"])
def test_gemma2s_alternating_windows_and_caps_lower_to_splash(platform):
    """A traced window per scanned layer picks one splash kernel per window size."""
    step = train_step(stand_in("gemma2"))
    lowers_with(export(step.fn, platform, *step.args), platform,
                "splash" if platform == "tpu" else None)  # cuDNN cannot soft-cap


@pytest.mark.parametrize("platform", ["tpu", "cuda"])
@pytest.mark.parametrize("quantize_base", ["none", "nf4"])
def test_lora_and_qlora_steps_lower(platform, quantize_base):
    step = train_step(lab_model(), lora_rank=8, quantize_base=quantize_base)
    lowers_with(export(step.fn, platform, *step.args), platform, AUTO_KERNEL[platform])


@pytest.mark.parametrize("platform", ["tpu", "cuda"])
def test_the_eval_step_lowers(platform):
    cfg = lab_model()
    eval_step = compile_eval_step(train.StepConfig(cfg))
    exported = export(eval_step, platform, models.param_shapes(cfg), abstract_batch())
    lowers_with(exported, platform, AUTO_KERNEL[platform])


@pytest.mark.parametrize("platform", ["tpu", "cuda"])
@pytest.mark.parametrize("family", ["llama3", "gemma2", "phi4_mini", "gemma4_text"])
def test_generation_lowers(platform, family):
    """Prefill and the decode loop (LongRoPE's recompute branch for phi4_mini; Gemma 4's
    two cache geometries and layers reading others' cache slots): the KV cache path
    attends one query to the whole cache on XLA's path on every platform."""
    lowers_with(export_generation(stand_in(family), platform, 8), platform, None)


def export_generation(cfg: models.ModelConfig, platform: str, new_tokens: int
                      ) -> jax.export.Exported:
    """Generation (prefill and the decode loop) of 32-token prompts, exported."""
    prompts = jax.ShapeDtypeStruct((ROWS, 32), jnp.int32)
    return export(sampling._generate, platform, models.param_shapes(cfg), prompts,
                  jax.ShapeDtypeStruct((ROWS,), jnp.int32),
                  jax.ShapeDtypeStruct((1,), jnp.int32), jax.random.key(0), cfg=cfg,
                  config=sampling.SamplingConfig(max_new_tokens=new_tokens))


def mesh_2x2x2() -> jax.sharding.Mesh:
    return parallel.make_mesh((2, 2, 2))


def test_the_sharded_train_step_lowers_for_tpu_on_an_fsdp_and_tensor_mesh():
    """8 devices as (data 2, fsdp 2, tensor 2): every argument keeps the sharding the run
    gives it in the export, and splash runs per shard (a Mosaic kernel left for XLA to
    partition fails: the next test)."""
    mesh = mesh_2x2x2()
    step = train_step(stand_in("llama3"), rows=8, mesh=mesh)
    exported = export(step.fn, "tpu", *step.args)
    lowers_with(exported, "tpu", "splash")
    assert exported.nr_devices == 8
    args, expected = jax.tree.leaves(step.args), jax.tree.leaves(step.shardings)
    got = exported.in_shardings_jax(mesh)
    assert len(got) == len(expected) == len(args)
    for arg, want, found in zip(args, expected, got):
        assert found.is_equivalent_to(want, len(arg.shape)), (arg.shape, want.spec, found.spec)
    assert any(s.spec != P() for s in got)  # FSDP and tensor axes in use
    assert "sdy.manual_computation" in exported.mlir_module()  # splash's shard_map


def test_the_sharded_train_step_lowers_for_cuda_with_cudnn():
    """The same mesh for CUDA: cuDNN attention partitions itself (custom_partitioning,
    which jax.export cannot serialize: lowered, not exported); parameters keep their
    FSDP and tensor shardings."""
    mesh = mesh_2x2x2()
    step = train_step(stand_in("llama3"), rows=8, mesh=mesh)
    jax.clear_caches()
    with cudnn_installed():
        text = step.fn.trace(*step.args).lower(lowering_platforms=("cuda",)).as_text()
    # cuDNN's call stays behind its partitioner until the CUDA compiler partitions it.
    assert "CustomSPMDPartitioning" in text and SPLASH_CALL not in text
    assert '{sdy.sharding = #sdy.sharding<@mesh, [{"tensor"}, {"fsdp"}]>' in text  # embed


def test_a_mosaic_kernel_outside_shard_map_fails_to_lower():
    """The negative control of the test above: splash traced without the mesh (as a step
    jitted without `parallel.traced_on_mesh` would be) is refused by the TPU lowering."""
    mesh = mesh_2x2x2()
    rows = NamedSharding(mesh, P(("data", "fsdp")))
    q = jax.ShapeDtypeStruct((8, LENGTH, 4, 16), jnp.float32)
    kv = jax.ShapeDtypeStruct((8, LENGTH, 2, 16), jnp.float32)
    segments = jax.ShapeDtypeStruct((8, LENGTH), jnp.int32)
    fn = jax.jit(lambda q, k, v, s: attention.splash_attention(q, k, v, s, None,
                                                               interpret=False),
                 in_shardings=(rows, rows, rows, rows))
    with pytest.raises(NotImplementedError, match="cannot be automatically partitioned"):
        export(fn, "tpu", q, kv, kv, segments)


def test_splash_block_sizes_are_checked_by_the_kernel(monkeypatch):
    """The other negative control: a block that does not tile 128 lanes (what a one-token
    trace once produced) fails the TPU lowering, so the lab step above would have too."""
    monkeypatch.setattr(attention, "splash_block", lambda length: 64)
    step = train_step(lab_model())
    with pytest.raises(ValueError, match="multiple of 128"):
        export(step.fn, "tpu", *step.args)


def test_an_explicit_cudnn_lowers_for_cuda_and_is_refused_with_a_cap():
    step = train_step(lab_model(attention="cudnn"))
    lowers_with(export(step.fn, "cuda", *step.args), "cuda", "cudnn")
    with pytest.raises(ValueError, match="model.attention='cudnn' cannot soft-cap"):
        step = train_step(stand_in("gemma2", attention="cudnn"))
        export(step.fn, "cuda", *step.args)


def test_float32_compute_lowers_for_both_without_cudnn():
    step = train_step(lab_model(compute_dtype="float32"))
    lowers_with(export(step.fn, "tpu", *step.args), "tpu", "splash")
    lowers_with(export(step.fn, "cuda", *step.args), "cuda", None)  # cuDNN needs 16 bits


def test_a_length_splash_cannot_take_lowers_on_xla_for_tpu():
    step = train_step(lab_model())
    state, _, base = step.args
    exported = export(step.fn, "tpu", state, abstract_batch(length=200), base)
    lowers_with(exported, "tpu", None)


def test_without_the_cudnn_library_auto_lowers_xla_for_cuda():
    """Every step traces its CUDA branch, on any machine: without cuDNN (a TPU VM, this
    CPU) the branch is XLA's attention, never a call that asks for the missing library."""
    step = train_step(lab_model())
    lowers_with(export(step.fn, "cuda", *step.args, cudnn=False), "cuda", None)
    lowers_with(export(step.fn, "tpu", *step.args, cudnn=False), "tpu", "splash")


@pytest.mark.parametrize("platform", ["tpu", "cuda"])
@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "gpt_oss"])
def test_moe_train_steps_and_generation_lower(platform, family):
    """Grouped matmuls over sorted tokens, the router's losses in the step
    (scanned Mixtral, unrolled Qwen2-MoE with its dense layer and shared expert, gpt-oss
    with expert biases, whose sinks keep attention on XLA), two micro-batches, and the
    decode loop."""
    cfg = stand_in(family)
    step = train_step(cfg, micro_batches=2, loss=train.LossConfig(router_aux_loss=0.01,
                                                                   router_z_loss=0.001))
    kernel = None if cfg.attention_sinks else AUTO_KERNEL[platform]
    lowers_with(export(step.fn, platform, *step.args), platform, kernel)
    exported = export_generation(cfg, platform, 4)
    # TPU's grouped matmul is ragged_dot; CUDA's the block scan (ragged_dot would expand
    # into a dense matmul against every expert there).
    assert ("ragged_dot" in exported.mlir_module()) == (platform == "tpu")


@pytest.mark.parametrize("platform", ["tpu", "cuda"])
@pytest.mark.parametrize("lora_rank", [0, 4])
def test_the_expert_parallel_moe_step_lowers(platform, lora_rank):
    """Mixtral's experts on a (fsdp 2, expert 2, tensor 2) mesh, trained in full or by
    adapters on attention and experts: every argument keeps the run's sharding (experts
    and their adapters split over the expert axis) and the tokens move by all-gather and
    reduce-scatter inside the experts' shard_map."""
    mesh = parallel.make_mesh((1, 2, 2, 2))
    step = train_step(stand_in("mixtral", attention="xla"), rows=8, mesh=mesh,
                      lora_rank=lora_rank)
    exported = export(step.fn, platform, *step.args)
    got = exported.in_shardings_jax(mesh)
    expected = jax.tree.leaves(step.shardings)
    for arg, want, found in zip(jax.tree.leaves(step.args), expected, got):
        assert found.is_equivalent_to(want, len(arg.shape)), (arg.shape, want.spec, found.spec)
    experts = step.shardings[0].params["layers"]["mlp"]["experts"]
    if lora_rank:
        assert experts["up_proj_lora"]["lora_a"].spec == P(None, "expert", "fsdp", None)
        assert experts["up_proj_lora"]["lora_b"].spec == P(None, "expert", None, "tensor")
    else:
        assert experts["up_proj"].spec == P(None, "expert", "fsdp", "tensor")
    text = exported.mlir_module()
    assert "sdy.manual_computation" in text
    assert "all_gather" in text and "reduce_scatter" in text


@pytest.mark.parametrize("platform", ["tpu", "cuda"])
@pytest.mark.parametrize("family", ["qwen3_5", "qwen3_5_moe"])
def test_hybrid_deltanet_steps_and_generation_lower(platform, family):
    """Qwen3.5: DeltaNet and gated attention layers scanned in groups (its chunked rule's
    triangular solve and scan over chunks, the conv's segment masks), remat, two
    micro-batches, on a (data 2, fsdp 2, tensor 2) mesh; and the decode loop, whose cache
    holds conv inputs and recurrent states beside the keys and values."""
    cfg = stand_in(family, remat="full")
    assert cfg.scan_layers and cfg.scan_period == 2
    step = train_step(cfg, micro_batches=2, rows=8, mesh=mesh_2x2x2())
    if platform == "tpu":
        lowers_with(export(step.fn, platform, *step.args), platform, "splash")
    else:  # cuDNN partitions itself on a mesh, which jax.export cannot serialize: lowered
        jax.clear_caches()
        with cudnn_installed():
            text = step.fn.trace(*step.args).lower(lowering_platforms=("cuda",)).as_text()
        assert "CustomSPMDPartitioning" in text
    lowers_with(export_generation(cfg, platform, 4), platform, None)
