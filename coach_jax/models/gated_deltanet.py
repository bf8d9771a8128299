"""Gated DeltaNet: the linear-attention token mixer of Qwen3.5's hybrid layers.

Each value head keeps a state S [key_dim, value_dim] that decays by exp(g_t) and is
corrected by the delta rule at every token: S <- exp(g_t) S + k_t beta_t (v_t - k_t S),
and reads out o_t = q_t S. Training runs the rule chunk-wise (`chunked_delta_rule`: the
within-chunk part as matmuls, a scan over chunks carries S); decoding runs it token by
token (`recurrent_delta_rule`). Both restart the state where the segment id changes and
the causal conv1d before it never reaches across a segment boundary, so every example of
a packed row computes what it computes alone.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from coach_jax.models.config import ModelConfig
from coach_jax.models.layers import _param, _projections

CHUNK_SIZE = 64  # transformers' and FLA's chunk length
# While decoding: this layer's (conv inputs [B, W-1, C], recurrent state [B, H, K, V]) and
# the segment ids of the W-1 tokens before the new ones [B, W-1] (shared by all layers).
State = tuple[jax.Array, jax.Array]


def l2_normalize(x: jax.Array, eps: float = 1e-6) -> jax.Array:
    """x / sqrt(sum x^2 + eps) over the last axis, in float32 (FLA's and transformers')."""
    x = x.astype(jnp.float32)
    return x * jax.lax.rsqrt(jnp.sum(x * x, axis=-1, keepdims=True) + eps)


def recurrent_delta_rule(q_BxTxHxK: jax.Array, k_BxTxHxK: jax.Array, v_BxTxHxV: jax.Array,
                         g_BxTxH: jax.Array, beta_BxTxH: jax.Array, segment_ids_BxT: jax.Array,
                         state_BxHxKxV: jax.Array | None = None,
                         state_segment_B: jax.Array | None = None
                         ) -> tuple[jax.Array, jax.Array]:
    """The gated delta rule one token at a time (float32): outputs [B, T, H, V] and the
    final state. q and k come normalised and q scaled; the state (of the token whose
    segment is `state_segment_B`) is dropped where a new segment starts."""
    batch, _, heads, key_dim = q_BxTxHxK.shape
    if state_BxHxKxV is None:
        state_BxHxKxV = jnp.zeros((batch, heads, key_dim, v_BxTxHxV.shape[-1]), jnp.float32)
        state_segment_B = segment_ids_BxT[:, 0]
    inputs = [jnp.moveaxis(x.astype(jnp.float32), 1, 0)
              for x in (q_BxTxHxK, k_BxTxHxK, v_BxTxHxV, g_BxTxH, beta_BxTxH)]

    def step(carry, xs):
        state, previous = carry
        q, k, v, g, beta, segment = xs
        keep = (segment == previous)[:, None, None, None]
        state = jnp.where(keep, state * jnp.exp(g)[..., None, None], 0.0)
        delta = (v - jnp.einsum("bhk,bhkv->bhv", k, state)) * beta[..., None]
        state = state + k[..., :, None] * delta[..., None, :]
        return (state, segment), jnp.einsum("bhk,bhkv->bhv", q, state)

    (state, _), out = jax.lax.scan(step, (state_BxHxKxV.astype(jnp.float32), state_segment_B),
                                   (*inputs, jnp.moveaxis(segment_ids_BxT, 1, 0)))
    return jnp.moveaxis(out, 0, 1), state


def chunked_delta_rule(q_BxTxHxK: jax.Array, k_BxTxHxK: jax.Array, v_BxTxHxV: jax.Array,
                       g_BxTxH: jax.Array, beta_BxTxH: jax.Array, segment_ids_BxT: jax.Array,
                       state_BxHxKxV: jax.Array | None = None,
                       state_segment_B: jax.Array | None = None,
                       chunk_size: int = CHUNK_SIZE) -> tuple[jax.Array, jax.Array]:
    """`recurrent_delta_rule` chunk by chunk (the WY / UT form of the delta rule).

    Within a chunk the T^-1 system (a unit lower-triangular solve) turns the sequential
    corrections into matmuls; only the state passes from chunk to chunk. Pairs of tokens
    of different segments are masked out of the chunk's matrices, tokens whose segment
    began in this chunk read nothing of the carried state, and the state leaves the chunk
    with only the last token's segment in it. The length is padded to whole chunks with
    tokens that neither decay nor write (g = 0, beta = 0) in the last segment, so the
    final state is the last real token's."""
    batch, length, heads, key_dim = q_BxTxHxK.shape
    value_dim = v_BxTxHxV.shape[-1]
    if state_BxHxKxV is None:
        state_BxHxKxV = jnp.zeros((batch, heads, key_dim, value_dim), jnp.float32)
        state_segment_B = segment_ids_BxT[:, 0]
    pad = -length % chunk_size
    chunks = (length + pad) // chunk_size

    def chunked(x, fill=0.0):  # [B, T, ...] -> [B, N, C, ...] in float32, padded
        x = x.astype(jnp.float32) if fill == 0.0 else x
        widths = [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2)
        x = jnp.pad(x, widths) if fill == 0.0 else jnp.pad(x, widths, mode="edge")
        return x.reshape(batch, chunks, chunk_size, *x.shape[2:])

    q, k, v = chunked(q_BxTxHxK), chunked(k_BxTxHxK), chunked(v_BxTxHxV)
    g, beta = chunked(g_BxTxH), chunked(beta_BxTxH)  # [B, N, C, H]
    segments = chunked(segment_ids_BxT, fill="edge")  # [B, N, C]
    # Head-major within each chunk: [B, N, H, C, ...].
    q, k, v = (jnp.swapaxes(x, 2, 3) for x in (q, k, v))
    g, beta = jnp.swapaxes(g, 2, 3), jnp.swapaxes(beta, 2, 3)
    cum = jnp.cumsum(g, axis=-1)  # log decay from the chunk's start to each token
    causal = jnp.tril(jnp.ones((chunk_size, chunk_size), bool))
    same_CxC = (segments[..., :, None] == segments[..., None, :]) & causal  # [B, N, C, C]
    same = same_CxC[:, :, None]
    # exp(cum_i - cum_j) for j <= i in one segment, else 0 (masked before exp: no overflow).
    decay = jnp.exp(jnp.where(same, cum[..., :, None] - cum[..., None, :], -jnp.inf))
    k_beta, v_beta = k * beta[..., None], v * beta[..., None]
    strictly_lower = jnp.tril(jnp.ones((chunk_size, chunk_size), bool), -1)
    # The UT system is I + L, L strictly lower: the corrections tokens make to each other.
    lower = jnp.where(strictly_lower, (k_beta @ jnp.swapaxes(k, -1, -2)) * decay, 0.0)
    # Which tokens' segment was already running when the chunk began (they see the state).
    previous = jnp.concatenate([state_segment_B[:, None], segments[:, :-1, -1]], axis=1)
    carried = (segments == previous[..., None])[:, :, None]  # [B, N, 1, C]
    inverse = unit_lower_inverse(lower)
    new_values = inverse @ v_beta
    k_decayed = inverse @ (k_beta * (jnp.exp(cum) * carried)[..., None])
    intra = (q @ jnp.swapaxes(k, -1, -2)) * decay
    q_decayed = q * (jnp.exp(cum) * carried)[..., None]
    # Each token's share of the state leaving the chunk: decayed to its end, last segment only.
    last_segment = segments[..., -1:] == segments  # [B, N, C]
    to_end = jnp.exp(cum[..., -1:] - cum) * last_segment[:, :, None]
    k_to_end = k * to_end[..., None]
    end_decay = (jnp.exp(cum[..., -1]) * carried[..., -1])[..., None, None]  # [B, N, H, 1, 1]

    def step(state, xs):
        new_values, k_decayed, q_decayed, intra, k_to_end, end_decay = xs
        corrected = new_values - k_decayed @ state
        out = q_decayed @ state + intra @ corrected
        state = state * end_decay + jnp.swapaxes(k_to_end, -1, -2) @ corrected
        return state, out

    xs = [jnp.moveaxis(x, 1, 0) for x in
          (new_values, k_decayed, q_decayed, intra, k_to_end, end_decay)]
    state, out = jax.lax.scan(step, state_BxHxKxV.astype(jnp.float32), xs)
    out = jnp.moveaxis(out, 0, 1)  # [B, N, H, C, V]
    out = jnp.swapaxes(out, 2, 3).reshape(batch, chunks * chunk_size, heads, value_dim)
    return out[:, :length], state


