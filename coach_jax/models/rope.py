"""Rotary position embeddings (rotate-half layout, as in Hugging Face Llama)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from coach_jax.models.config import (LinearRopeScaling, LongRopeScaling, ModelConfig,
                                     ProportionalRopeScaling, YarnRopeScaling)

Tables = tuple[jax.Array, jax.Array]


def inverse_frequencies(cfg: ModelConfig, theta: float | None = None,
                        scaled: bool = True, long: bool = False) -> np.ndarray:
    """float32 [rotary_dim // 2], computed as transformers does so angles match bit for
    bit (rotary_dim = head_dim unless the family rotates only part of each head). `theta`
    and `scaled=False` give Gemma 3's local layers their own base without scaling; `long`
    picks LongRoPE's long factors."""
    scaling = cfg.rope_scaling if scaled else None
    if isinstance(scaling, ProportionalRopeScaling):
        return _proportional_frequencies(cfg, scaling)
    dim = cfg.rotary_dim
    exponents = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)
    base = np.float32(cfg.rope_theta if theta is None else theta)
    wavelengths = (base ** exponents).astype(np.float32)  # per channel pair, over 2 pi
    inv_freq = (1.0 / wavelengths).astype(np.float32)
    if scaling is None:
        return inv_freq
    if isinstance(scaling, LinearRopeScaling):
        return (inv_freq / np.float32(scaling.factor)).astype(np.float32)
    if isinstance(scaling, LongRopeScaling):
        factors = np.asarray(scaling.long_factor if long else scaling.short_factor, np.float32)
        return (1.0 / (factors * base ** exponents)).astype(np.float32)
    if isinstance(scaling, YarnRopeScaling):
        return _yarn_frequencies(scaling, dim, float(base), wavelengths)
    old_context = scaling.original_max_position_embeddings
    low_freq_wavelen = old_context / scaling.low_freq_factor
    high_freq_wavelen = old_context / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > low_freq_wavelen, inv_freq / scaling.factor, inv_freq)
    smooth = ((old_context / wavelen - scaling.low_freq_factor)
              / (scaling.high_freq_factor - scaling.low_freq_factor))
    smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    medium = ~(wavelen < high_freq_wavelen) & ~(wavelen > low_freq_wavelen)
    return np.where(medium, smoothed, scaled).astype(np.float32)


