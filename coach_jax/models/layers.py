"""Flax Linen building blocks of the decoder: RMSNorm, attention, SwiGLU MLP, one layer.

Every parameter is declared with logical axis names (vocab, embed, heads, kv_heads,
head_dim, mlp, and `layers` when scanned) so sharding rules can map them onto a mesh
without touching this file.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from coach_jax.models import attention, kv_cache, projection, rope
from coach_jax.models.config import ModelConfig

# While decoding: what all layers share (kv_cache.Slots: the slots' positions and segment
# ids, the write index, the segment ids of the tokens before the new ones), and the cache's
# per-layer arrays (kv_cache.LayerStates: attention layers' keys and values, DeltaNet layers'
# conv inputs and recurrent states), carried through the layers so each writes its own
# slot in place. Both are None in training.
CacheSlots = kv_cache.Slots | None
KV = kv_cache.LayerStates | None
# In training: the keys and values of layers that later layers reuse (Gemma 4's KV
# sharing), by layer; an empty dict otherwise (and under scan, where no layer reuses).
Shared = dict[int, tuple[jax.Array, jax.Array]] | None


def _param(module: nn.Module, name: str, init, shape: Sequence[int],
           axes: tuple[str, ...], cfg: ModelConfig) -> jax.Array:
    return module.param(name, nn.with_logical_partitioning(init, axes), tuple(shape),
                        jnp.dtype(cfg.param_dtype))


class RMSNorm(nn.Module):
    """Normalises in float32, then scales in the compute dtype (as HF Llama does), or by
    (1 + w) in float32 with `cfg.norm_unit_offset` (Gemma)."""

    cfg: ModelConfig
    axis_name: str = "embed"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        offset = self.cfg.norm_unit_offset  # Gemma: scale by (1 + w), w starting at 0
        init = nn.initializers.zeros if offset else nn.initializers.ones
        scale = _param(self, "scale", init, (x.shape[-1],), (self.axis_name,), self.cfg)
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True)
                                     + self.cfg.rms_norm_eps)
        dtype = jnp.dtype(self.cfg.compute_dtype)
        if offset:  # scaled in float32, cast after (as transformers' Gemma)
            return (normed * (1.0 + scale.astype(jnp.float32))).astype(dtype)
        return scale.astype(dtype) * normed.astype(dtype)


class Projection(nn.Module):
    """A linear map contracting the last `len(in_axes)` dims, with named kernel axes.

    The one place a weight is read, so parameter transformations plug in here: the
    `projection.Strategy` that `cfg.projection` names declares the kernel (dense: one
    `kernel` parameter) and may add parameters that change the output (LoRA) or hold the
    weight in another representation (quantized). `group` names the projections the
    checkpoint fuses into one tensor ("qkv", "gate_up"); `shared` is the strategy's module
    of parameters shared by that group, living on the parent module.
    """

    cfg: ModelConfig
    in_axes: tuple[str, ...]
    out_axes: tuple[str, ...]
    out_shape: tuple[int, ...]
    use_bias: bool = False
    group: str | None = None
    shared: nn.Module | None = None

    def declare(self, name: str, init, shape: Sequence[int], axes: tuple[str, ...]
                ) -> jax.Array:
        """A parameter of this projection in the param dtype, with logical axis names."""
        return _param(self, name, init, shape, axes, self.cfg)

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.cfg
        strategy = projection.STRATEGIES[cfg.projection]
        n_in = len(self.in_axes)
        in_shape = x.shape[-n_in:]
        kernel = strategy.kernel(self, in_shape)
        dtype = jnp.dtype(cfg.compute_dtype)
        # One 2-D matmul over flattened rows: XLA's backward pass for a kernel contracted
        # over several batch dims is much slower on CPU than for a plain [rows, in] input.
        rows = x.reshape(-1, math.prod(in_shape)).astype(dtype)
        flat_kernel = kernel.reshape(math.prod(in_shape), -1).astype(dtype)
        y = strategy.adapt(self, rows, rows @ flat_kernel)
        y = y.reshape(*x.shape[:-n_in], *self.out_shape)
        if self.use_bias:
            bias = _param(self, "bias", nn.initializers.zeros, self.out_shape, self.out_axes, cfg)
            y = y + bias.astype(dtype)
        return y


def _projections(cfg: ModelConfig, parent: str) -> Callable[..., Projection]:
    """Makes the projections of module `parent` (call it in the parent's `__call__`): each
    gets its group, and the members of a group one shared module from the strategy."""
    strategy = projection.STRATEGIES[cfg.projection]
    shared: dict[str, nn.Module | None] = {}

    def make(name: str, in_axes: tuple[str, ...], out_axes: tuple[str, ...],
             out_shape: tuple[int, ...], use_bias: bool) -> Projection:
        group = cfg.projection_group(f"{parent}/{name}")
        if group is not None and group not in shared:
            shared[group] = strategy.shared(cfg, group)
        return Projection(cfg, in_axes, out_axes, out_shape, use_bias, group,
                          shared.get(group), name=name)
    return make


def _norm_all_heads(cfg: ModelConfig, name: str, x_BxTxNxH: jax.Array) -> jax.Array:
    """OLMo 2's q/k norm: one RMSNorm over the whole projection (heads x head_dim), its scale
    of that width. The scale is replicated ("all_heads" has no mesh axis); with heads split
    over the tensor axis, XLA reduces the mean across it."""
    b, t, n, h = x_BxTxNxH.shape
    normed = RMSNorm(cfg, "all_heads", name=name)(x_BxTxNxH.reshape(b, t, n * h))
    return normed.reshape(b, t, n, h)


def _rotate(cfg: ModelConfig, layer: jax.Array | int, window: jax.Array | int,
            rope_tables: Any, q_BxTxNxH: jax.Array, k_BxTxKxH: jax.Array | None,
            mixer: str = "attention") -> tuple[jax.Array, jax.Array | None]:
    """RoPE on queries and keys, in the layers `cfg.rope_layers` gives it to (all, unless
    the family has layers without position encoding: SmolLM3). With Gemma 3's two tables
    (global, local), sliding-window layers take the local one."""
    if cfg.local_rope_theta is not None:
        (global_cos, global_sin), (local_cos, local_sin) = rope_tables
        if "global_attention" in cfg.mixers:  # the tables' widths differ: by mixer
            rope_tables = ((global_cos, global_sin) if mixer == "global_attention"
                           else (local_cos, local_sin))
        elif isinstance(window, int):
            rope_tables = (local_cos, local_sin) if window else (global_cos, global_sin)
        else:
            rope_tables = (jnp.where(window > 0, local_cos, global_cos),
                           jnp.where(window > 0, local_sin, global_sin))
    if k_BxTxKxH is None:  # a layer reusing another's keys rotates its queries only
        return rope.rotate(q_BxTxNxH, rope_tables), None
    rotated = rope.rotate(q_BxTxNxH, rope_tables), rope.rotate(k_BxTxKxH, rope_tables)
    if all(cfg.rope_layers):
        return rotated
    if isinstance(layer, int):  # unrolled layers: known here
        return rotated if cfg.rope_layers[layer] else (q_BxTxNxH, k_BxTxKxH)
    use = jnp.asarray(cfg.rope_layers)[layer]  # scanned layers: this layer's flag
    return jnp.where(use, rotated[0], q_BxTxNxH), jnp.where(use, rotated[1], k_BxTxKxH)


class Attention(nn.Module):
    """Grouped-query self-attention with RoPE, optional q/k RMSNorm and sliding window.

    With a KV cache (`slots`, `kv`) the new tokens' keys and values are written into layer
    `layer`'s part of the cache and the queries attend over all of it; returns (output, kv,
    shared). `mixer` "global_attention" takes the full layers' own geometry (Gemma 4). A
    layer that reuses an earlier layer's keys and values (`cfg.kv_sources`) has no k/v
    projections: it reads them from `shared` (training: what earlier layers put there,
    by layer) or from that layer's cache slot.
    """

    cfg: ModelConfig
    mixer: str = "attention"

    @nn.compact
    def __call__(self, x_BxTxD: jax.Array, positions_BxT: jax.Array, segment_ids_BxT: jax.Array,
                 rope_tables: tuple[jax.Array, jax.Array], window: jax.Array | int,
                 slots: CacheSlots = None, kv: KV = None, layer: jax.Array | int = 0,
                 shared: Shared = None) -> tuple[jax.Array, KV, Shared]:
        cfg = self.cfg
        head_dim, kv_heads = cfg.attention_geometry(self.mixer)
        reuses = isinstance(layer, int) and cfg.reuses_kv(layer)
        make = _projections(cfg, self.name)
        def proj(name, heads_axis, n_heads):
            return make(name, ("embed",), (heads_axis, "head_dim"), (n_heads, head_dim),
                        cfg.qkv_bias)
        if cfg.attention_output_gate:  # Qwen3.5: each head's query, then its gate
            q_and_gate = make("q_proj", ("embed",), ("heads", "head_dim"),
                              (cfg.num_heads, 2 * head_dim), cfg.qkv_bias)(x_BxTxD)
            q_BxTxNxH, gate_BxTxNxH = jnp.split(q_and_gate, 2, axis=-1)
        else:
            q_BxTxNxH = proj("q_proj", "heads", cfg.num_heads)(x_BxTxD)
        k_BxTxKxH = v_BxTxKxH = None
        if not reuses:
            k_BxTxKxH = proj("k_proj", "kv_heads", kv_heads)(x_BxTxD)
            if cfg.attention_k_eq_v and self.mixer == "global_attention":
                v_BxTxKxH = k_BxTxKxH  # Gemma 4's full layers: values are the keys' projection
            else:
                v_BxTxKxH = proj("v_proj", "kv_heads", kv_heads)(x_BxTxD)
            if cfg.v_norm:  # per head, no scale (Gemma 4)
                v_BxTxKxH = _unscaled_norm(cfg, v_BxTxKxH)
        if cfg.qk_norm and cfg.qk_norm_all_heads:
            q_BxTxNxH = _norm_all_heads(cfg, "q_norm", q_BxTxNxH)
            k_BxTxKxH = _norm_all_heads(cfg, "k_norm", k_BxTxKxH)
        elif cfg.qk_norm:
            q_BxTxNxH = RMSNorm(cfg, "head_dim", name="q_norm")(q_BxTxNxH)
            if not reuses:
                k_BxTxKxH = RMSNorm(cfg, "head_dim", name="k_norm")(k_BxTxKxH)
        q_BxTxNxH, k_BxTxKxH = _rotate(cfg, layer, window, rope_tables, q_BxTxNxH,
                                       k_BxTxKxH, self.mixer)
        if reuses and kv is None:
            k_BxTxKxH, v_BxTxKxH = shared[cfg.kv_sources[layer]]
        elif shared is not None and isinstance(layer, int) and layer in cfg.kv_sources:
            shared = {**shared, layer: (k_BxTxKxH, v_BxTxKxH)}
        layer_window = window if cfg.has_sliding_window else None
        scale = (cfg.query_pre_attn_scalar ** -0.5 if cfg.query_pre_attn_scalar is not None
                 else None)
        sinks_N = (_param(self, "sinks", nn.initializers.zeros, (cfg.num_heads,), ("heads",),
                          cfg) if cfg.attention_sinks else None)
        if kv is not None:
            slot = kv_cache.slot(cfg, layer)
            keys_field, values_field = kv_cache.attention_fields(self.mixer)
            keys, values = getattr(kv, keys_field), getattr(kv, values_field)
            if reuses:  # the source layer wrote this call's tokens already
                k_BxSxKxH, v_BxSxKxH = keys[slot], values[slot]
            else:
                keys, k_BxSxKxH = kv_cache.write(keys, k_BxTxKxH, slot, slots.index)
                values, v_BxSxKxH = kv_cache.write(values, v_BxTxKxH, slot, slots.index)
                kv = kv._replace(**{keys_field: keys, values_field: values})
            mask = attention.attention_mask(positions_BxT, slots.positions_BxS,
                                            segment_ids_BxT, slots.segment_ids_BxS,
                                            layer_window)
            out_BxTxNxH = attention.dot_product_attention(
                q_BxTxNxH, k_BxSxKxH.astype(q_BxTxNxH.dtype),
                v_BxSxKxH.astype(q_BxTxNxH.dtype), mask, scale=scale,
                softcap=cfg.attn_logit_softcapping, sinks_N=sinks_N)
        else:
            out_BxTxNxH = attention.attend(
                cfg.attention, q_BxTxNxH, k_BxTxKxH, v_BxTxKxH, positions_BxT,
                segment_ids_BxT, layer_window, windows=tuple(sorted(set(cfg.layer_windows))),
                scale=scale, softcap=cfg.attn_logit_softcapping, sinks_N=sinks_N)
        if cfg.attention_output_gate:
            out_BxTxNxH = out_BxTxNxH * jax.nn.sigmoid(gate_BxTxNxH.astype(jnp.float32)
                                                       ).astype(out_BxTxNxH.dtype)
        out_BxTxNxH = checkpoint_name(out_BxTxNxH, "attention_out")
        return make("o_proj", ("heads", "head_dim"), ("embed",), (cfg.hidden_size,),
                    cfg.o_bias)(out_BxTxNxH), kv, shared


def _unscaled_norm(cfg: ModelConfig, x: jax.Array) -> jax.Array:
    """RMSNorm over the last axis without a scale, in float32 (Gemma 4's v_norm)."""
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + cfg.rms_norm_eps)
    return normed.astype(x.dtype)