def unit_lower_inverse(lower: jax.Array) -> jax.Array:
    """(I + L)^-1 for strictly lower-triangular L [..., C, C], built row by row by forward
    substitution (row i = e_i - L_i (rows before i)): C - 1 steps of one small matmul. Substitution keeps the triangular solve's
    accuracy (a power series of L cancels catastrophically when decays are near 1);
    XLA's CPU triangular solve deadlocked when batched inside the rule's scan."""
    size = lower.shape[-1]

    def row(i, inverse):
        lower_i = jax.lax.dynamic_slice_in_dim(lower, i, 1, axis=-2)  # [..., 1, C]
        unit_i = jax.lax.dynamic_slice_in_dim(inverse, i, 1, axis=-2)  # e_i so far
        return jax.lax.dynamic_update_slice_in_dim(inverse, unit_i - lower_i @ inverse, i,
                                                   axis=-2)

    inverse = jnp.broadcast_to(jnp.eye(size, dtype=lower.dtype), lower.shape)
    return jax.lax.fori_loop(1, size, row, inverse)


def causal_conv(x_BxTxC: jax.Array, weight_CxW: jax.Array, segment_ids_BxT: jax.Array,
                history_BxHxC: jax.Array | None = None,
                history_segments_BxH: jax.Array | None = None
                ) -> tuple[jax.Array, jax.Array]:
    """The depthwise causal conv1d, then SiLU: out_t = sum_s w[W-1-s] x_{t-s} over the
    taps in token t's segment. `history` holds the W-1 inputs before x (decoding) with
    their segment ids. Returns (output [B, T, C], the last W-1 inputs: the next history)."""
    batch, length, channels = x_BxTxC.shape
    width = weight_CxW.shape[-1]
    if history_BxHxC is None:
        history_BxHxC = jnp.zeros((batch, width - 1, channels), x_BxTxC.dtype)
        history_segments_BxH = jnp.full((batch, width - 1), -1, segment_ids_BxT.dtype)
    x = jnp.concatenate([history_BxHxC.astype(x_BxTxC.dtype), x_BxTxC], axis=1)
    segments = jnp.concatenate([history_segments_BxH.astype(segment_ids_BxT.dtype),
                                segment_ids_BxT], axis=1)
    out = jnp.zeros((batch, length, channels), jnp.float32)
    for shift in range(width):
        start = width - 1 - shift
        tap = x[:, start:start + length].astype(jnp.float32)
        same = segments[:, start:start + length] == segment_ids_BxT
        out = out + jnp.where(same[..., None], tap, 0.0) * weight_CxW[:, width - 1 - shift]
    return nn.silu(out).astype(x_BxTxC.dtype), x[:, -(width - 1):]


