"""Attention kernels behind one signature, so fused paths can replace the XLA one.

Masks are built from positions and segment ids, never from array indices: the same
function serves packed training rows (positions restart per example) and, later, a KV
cache whose keys carry their own positions.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def attention_mask(q_positions: jax.Array, kv_positions: jax.Array, q_segment_ids: jax.Array,
                   kv_segment_ids: jax.Array, window: jax.Array | int | None) -> jax.Array:
    """Boolean [B, 1, T, S]: causal within a segment, optionally a sliding window.

    `window` w > 0 keeps keys with q_pos - kv_pos < w (HF's convention: the query plus
    w - 1 keys before it); 0 or None means full causal attention.
    """
    q_pos = q_positions[:, None, :, None]
    kv_pos = kv_positions[:, None, None, :]
    mask = (q_segment_ids[:, None, :, None] == kv_segment_ids[:, None, None, :]) & (kv_pos <= q_pos)
    if window is not None:
        window = jnp.asarray(window)
        mask &= (window <= 0) | (q_pos - kv_pos < window)
    return mask


def dot_product_attention(q_BxTxNxH: jax.Array, k_BxSxKxH: jax.Array, v_BxSxKxH: jax.Array,
                          mask_Bx1xTxS: jax.Array, block_size: int = 64) -> jax.Array:
    """Scaled dot-product attention with grouped KV heads (N a multiple of K).

    Logits and softmax run in float32 whatever the input dtype. For self-attention over
    T > block_size, queries go in blocks that only see the keys up to their block's end:
    rows are causal in index order (positions rise within each packed example), so the
    skipped keys are masked anyway. That halves the work and keeps each block's scores in
    cache; the result is the same.
    """
    length = q_BxTxNxH.shape[1]
    if k_BxSxKxH.shape[1] != length or length <= block_size or length % block_size:
        return _attend(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, mask_Bx1xTxS)
    blocks = []
    for start in range(0, length, block_size):
        end = start + block_size
        blocks.append(_attend(q_BxTxNxH[:, start:end], k_BxSxKxH[:, :end],
                              v_BxSxKxH[:, :end], mask_Bx1xTxS[:, :, start:end, :end]))
    return jnp.concatenate(blocks, axis=1)


def _attend(q, k, v, mask):
    return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation="xla")
