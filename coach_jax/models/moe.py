"""The mixture-of-experts feed-forward: a router, top-k experts per token, dropless.

Every token goes to its `top_k` experts, however unevenly the router spreads them: the
(token, expert) pairs are sorted by expert and each expert's rows go through its weights
as a grouped matmul (TPU: `jax.lax.ragged_dot` with the per-expert row counts; CPU and
GPU: blocks of rows, each expert's padded to a block multiple), so no capacity factor
exists and no token is dropped. Parameters (logical axes in brackets):

    mlp/gate/kernel                 [embed, expert]          the router
    mlp/experts/{gate,up}_proj      [expert, embed, mlp]     SwiGLU experts
    mlp/experts/down_proj           [expert, mlp, embed]
    mlp/experts/{gate,up,down}_bias [expert, mlp | embed]   with MoeSpec.expert_bias
    mlp/experts/*_proj_lora/lora_a  [expert, in, lora_rank]  LoRA on the experts
    mlp/shared_expert/...           a dense Mlp every token passes (Qwen2-MoE)
    mlp/shared_expert_gate/kernel   [embed, None]            its sigmoid gate

With a mesh `expert` axis the experts are sharded over it (`expert_parallel`): each
device gathers its expert group's tokens, computes the pairs routed to its own experts,
and the partial outputs are summed back onto the tokens' devices (reduce-scatter).

Registered as the feed-forward "moe" (layers.FEED_FORWARDS); `ModelConfig.moe` holds the
family's routing rule.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from coach_jax.models import layers, lora
from coach_jax.models.attention import BATCH_AXES, dividing_axes
from coach_jax.models.config import ModelConfig


def is_expert_weight(path: str) -> bool:
    """A parameter path of the experts' stacked weights ("layers/mlp/experts/up_proj"),
    [experts, in, out] per layer (not their biases, [experts, out])."""
    parent, leaf = path.split("/")[-2:] if "/" in path else ("", path)
    return parent == "experts" and leaf.endswith("_proj")


def expert_glu(cfg: ModelConfig):
    """The experts' gated activation glu(gate, up): act(gate) * up, or gpt-oss's clamped
    SwiGLU (`MoeSpec.swiglu_limit`)."""
    spec = cfg.moe
    if spec.swiglu_limit is None:
        act = layers.activation(cfg)
        return lambda gate, up: act(gate) * up
    limit, alpha = spec.swiglu_limit, spec.swiglu_alpha

    def clamped(gate, up):
        gate = jnp.minimum(gate, limit)
        up = jnp.clip(up, -limit, limit)
        return (up + 1) * (gate * jax.nn.sigmoid(gate * alpha))
    return clamped


def route(logits_NxE: jax.Array, top_k: int, normalize: bool
          ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(float32 router probabilities [N, E], the chosen experts [N, k], their weights [N, k]):
    softmax in float32, then the top k, renormalised to sum 1 when `normalize`."""
    probs_NxE = jax.nn.softmax(logits_NxE.astype(jnp.float32), axis=-1)
    weights_NxK, experts_NxK = jax.lax.top_k(probs_NxE, top_k)
    if normalize:
        weights_NxK = weights_NxK / jnp.sum(weights_NxK, axis=-1, keepdims=True)
    return probs_NxE, experts_NxK, weights_NxK


def router_sums(logits_NxE: jax.Array, probs_NxE: jax.Array, experts_NxK: jax.Array,
                real_N: jax.Array) -> dict[str, jax.Array]:
    """One layer's router statistics over its real (non-padding) tokens, as sums so they
    add across layers and micro-batches: (token, expert) assignments per expert, router
    probability per expert, logsumexp(logits)^2 (the z-loss's), and the token count. Read
    with `decoder.hidden_states_and_router`."""
    real = real_N.astype(jnp.float32)
    num_experts = probs_NxE.shape[-1]
    counts_E = jnp.zeros(num_experts, jnp.float32).at[experts_NxK.reshape(-1)].add(
        jnp.repeat(real, experts_NxK.shape[-1]))
    lse_N = jax.nn.logsumexp(logits_NxE.astype(jnp.float32), axis=-1)
    return {"counts": counts_E, "probs": (probs_NxE * real[:, None]).sum(0),
            "z": (lse_N ** 2 * real).sum(), "tokens": real.sum()}


# Rows per block of the block-grouped expert MLP (CPU and GPU): each expert's rows are
# padded to a multiple of it, so at most experts x (BLOCK - 1) padding rows are computed.
BLOCK = 128