class GatedRMSNorm(nn.Module):
    """RMSNorm of each head's output (weights start at 1, not 1 + w), times SiLU(z)."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x: jax.Array, gate: jax.Array) -> jax.Array:
        cfg = self.cfg
        scale = _param(self, "scale", nn.initializers.ones, (x.shape[-1],), ("head_dim",), cfg)
        dtype = x.dtype
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True)
                                     + cfg.rms_norm_eps)
        out = scale.astype(dtype) * normed.astype(dtype)
        return (out * nn.silu(gate.astype(jnp.float32))).astype(dtype)


class DepthwiseConvWeight(nn.Module):
    """The conv1d's weight in transformers' layout [channels, 1, width] (`conv1d.weight`)."""

    cfg: ModelConfig
    channels: int

    @nn.compact
    def __call__(self) -> jax.Array:
        width = self.cfg.deltanet.conv_kernel
        return _param(self, "weight", nn.initializers.variance_scaling(
            1.0, "fan_in", "uniform", in_axis=(1, 2), out_axis=0),
            (self.channels, 1, width), ("deltanet_qkv", None, None), self.cfg)


class GatedDeltaNet(nn.Module):
    """Qwen3.5's linear attention: in_proj_qkv -> causal conv + SiLU -> q, k, v; beta =
    sigmoid(in_proj_b), g = -exp(A_log) softplus(in_proj_a + dt_bias); the gated delta
    rule over L2-normalised q, k; GatedRMSNorm with in_proj_z; out_proj. With `state`
    (decoding) it continues from the cached conv inputs and recurrent state, whose
    tokens' segment ids are `history_segments_BxH` and `state_segment_B`."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x_BxTxD: jax.Array, segment_ids_BxT: jax.Array,
                 state: State | None = None, history_segments_BxH: jax.Array | None = None,
                 state_segment_B: jax.Array | None = None
                 ) -> tuple[jax.Array, State | None]:
        cfg, spec = self.cfg, self.cfg.deltanet
        batch, length, _ = x_BxTxD.shape
        heads = spec.num_value_heads
        channels = 2 * spec.key_dim + spec.value_dim
        make = _projections(cfg, self.name)
        def proj(name, axis, size):
            return make(name, ("embed",), (axis,), (size,), False)
        mixed = proj("in_proj_qkv", "deltanet_qkv", channels)(x_BxTxD)
        z = proj("in_proj_z", "deltanet_value", spec.value_dim)(x_BxTxD)
        b = proj("in_proj_b", "deltanet_heads", heads)(x_BxTxD)
        a = proj("in_proj_a", "deltanet_heads", heads)(x_BxTxD)
        conv_weight = DepthwiseConvWeight(cfg, channels, name="conv1d")()
        mixed, history = causal_conv(mixed, conv_weight[:, 0, :].astype(jnp.float32),
                                     segment_ids_BxT, None if state is None else state[0],
                                     history_segments_BxH)
        q, k, v = jnp.split(mixed, [spec.key_dim, 2 * spec.key_dim], axis=-1)
        q = q.reshape(batch, length, spec.num_key_heads, spec.key_head_dim)
        k = k.reshape(batch, length, spec.num_key_heads, spec.key_head_dim)
        v = v.reshape(batch, length, heads, spec.value_head_dim)
        group = heads // spec.num_key_heads  # key head i serves value heads i*group, ...
        q = jnp.repeat(l2_normalize(q), group, axis=2) * spec.key_head_dim ** -0.5
        k = jnp.repeat(l2_normalize(k), group, axis=2)
        a_log = _param(self, "A_log", _log_uniform, (heads,), ("deltanet_heads",), cfg)
        dt_bias = _param(self, "dt_bias", nn.initializers.ones, (heads,), ("deltanet_heads",),
                         cfg)
        beta = jax.nn.sigmoid(b.astype(jnp.float32))
        g = -jnp.exp(a_log.astype(jnp.float32)) * jax.nn.softplus(
            a.astype(jnp.float32) + dt_bias.astype(jnp.float32))
        recurrent = None if state is None else state[1]
        rule = recurrent_delta_rule if state is not None and length == 1 else chunked_delta_rule
        out, recurrent = rule(q, k, v, g, beta, segment_ids_BxT, recurrent, state_segment_B)
        out = GatedRMSNorm(cfg, name="norm")(
            out.astype(x_BxTxD.dtype), z.reshape(batch, length, heads, spec.value_head_dim))
        out = make("out_proj", ("deltanet_value",), ("embed",), (cfg.hidden_size,), False)(
            out.reshape(batch, length, spec.value_dim))
        new_state = None if state is None else (history.astype(state[0].dtype),
                                                recurrent.astype(state[1].dtype))
        return out, new_state


def _log_uniform(key: jax.Array, shape: tuple[int, ...], dtype=jnp.float32) -> jax.Array:
    """log A with A uniform in [0.01, 16] (transformers' initialisation of A_log)."""
    return jnp.log(jax.random.uniform(key, shape, jnp.float32, 0.01, 16.0)).astype(dtype)
