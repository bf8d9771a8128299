"""Rotary position embeddings (rotate-half layout, as in Hugging Face Llama)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from coach_jax.models.config import LinearRopeScaling, ModelConfig


def inverse_frequencies(cfg: ModelConfig, theta: float | None = None,
                        scaled: bool = True) -> np.ndarray:
    """float32 [rotary_dim // 2], computed as transformers does so angles match bit for
    bit (rotary_dim = head_dim unless the family rotates only part of each head). `theta`
    and `scaled=False` give Gemma 3's local layers their own base without scaling."""
    dim = cfg.rotary_dim
    exponents = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)
    base = np.float32(cfg.rope_theta if theta is None else theta)
    inv_freq = (1.0 / (base ** exponents)).astype(np.float32)
    scaling = cfg.rope_scaling if scaled else None
    if scaling is None:
        return inv_freq
    if isinstance(scaling, LinearRopeScaling):
        return (inv_freq / np.float32(scaling.factor)).astype(np.float32)
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


def tables(positions_BxT: jax.Array, inv_freq: np.ndarray) -> tuple[jax.Array, jax.Array]:
    """cos and sin [B, T, 1, H] in float32: computed once per forward, used by every layer."""
    angles_BxTxH2 = positions_BxT[..., None].astype(jnp.float32) * jnp.asarray(inv_freq)
    angles_BxTx1xH = jnp.concatenate([angles_BxTxH2, angles_BxTxH2], axis=-1)[:, :, None, :]
    return jnp.cos(angles_BxTx1xH), jnp.sin(angles_BxTx1xH)


def rotate(x_BxTxNxH: jax.Array, cos_sin: tuple[jax.Array, jax.Array]) -> jax.Array:
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