# transformers' activation names; gelu_pytorch_tanh is the tanh approximation (Gemma's
# GeGLU), which differs from exact gelu by ~1e-3 in the logits.
_ACTIVATIONS = {"silu": nn.silu,
                "gelu_pytorch_tanh": functools.partial(jax.nn.gelu, approximate=True)}


def activation(cfg: ModelConfig) -> Callable[[jax.Array], jax.Array]:
    """The MLP's gate activation (transformers' `hidden_act`)."""
    return _ACTIVATIONS[cfg.activation]


class Mlp(nn.Module):
    """A gated MLP: down(act(gate(x)) * up(x)); SwiGLU, or GeGLU for Gemma. `size` is its
    intermediate width when not `cfg.intermediate_size` (Qwen2-MoE's shared expert)."""

    cfg: ModelConfig
    size: int | None = None

    @nn.compact
    def __call__(self, x_BxTxD: jax.Array) -> jax.Array:
        cfg = self.cfg
        width = self.size or cfg.intermediate_size
        make = _projections(cfg, self.name)
        def proj(name, in_axis, out_axis, size):
            return make(name, (in_axis,), (out_axis,), (size,), cfg.mlp_bias)
        gate = proj("gate_proj", "embed", "mlp", width)(x_BxTxD)
        up = proj("up_proj", "embed", "mlp", width)(x_BxTxD)
        hidden = activation(cfg)(gate) * up
        return proj("down_proj", "mlp", "embed", cfg.hidden_size)(hidden)