def _ragged_mlp(sorted_PxD: jax.Array, sizes_E: jax.Array, gate_ExDxF: jax.Array,
                up_ExDxF: jax.Array, down_ExFxD: jax.Array, glu, biases=None) -> jax.Array:
    """The experts' gated MLP over rows sorted by expert, one `ragged_dot` per weight:
    TPU's grouped matmul. (Elsewhere XLA expands ragged_dot into a dense matmul against
    every expert, experts times the work: see `_block_mlp`.) `biases`: the gate's and up's
    per expert, [E, F] each (gpt-oss), or None."""
    gate_PxF = jax.lax.ragged_dot(sorted_PxD, gate_ExDxF, sizes_E)
    up_PxF = jax.lax.ragged_dot(sorted_PxD, up_ExDxF, sizes_E)
    if biases is not None:
        expert_P = _row_experts(sizes_E, sorted_PxD.shape[0])
        gate_PxF = gate_PxF + jnp.take(biases[0], expert_P, axis=0)
        up_PxF = up_PxF + jnp.take(biases[1], expert_P, axis=0)
    return jax.lax.ragged_dot(glu(gate_PxF, up_PxF), down_ExFxD, sizes_E)


def _row_experts(sizes_E: jax.Array, rows: int) -> jax.Array:
    """The expert of each row sorted by expert (rows past the groups: the last expert)."""
    return jnp.minimum(jnp.searchsorted(jnp.cumsum(sizes_E), jnp.arange(rows), side="right"),
                       sizes_E.shape[0] - 1)