def _proportional_frequencies(cfg: ModelConfig, scaling: ProportionalRopeScaling
                              ) -> np.ndarray:
    """float32 [head_dim // 2] for the full layers' head (Gemma 4's global_head_dim):
    theta^(-2i / head_dim) for the first partial_rotary_factor of the pairs, 0 (no
    rotation) for the rest, all divided by the factor (transformers'
    `_compute_proportional_rope_parameters`)."""
    dim = cfg.attention_geometry("global_attention")[0]
    angles = int(scaling.partial_rotary_factor * dim // 2)
    exponents = (np.arange(0, 2 * angles, 2, dtype=np.int64).astype(np.float32)
                 / np.float32(dim))
    rotated = (1.0 / (np.float32(cfg.rope_theta) ** exponents)).astype(np.float32)
    inv_freq = np.concatenate([rotated, np.zeros(dim // 2 - angles, np.float32)])
    return (inv_freq / np.float32(scaling.factor)).astype(np.float32)


def _yarn_frequencies(scaling: YarnRopeScaling, dim: int, base: float,
                      wavelengths: np.ndarray) -> np.ndarray:
    """YaRN's blend of interpolated (inv_freq / factor) and kept frequencies: a linear
    ramp over the channel pairs between the ones that turn `beta_fast` and `beta_slow`
    times within the original context (transformers' `_compute_yarn_parameters`)."""
    def pair_turning(rotations: float) -> float:
        return (dim * math.log(scaling.original_max_position_embeddings
                               / (rotations * 2 * math.pi))) / (2 * math.log(base))
    low, high = pair_turning(scaling.beta_fast), pair_turning(scaling.beta_slow)
    if scaling.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # as transformers: no zero-width ramp
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - np.float32(low))
                   / np.float32(high - low), 0, 1)
    kept = (1 - ramp).astype(np.float32)
    interpolated = (1.0 / (np.float32(scaling.factor) * wavelengths)).astype(np.float32)
    extrapolated = (1.0 / wavelengths).astype(np.float32)
    return (interpolated * (1 - kept) + extrapolated * kept).astype(np.float32)


def example_lengths(positions_BxT: jax.Array, segment_ids_BxT: jax.Array) -> jax.Array:
    """int32 [B, T]: the length of the example each token belongs to, as far as this call
    sees it (its run of one segment id; positions count from 0 within it): the largest
    position of the run plus one. A reverse running minimum finds each run's end, so a
    batch sharded by rows needs no communication."""
    batch, length = positions_BxT.shape
    positions_BxT = positions_BxT.astype(jnp.int32)
    ends_BxT = jnp.concatenate([
        (segment_ids_BxT[:, 1:] != segment_ids_BxT[:, :-1])
        | (positions_BxT[:, 1:] <= positions_BxT[:, :-1]),
        jnp.ones((batch, 1), bool)], axis=1)
    index_BxT = jnp.where(ends_BxT, jnp.arange(length, dtype=jnp.int32), length)
    run_end_BxT = jax.lax.cummin(index_BxT, axis=1, reverse=True)
    return jnp.take_along_axis(positions_BxT, run_end_BxT, axis=1) + 1


def position_tables(cfg: ModelConfig, positions_BxT: jax.Array,
                    segment_ids_BxT: jax.Array) -> Tables | tuple[Tables, Tables]:
    """The cos/sin tables every layer of one forward rotates with; with Gemma 3's local
    RoPE, (full layers', sliding layers').

    LongRoPE's rule: a token rotates with the long factors when its example is longer
    than `original_max_position_embeddings`, else the short ones. transformers decides
    once per forward from the batch's largest position; deciding per example gives every
    example, packed or padded, what transformers computes for it alone."""
    scaling = cfg.rope_scaling
    if isinstance(scaling, LongRopeScaling):
        long_BxTx1 = (example_lengths(positions_BxT, segment_ids_BxT)
                      > scaling.original_max_position_embeddings)[..., None]
        inv_freq = jnp.where(long_BxTx1, inverse_frequencies(cfg, long=True),
                             inverse_frequencies(cfg))
        cos, sin = tables(positions_BxT, inv_freq)
        return cos * scaling.attention_factor, sin * scaling.attention_factor
    full = tables(positions_BxT, inverse_frequencies(cfg))
    if isinstance(scaling, YarnRopeScaling):
        full = full[0] * scaling.attention_factor, full[1] * scaling.attention_factor
    if cfg.local_rope_theta is None:
        return full
    local = inverse_frequencies(cfg, cfg.local_rope_theta, scaled=False)
    return full, tables(positions_BxT, local)


def tables(positions_BxT: jax.Array, inv_freq: np.ndarray | jax.Array) -> Tables:
    """cos and sin [B, T, 1, H] in float32 from inverse frequencies [H/2] (or one set per
    token, [B, T, H/2])."""
    angles_BxTxH2 = positions_BxT[..., None].astype(jnp.float32) * jnp.asarray(inv_freq)
    angles_BxTx1xH = jnp.concatenate([angles_BxTxH2, angles_BxTxH2], axis=-1)[:, :, None, :]
    return jnp.cos(angles_BxTx1xH), jnp.sin(angles_BxTx1xH)


def rotate(x_BxTxNxH: jax.Array, cos_sin: Tables) -> jax.Array:
    """Rotates each head by its token's position; math in float32, result in x's dtype.
    Tables narrower than the head rotate its first channels and pass the rest (partial
    rotary, as transformers' Phi-3)."""
    cos, sin = cos_sin
    width = cos.shape[-1]
    x = x_BxTxNxH[..., :width].astype(jnp.float32)
    half = width // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    out = (x * cos + rotated * sin).astype(x_BxTxNxH.dtype)
    if width == x_BxTxNxH.shape[-1]:
        return out
    return jnp.concatenate([out, x_BxTxNxH[..., width:]], axis=-1)


def apply_rope(x_BxTxNxH: jax.Array, positions_BxT: jax.Array, inv_freq: np.ndarray) -> jax.Array:
    return rotate(x_BxTxNxH, tables(positions_BxT, inv_freq))