# A layer's feed-forward other than the dense MLP ("mlp"), by the name
# `ModelConfig.feed_forward` gives it: a module built as Module(cfg, name="mlp") and called
# on the normed hidden states [B, T, D] and the segment ids [B, T] (0: padding, which a
# router must not count). models/moe.py registers "moe".
FEED_FORWARDS: dict[str, Callable[..., nn.Module]] = {}


def register_feed_forward(name: str, module: Callable[..., nn.Module]) -> None:
    """Makes `module` selectable as a layer's feed-forward `name`."""
    if name in FEED_FORWARDS:
        raise ValueError(f"feed-forward {name!r} is already registered")
    FEED_FORWARDS[name] = module


def _feed_forward(cfg: ModelConfig, kind: str, x_BxTxD: jax.Array,
                  segment_ids_BxT: jax.Array) -> jax.Array:
    """Layer kind `kind`'s feed-forward of x, as parameters named `mlp/...`."""
    if kind == "mlp":
        return Mlp(cfg, name="mlp")(x_BxTxD)
    if kind == "wide_mlp":  # Gemma 4's KV-sharing layers: twice the intermediate width
        return Mlp(cfg, 2 * cfg.intermediate_size, name="mlp")(x_BxTxD)
    if kind not in FEED_FORWARDS:
        raise ValueError(f"feed-forward {kind!r} is not registered; registered: "
                         f"mlp, {', '.join(FEED_FORWARDS)}")
    return FEED_FORWARDS[kind](cfg, name="mlp")(x_BxTxD, segment_ids_BxT)