def _block_mlp(sorted_PxD: jax.Array, sizes_E: jax.Array, gate_ExDxF: jax.Array,
               up_ExDxF: jax.Array, down_ExFxD: jax.Array, glu, biases=None,
               block: int = BLOCK) -> jax.Array:
    """The same, as blocks: each expert's rows padded to a multiple of `block` (a static
    bound: rows + experts x (block - 1)), then one scan over the blocks, each a dense
    SwiGLU with its expert's weights. The work is the routed rows' plus the padding,
    whatever the number of experts."""
    rows, _ = sorted_PxD.shape
    num_experts = gate_ExDxF.shape[0]
    blocks = -(-(rows + num_experts * (block - 1)) // block)
    padded_E = -(-sizes_E // block) * block
    padded_end_E = jnp.cumsum(padded_E)
    padded_start_E, start_E = padded_end_E - padded_E, jnp.cumsum(sizes_E) - sizes_E
    slot_R = jnp.arange(blocks * block)  # padded rows: which expert, which sorted row
    expert_R = jnp.minimum(jnp.searchsorted(padded_end_E, slot_R, side="right"),
                           num_experts - 1)
    offset_R = slot_R - padded_start_E[expert_R]
    real_R = (offset_R < sizes_E[expert_R]) & (slot_R < padded_end_E[-1])
    source_R = jnp.where(real_R, start_E[expert_R] + offset_R, 0)
    padded_RxD = jnp.where(real_R[:, None], jnp.take(sorted_PxD, source_R, axis=0), 0)

    used_blocks = padded_end_E[-1] // block  # the rest is the static bound's slack

    def one_block(args):
        x_BxD, expert, index = args
        def swiglu(x_BxD):
            gate_BxF, up_BxF = x_BxD @ gate_ExDxF[expert], x_BxD @ up_ExDxF[expert]
            if biases is not None:
                gate_BxF, up_BxF = gate_BxF + biases[0][expert], up_BxF + biases[1][expert]
            return glu(gate_BxF, up_BxF) @ down_ExFxD[expert]
        def skipped(x_BxD):  # zeros typed as swiglu's (its varying axes in shard_map)
            return jnp.zeros_like(x_BxD) * down_ExFxD[expert, :1]
        return jax.lax.cond(index < used_blocks, swiglu, skipped, x_BxD)
    out_RxD = jax.lax.map(one_block, (padded_RxD.reshape(blocks, block, -1),
                                      expert_R.reshape(blocks, block)[:, 0],
                                      jnp.arange(blocks)))
    expert_P = _row_experts(sizes_E, rows)  # back: sorted row -> its padded slot
    slot_P = padded_start_E[expert_P] + jnp.arange(rows) - start_E[expert_P]
    return jnp.take(out_RxD.reshape(blocks * block, -1), slot_P, axis=0)


def grouped_experts(rows_NxD: jax.Array, experts_NxK: jax.Array, weights_NxK: jax.Array,
                    gate_ExDxF: jax.Array, up_ExDxF: jax.Array, down_ExFxD: jax.Array,
                    glu, first_expert: jax.Array | int = 0, biases=None) -> jax.Array:
    """sum_k weight_k * down_e(glu(gate_e(x), up_e(x))) over each row's chosen experts e,
    dropless: the N*k (row, expert) pairs sorted by expert, then grouped matmuls (TPU's
    ragged_dot, elsewhere blocks: chosen when lowering for the platform).

    `glu(gate, up)` is the gated activation (`expert_glu`); `biases` the gate's and up's
    [E, F] per expert, or None. The weights may be a shard of the experts, from expert
    `first_expert` on: pairs routed to other experts sort last and add nothing."""
    n, k = experts_NxK.shape
    num_experts = gate_ExDxF.shape[0]
    local_P = experts_NxK.reshape(-1) - first_expert
    mine_P = (local_P >= 0) & (local_P < num_experts)
    local_P = jnp.where(mine_P, local_P, num_experts)
    order_P = jnp.argsort(local_P, stable=True)  # pairs grouped by expert
    sizes_E = jnp.bincount(local_P, length=num_experts + 1)[:num_experts].astype(jnp.int32)
    sorted_PxD = jnp.take(rows_NxD, order_P // k, axis=0)
    weights = (gate_ExDxF, up_ExDxF, down_ExFxD)
    out_PxD = jax.lax.platform_dependent(
        sorted_PxD, sizes_E, *weights, biases,
        tpu=lambda *a: _ragged_mlp(*a[:-1], glu, a[-1]),
        default=lambda *a: _block_mlp(*a[:-1], glu, a[-1]))
    unsorted_PxD = jnp.take(out_PxD, jnp.argsort(order_P), axis=0)  # back to (row, k) order
    weights_NxK = jnp.where(mine_P.reshape(n, k), weights_NxK, 0).astype(out_PxD.dtype)
    unsorted_PxD = jnp.where(mine_P[:, None], unsorted_PxD, 0)
    return jnp.einsum("nkd,nk->nd", unsorted_PxD.reshape(n, k, -1), weights_NxK)


def expert_parallel(rows_NxD: jax.Array, experts_NxK: jax.Array, weights_NxK: jax.Array,
                    gate_ExDxF: jax.Array, up_ExDxF: jax.Array, down_ExFxD: jax.Array,
                    glu, biases=None) -> jax.Array:
    """`grouped_experts` with the experts sharded over the context mesh's `expert` axis.

    The tokens of the devices along the expert axis are all-gathered, each device runs
    its E/ep experts over the pairs routed to them, and a reduce-scatter sums the partial
    outputs back onto the tokens' devices (the all-gather dispatcher of Megatron-Core).
    Shapes stay static and nothing is dropped or capped. Per device this moves
    (ep - 1) x tokens x embed each way, against all-to-all's (ep - 1)/ep x top_k x tokens x
    embed: no more whenever ep <= top_k. The price is the static bound: a device's sorted
    rows hold the whole group's pairs (unused blocks are skipped, not computed). The
    `mlp` axis stays split over `tensor` (partial sums added there); FSDP's `embed` split
    is gathered on entry, as FSDP gathers every weight."""
    mesh = jax.sharding.get_abstract_mesh()
    num_experts, _, width = gate_ExDxF.shape
    ep = 1 if mesh.empty else dict(mesh.shape).get("expert", 1)
    if ep == 1 or num_experts % ep:
        return grouped_experts(rows_NxD, experts_NxK, weights_NxK, gate_ExDxF, up_ExDxF,
                               down_ExFxD, glu, biases=biases)
    row_axes = dividing_axes(mesh, rows_NxD.shape[0], BATCH_AXES)
    tensor = dividing_axes(mesh, width, ("tensor",))
    gathered = row_axes is not None and "expert" in row_axes
    row_spec = jax.sharding.PartitionSpec(row_axes, None)
    up_spec = jax.sharding.PartitionSpec("expert", None, tensor)
    down_spec = jax.sharding.PartitionSpec("expert", tensor, None)
    bias_spec = None if biases is None else (jax.sharding.PartitionSpec("expert", tensor),) * 2

    def local(rows, experts, weights, gate, up, down, biases):
        if gathered:
            rows, experts, weights = (jax.lax.all_gather(x, "expert", axis=0, tiled=True)
                                      for x in (rows, experts, weights))
        first = jax.lax.axis_index("expert") * gate.shape[0]
        out = grouped_experts(rows, experts, weights, gate, up, down, glu, first, biases)
        if tensor:
            out = jax.lax.psum(out, tensor)
        if gathered:
            return jax.lax.psum_scatter(out, "expert", scatter_dimension=0, tiled=True)
        return jax.lax.psum(out, "expert")

    return jax.shard_map(local, mesh=mesh,
                         in_specs=(row_spec, row_spec, row_spec, up_spec, up_spec, down_spec,
                                   bias_spec),
                         out_specs=row_spec)(rows_NxD, experts_NxK, weights_NxK,
                                             gate_ExDxF, up_ExDxF, down_ExFxD, biases)


class _Linear(nn.Module):
    """x @ kernel [embed, width] (+ bias): the router (width = experts) and the shared
    expert's gate (width 1). Plain parameters: never LoRA-adapted or quantized."""

    cfg: ModelConfig
    width: int
    axis: str | None
    use_bias: bool = False

    @nn.compact
    def __call__(self, rows_NxD: jax.Array) -> jax.Array:
        cfg = self.cfg
        kernel = layers._param(self, "kernel", nn.initializers.normal(cfg.initializer_range),
                               (cfg.hidden_size, self.width), ("embed", self.axis), cfg)
        out = rows_NxD @ kernel.astype(rows_NxD.dtype)
        if self.use_bias:
            bias = layers._param(self, "bias", nn.initializers.zeros, (self.width,),
                                 (self.axis,), cfg)
            out = out + bias.astype(out.dtype)
        return out


class _Experts(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, rows_NxD: jax.Array, experts_NxK: jax.Array,
                 weights_NxK: jax.Array) -> jax.Array:
        cfg = self.cfg
        e, d, f = cfg.moe.num_experts, cfg.hidden_size, cfg.moe.expert_size
        init = nn.initializers.normal(cfg.initializer_range)
        dtype = rows_NxD.dtype
        def weight(name, shape, axes):
            value = layers._param(self, name, init, shape, axes, cfg)
            if not isinstance(value, jax.Array):  # QLoRA's quantized base
                from coach_jax.models import quantize  # qwix is needed only for QLoRA
                value = quantize.dequantize(value, dtype)
            value = value.astype(dtype)
            if cfg.lora is not None and f"mlp/experts/{name}" in cfg.lora.modules:
                value = lora.ExpertLora(cfg, axes, name=f"{name}_lora")(value)
            return value
        gate = weight("gate_proj", (e, d, f), ("expert", "embed", "mlp"))
        up = weight("up_proj", (e, d, f), ("expert", "embed", "mlp"))
        down = weight("down_proj", (e, f, d), ("expert", "mlp", "embed"))
        biases = None
        if cfg.moe.expert_bias:
            zeros = nn.initializers.zeros
            biases = tuple(layers._param(self, name, zeros, (e, f), ("expert", "mlp"), cfg
                                         ).astype(dtype) for name in ("gate_bias", "up_bias"))
        out_NxD = expert_parallel(rows_NxD, experts_NxK, weights_NxK, gate, up, down,
                                  expert_glu(cfg), biases)
        if cfg.moe.expert_bias:  # down's bias, weighted as its expert's output is
            down_bias = layers._param(self, "down_bias", nn.initializers.zeros, (e, d),
                                      ("expert", "embed"), cfg).astype(dtype)
            out_NxD = out_NxD + jnp.einsum("nk,nkd->nd", weights_NxK.astype(dtype),
                                           jnp.take(down_bias, experts_NxK, axis=0))
        return out_NxD


class MoeFeedForward(nn.Module):
    """The router, the routed experts and the optional shared expert of one layer."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x_BxTxD: jax.Array, segment_ids_BxT: jax.Array) -> jax.Array:
        cfg, spec = self.cfg, self.cfg.moe
        b, t, d = x_BxTxD.shape
        rows_NxD = x_BxTxD.reshape(-1, d)
        logits_NxE = _Linear(cfg, spec.num_experts, None, spec.router_bias,
                             name="gate")(rows_NxD)
        probs_NxE, experts_NxK, weights_NxK = route(logits_NxE, spec.top_k,
                                                    spec.normalize_top_k)
        self.sow("intermediates", "router", router_sums(
            logits_NxE, probs_NxE, experts_NxK, segment_ids_BxT.reshape(-1) > 0))
        out_NxD = _Experts(cfg, name="experts")(rows_NxD, experts_NxK, weights_NxK)
        if spec.shared_expert_size:
            shared_NxD = layers.Mlp(cfg, spec.shared_expert_size, name="shared_expert")(rows_NxD)
            gate_Nx1 = _Linear(cfg, 1, None, name="shared_expert_gate")(rows_NxD)
            out_NxD = out_NxD + jax.nn.sigmoid(gate_Nx1) * shared_NxD
        return out_NxD.reshape(b, t, d)


layers.register_feed_forward("moe", MoeFeedForward)
