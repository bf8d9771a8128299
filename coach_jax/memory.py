"""Will it fit? A per-device memory estimate before anything compiles.

Parameters, gradients and optimizer state are counted exactly from their shapes, dtypes and
shardings. Activations are an estimate of what the backward pass keeps per layer for one
micro-batch on one device, following the remat policy; the LM head is chunked, so only one
chunk's logits count. The check refuses a run whose estimate exceeds the device's memory
(times a headroom) and says what would help.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import numpy as np

from coach_jax.models.config import ModelConfig
from coach_jax.parallel import shard_fraction

GIB = 2**30


def human(size: float) -> str:
    return f"{size / GIB:.2f} GiB" if size >= 0.1 * GIB else f"{size / 2**20:.1f} MiB"


class DoesNotFitError(RuntimeError):
    """The run will not fit on the devices."""


@dataclasses.dataclass(frozen=True)
class MemoryEstimate:
    params: float
    gradients: float
    optimizer: float
    activations: float

    @property
    def total(self) -> float:
        return self.params + self.gradients + self.optimizer + self.activations

    def describe(self) -> str:
        parts = ", ".join(f"{k} {human(v)}" for k, v in dataclasses.asdict(self).items())
        return f"{human(self.total)} per device ({parts})"


def _per_device(abstract_tree: Any, shardings: Any) -> float:
    leaves = zip(jax.tree.leaves(abstract_tree), jax.tree.leaves(shardings))
    return float(sum(np.prod(x.shape) * _itemsize(x.dtype) * shard_fraction(s)
                     for x, s in leaves))


def _itemsize(dtype: Any) -> float:
    """Bytes per element as the device stores it: 4-bit codes (QLoRA's int4 and NF4) two
    to a byte on accelerators, one per byte on CPU."""
    if np.dtype(dtype).itemsize == 1 and "4" in np.dtype(dtype).name:
        return 1.0 if jax.default_backend() == "cpu" else 0.5
    return float(np.dtype(dtype).itemsize)


def base_bytes(base: Any) -> float:
    """A frozen base's bytes per device (placed arrays, or shapes counted whole)."""
    leaves = jax.tree.leaves(base)
    return float(sum(np.prod(x.shape) * _itemsize(x.dtype)
                     * (shard_fraction(x.sharding) if getattr(x, "sharding", None) else 1.0)
                     for x in leaves))


def attention_widths(cfg: ModelConfig) -> tuple[float, float]:
    """(query width, key + value width) of an attention layer, averaged over the
    attention layers: Gemma 4's full layers have their own head dim and KV heads, and a
    layer reusing another's keys and values projects none."""
    layers = [i for i, m in enumerate(cfg.mixers) if m != "gated_deltanet"] or [0]
    q = kv = 0.0
    for i in layers:
        head_dim, kv_heads = cfg.attention_geometry(cfg.mixers[i])
        q += cfg.num_heads * head_dim
        kv += 0 if cfg.reuses_kv(i) else 2 * kv_heads * head_dim
    return q / len(layers), kv / len(layers)


def dequantized_layer_bytes(cfg: ModelConfig) -> float:
    """One decoder layer's projection kernels in the compute dtype: what a QLoRA forward
    (and its recomputation in the backward pass) holds dequantized at a time."""
    q, kv = attention_widths(cfg)
    d = cfg.hidden_size
    mlp = 3 * d * cfg.intermediate_size
    if cfg.moe is not None:  # an MoE layer dequantizes every expert
        spec = cfg.moe
        mlp = _layer_mean(cfg, mlp, 3 * d * (spec.num_experts * spec.expert_size
                                             + spec.shared_expert_size))
    weights = d * (2 * q + kv) + mlp
    return float(weights * np.dtype(cfg.compute_dtype).itemsize)


def adapted_expert_bytes(cfg: ModelConfig) -> float:
    """One layer's adapted expert weights with their update folded in (W + scale A B, in
    the compute dtype), as a LoRA forward on the experts builds them; 0 without."""
    if cfg.moe is None or cfg.lora is None:
        return 0.0
    from coach_jax.models.lora import EXPERT_MODULES
    adapted = sum(m in cfg.lora.modules for m in EXPERT_MODULES)
    spec = cfg.moe
    per_layer = adapted * cfg.hidden_size * spec.num_experts * spec.expert_size
    return float(_layer_mean(cfg, 0, per_layer) * np.dtype(cfg.compute_dtype).itemsize)


def _layer_mean(cfg: ModelConfig, dense: float, moe: float) -> float:
    """A per-layer figure averaged over the layers, dense MLP ones and MoE ones."""
    kinds = cfg.feed_forward
    return (dense * kinds.count("mlp") + moe * kinds.count("moe")) / cfg.num_layers


def _mixer_mean(cfg: ModelConfig, attention: float, deltanet: float) -> float:
    """A per-layer figure averaged over the layers, attention ones and DeltaNet ones."""
    kinds = cfg.mixers
    return (attention * kinds.count("attention")
            + deltanet * kinds.count("gated_deltanet")) / cfg.num_layers


def deltanet_bytes(cfg: ModelConfig, width: int) -> float:
    """Bytes per token a Gated DeltaNet layer's backward keeps of its token mixer: the
    conv's input and output channels, z and the gates (compute dtype), and per value head
    the float32 rows of the chunked rule (decay, solved system, within-chunk scores, the
    corrected values and decayed keys: models/gated_deltanet.py). Against XLA's CPU plan
    of the compiled step at hidden 256 and 1024 tokens the estimate is as close as for
    attention layers: 10% under with remat, 17% without."""
    from coach_jax.models.gated_deltanet import CHUNK_SIZE
    spec = cfg.deltanet
    channels = 2 * spec.key_dim + spec.value_dim
    heads = spec.num_value_heads
    rule = heads * (10 * CHUNK_SIZE + 4 * spec.key_head_dim + 4 * spec.value_head_dim)
    return float((2 * channels + 2 * spec.value_dim + 2 * heads) * width + rule * 4)


def _keys_per_query(seq_len: int, block: int = 64) -> float:
    """Keys a query attends to on average with the XLA path's 64-query blocks, which
    skip the keys past their block (attention.dot_product_attention)."""
    blocks = -(-seq_len // block)
    return sum(min((i + 1) * block, seq_len) for i in range(blocks)) / blocks


def expert_exchange(cfg: ModelConfig, expert_shards: int = 1) -> float:
    """Bytes per local token an MoE layer keeps for its routed experts: the k experts'
    SwiGLU set and the sorted rows in and out. Under expert parallelism a device computes
    for its expert group's gathered tokens, a static bound of `expert_shards` times the
    pairs (models/moe.py), plus the gathered rows themselves."""
    spec, d = cfg.moe, cfg.hidden_size
    width = np.dtype(cfg.compute_dtype).itemsize
    per_pair = 6 * spec.expert_size + 2 * d
    gathered = d if expert_shards > 1 else 0
    return float(expert_shards * (spec.top_k * per_pair + gathered) * width)


def activation_bytes(cfg: ModelConfig, rows: int, seq_len: int, chunk_tokens: int,
                     quantized: bool = False, expert_shards: int = 1) -> float:
    """What one micro-batch's backward pass keeps on one device (an estimate).

    Counted from what autodiff saves of one decoder layer (per token, in the compute
    dtype): the MLP's gate, up, their activation and product and its pieces (6 F), the
    residual stream, norms and projections (8 D + 3 q + kv; less the inputs of projections
    that train no weight), and on the XLA attention path
    the float32 scores and probabilities of every query block (fused kernels keep one
    log-sum-exp per head). Without remat every layer's set is kept, plus one layer's
    working set for its backward; `full` keeps each layer's inputs and recomputes one
    layer at a time; `dots` keep the matmul outputs. Measured against XLA's compiled step
    on CPU: within 6% for the shapes tests/test_parallel.py compares.
    """
    from coach_jax.models import attention
    tokens = rows * seq_len
    width = np.dtype(cfg.compute_dtype).itemsize
    d, f = cfg.hidden_size, cfg.intermediate_size
    q, kv = attention_widths(cfg)
    path = "cudnn" if cfg.attention == "cudnn" else attention.choose(  # planned for a GPU
        cfg.attention, attention.runtime_platform(), attention.AttentionShape(
            seq_len, cfg.head_dim, cfg.compute_dtype, cfg.attn_logit_softcapping,
            cfg.attention_sinks)
    ).implementation
    scores = (cfg.num_heads * _keys_per_query(seq_len) * 4 if path == "xla"
              else cfg.num_heads * 4)  # per token, float32
    # A projection whose weight does not train (a LoRA run's untargeted ones) needs no
    # saved input for a weight gradient.
    trained = set(cfg.lora.modules) if cfg.lora is not None else None
    inputs_of = {("self_attn/q_proj", "self_attn/k_proj", "self_attn/v_proj"): d,
                 ("self_attn/o_proj",): q, ("mlp/gate_proj", "mlp/up_proj"): d,
                 ("mlp/down_proj",): f}
    unsaved = sum(size for modules, size in inputs_of.items()
                  if trained is not None and not trained & set(modules))
    mlp_trains = trained is None or any(m.startswith("mlp/") for m in trained)
    mlp = 6 * f if mlp_trains else 3 * f  # a frozen MLP: gate, up, one product suffice
    if cfg.moe is not None:  # an MoE layer keeps its k experts' set per token, the shared
        # expert's, and the sorted rows in and out
        mlp = _layer_mean(cfg, mlp, 6 * cfg.moe.shared_expert_size
                          + expert_exchange(cfg, expert_shards) / width)
    mixer = (3 * q + kv) * width + 2 * scores  # an attention layer's
    if cfg.deltanet is not None:  # DeltaNet layers keep their rule's chunk matrices instead
        mixer = _mixer_mean(cfg, mixer, deltanet_bytes(cfg, width))
    layer_set = tokens * ((mlp + 8 * d - unsaved) * width + mixer)
    inputs = tokens * 2 * d * width  # a layer's input and residual
    kept = {"none": layer_set,
            "full": inputs,
            "dots": tokens * ((q + kv + 4 * d + 2 * f) * width + scores),
            "dots_no_batch": tokens * (q + kv + 4 * d + 2 * f) * width,
            "save_attention": inputs}[cfg.remat]  # XLA keeps no more than for full
    # The backward pass's working set: one layer's, or a scanned group's layers' (the scan
    # body recomputes them together).
    working = cfg.scan_period if cfg.scan_layers else 1
    layers = cfg.num_layers * kept + working * layer_set
    if quantized:  # the dequantized kernels: kept per layer without remat (the backward
        # pass's input gradients read them), else the one layer being recomputed. XLA's
        # CPU step fuses some dequantizations into their matmuls and keeps a few others.
        layers += (cfg.num_layers if cfg.remat == "none" else 1) * \
            dequantized_layer_bytes(cfg)
    elif merged := adapted_expert_bytes(cfg):  # the experts with their LoRA folded in
        layers += (cfg.num_layers if cfg.remat == "none" else 1) * merged
    chunk = min(chunk_tokens or tokens, tokens)
    logits = chunk * cfg.vocab_size * 4 * 3  # logits, softmax, gradient of one chunk
    return float(layers + logits + 2 * tokens * cfg.hidden_size * 4)


def estimate(abstract_state: Any, state_shardings: Any, trainable: Any, cfg: ModelConfig,
             rows_per_device: int, seq_len: int, chunk_tokens: int,
             base: Any = None, quantized: bool = False) -> MemoryEstimate:
    """`base`: an adapter run's frozen base (placed arrays or shapes), outside the state;
    `quantized`: held as QLoRA codes, dequantized one layer at a time."""
    params = _per_device(abstract_state.params, state_shardings.params)
    if base is not None:
        params += base_bytes(base)
    trainable_leaves = [(x, s) for x, s, keep in zip(
        jax.tree.leaves(abstract_state.params), jax.tree.leaves(state_shardings.params),
        jax.tree.leaves(trainable, is_leaf=lambda v: v is None)) if keep is not None]
    gradients = float(sum(np.prod(x.shape) * np.dtype(x.dtype).itemsize * shard_fraction(s)
                          for x, s in trainable_leaves))
    optimizer = _per_device(abstract_state.opt_state, state_shardings.opt_state)
    mesh = jax.tree.leaves(state_shardings)[0].mesh
    activations = activation_bytes(cfg, rows_per_device, seq_len, chunk_tokens, quantized,
                                   dict(mesh.shape).get("expert", 1))
    return MemoryEstimate(params, gradients, optimizer, activations)


def parameter_counts(cfg: ModelConfig) -> tuple[int, int]:
    """(all parameters, those one token passes through): a mixture of experts' tokens
    use `top_k` of its experts."""
    from coach_jax.models.decoder import param_shapes, path_str
    from coach_jax.models.moe import is_expert_weight
    total = active = 0
    for key_path, leaf in jax.tree_util.tree_flatten_with_path(param_shapes(cfg))[0]:
        size = int(np.prod(leaf.shape))
        total += size
        routed = cfg.moe is not None and is_expert_weight(path_str(key_path))
        active += size * cfg.moe.top_k // cfg.moe.num_experts if routed else size
    return total, active


def device_bytes() -> float | None:
    """The first local device's memory, where the backend reports it (GPU, TPU)."""
    stats = jax.local_devices()[0].memory_stats() or {}
    return stats.get("bytes_limit")


def check(found: MemoryEstimate, budget: float | None, headroom: float, mesh_shape,
          micro_batches: int, remat: str, adapter: Any = None) -> None:
    """Raises with suggestions when the estimate exceeds `headroom` of the budget.
    `adapter`: the run's AdapterSettings (what an adapter run can change)."""
    if budget is None or found.total <= headroom * budget:
        return
    data, fsdp = mesh_shape[0], mesh_shape[1]
    hints = []
    weights = found.params + found.optimizer + found.gradients
    if weights > 0.5 * found.total:
        if adapter is None or not adapter.enabled:
            hints.append("train an adapter on the frozen base (adapter.kind=lora; with "
                         "adapter.quantize_base=nf4 the base takes about a quarter)")
        elif adapter.quantize_base in ("none", "int8"):
            hints.append("hold the base quantized (adapter.quantize_base=nf4)")
        if adapter is not None and adapter.enabled and found.optimizer + found.gradients > \
                0.2 * found.total:
            hints.append(f"a lower adapter.rank (now {adapter.rank})")
    if weights > 0.5 * found.total and data > 1:
        hints.append(f"shard parameters and optimizer state over more devices (mesh.fsdp="
                     f"{fsdp * data}, mesh.data=1)")
    if found.activations > 0.3 * found.total:
        if remat == "none":
            hints.append("recompute activations (model.remat=full)")
        hints.append(f"more micro-batches (train.micro_batches={micro_batches * 2})")
    hints.append("a smaller train.global_batch_size or data.max_seq_len")
    raise DoesNotFitError(
        f"this run needs about {found.describe()}, more than {headroom:.0%} of the "
        f"{human(budget)} a device has. Try: {'; '.join(hints)}.")