class DecoderLayer(nn.Module):
    """Pre-norm residual block (post-norms: OLMo 2; sandwich norms: Gemma). Its carry is
    (x, kv, shared) so `nn.scan` can thread the hidden states, the KV cache (None in
    training) and the keys and values later layers reuse (Gemma 4) through the layers;
    `layer` is its index, `per_layer_input` its PLE input [B, T, P] (Gemma 4; else
    unused)."""

    cfg: ModelConfig
    kind: str = "mlp"  # its feed-forward: a name of ModelConfig.feed_forward
    mixer: str = "attention"  # its token mixer: a name of ModelConfig.mixers

    @nn.compact
    def __call__(self, carry: tuple[jax.Array, KV, Shared], positions_BxT: jax.Array,
                 segment_ids_BxT: jax.Array, rope_tables: tuple[jax.Array, jax.Array],
                 window: jax.Array | int, slots: CacheSlots, layer: jax.Array | int,
                 per_layer_input: jax.Array | None = None
                 ) -> tuple[tuple[jax.Array, KV, Shared], None]:
        cfg = self.cfg
        x_BxTxD, kv, shared = carry
        if self.mixer == "gated_deltanet":
            attend = functools.partial(_linear_attention, cfg)
        else:
            attend = Attention(cfg, self.mixer, name="self_attn")
        def mix(h):
            nonlocal kv, shared
            out, kv, shared = attend(h, positions_BxT, segment_ids_BxT, rope_tables, window,
                                     slots, kv, layer, shared)
            return out
        if cfg.post_norms:  # OLMo 2: x + norm(attn(x)), then x + norm(mlp(x))
            x_BxTxD = x_BxTxD + RMSNorm(cfg, name="post_attention_layernorm")(mix(x_BxTxD))
            mlp_out = _feed_forward(cfg, self.kind, x_BxTxD, segment_ids_BxT)
            x_BxTxD = x_BxTxD + RMSNorm(cfg, name="post_feedforward_layernorm")(mlp_out)
        elif cfg.sandwich_norms:  # Gemma: a norm before and after attention and MLP each
            attended = mix(RMSNorm(cfg, name="input_layernorm")(x_BxTxD))
            x_BxTxD = x_BxTxD + RMSNorm(cfg, name="post_attention_layernorm")(attended)
            h = RMSNorm(cfg, name="pre_feedforward_layernorm")(x_BxTxD)
            mlp_out = _feed_forward(cfg, self.kind, h, segment_ids_BxT)
            x_BxTxD = x_BxTxD + RMSNorm(cfg, name="post_feedforward_layernorm")(mlp_out)
        else:
            x_BxTxD = x_BxTxD + mix(RMSNorm(cfg, name="input_layernorm")(x_BxTxD))
            h = RMSNorm(cfg, name="post_attention_layernorm")(x_BxTxD)
            x_BxTxD = x_BxTxD + _feed_forward(cfg, self.kind, h, segment_ids_BxT)
        if cfg.per_layer_input_size:  # Gemma 4's PLE: a gated, projected per-layer input
            make = _projections(cfg, "")
            gate = make("per_layer_input_gate", ("embed",), ("per_layer",),
                        (cfg.per_layer_input_size,), False)(x_BxTxD)
            h = activation(cfg)(gate) * per_layer_input.astype(gate.dtype)
            h = make("per_layer_projection", ("per_layer",), ("embed",), (cfg.hidden_size,),
                     False)(h)
            x_BxTxD = x_BxTxD + RMSNorm(cfg, name="post_per_layer_input_norm")(h)
        if cfg.layer_scalar:  # a buffer in transformers: it never trains
            scalar = _param(self, "layer_scalar", nn.initializers.ones, (1,), (None,), cfg)
            x_BxTxD = x_BxTxD * jax.lax.stop_gradient(scalar).astype(x_BxTxD.dtype)
        return (x_BxTxD, kv, shared), None


def _linear_attention(cfg: ModelConfig, x_BxTxD: jax.Array, positions_BxT: jax.Array,
                      segment_ids_BxT: jax.Array, rope_tables: Any, window: jax.Array | int,
                      slots: CacheSlots, kv: KV, layer: jax.Array | int,
                      shared: Shared = None) -> tuple[jax.Array, KV, Shared]:
    """A Gated DeltaNet layer's token mixer (`linear_attn`), called as attention is; with
    a cache it continues from its slot's conv inputs and state and writes them back."""
    from coach_jax.models.gated_deltanet import GatedDeltaNet
    del positions_BxT, rope_tables, window  # no positions: the state orders the tokens
    mixer = GatedDeltaNet(cfg, name="linear_attn")
    if kv is None:
        return mixer(x_BxTxD, segment_ids_BxT)[0], kv, shared
    slot = kv_cache.slot(cfg, layer)
    out, (conv, recurrent) = mixer(x_BxTxD, segment_ids_BxT,
                                   (kv.conv[slot], kv.recurrent[slot]),
                                   slots.history_segments_BxW, slots.last_segment_B)
    return out, kv._replace(conv=kv.conv.at[slot].set(conv),
                            recurrent=kv.recurrent.at[slot].set(recurrent)), shared
