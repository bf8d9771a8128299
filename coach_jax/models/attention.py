"""Attention kernels behind one signature, so fused paths can replace the XLA one.

Masks are built from positions and segment ids, never from array indices: the same
function serves packed training rows (positions restart per example) and, later, a KV
cache whose keys carry their own positions.
"""

from __future__ import annotations

import functools

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


IMPLEMENTATIONS = ("auto", "xla", "cudnn", "splash")


def choose(implementation: str, compute_dtype: str, softcap: float | None = None) -> str:
    """`auto`: cuDNN's fused kernel on GPU (16-bit compute), splash on TPU, XLA elsewhere.
    cuDNN's kernel has no logit soft-capping: with a cap, `auto` never picks it and an
    explicit `cudnn` is an error (never a silently different model)."""
    if implementation == "cudnn" and softcap:
        raise ValueError("model.attention='cudnn' cannot soft-cap attention logits "
                         f"(attn_logit_softcapping={softcap}); use 'auto' or 'xla'")
    if implementation != "auto":
        return implementation
    backend = jax.default_backend()
    if backend == "gpu" and compute_dtype in ("bfloat16", "float16") and not softcap:
        return "cudnn"
    if backend == "tpu":
        return "splash"
    return "xla"


def attend(implementation: str, q_BxTxNxH: jax.Array, k_BxSxKxH: jax.Array,
           v_BxSxKxH: jax.Array, positions_BxT: jax.Array, segment_ids_BxT: jax.Array,
           window: jax.Array | int | None, static_window: int | None = None,
           scale: float | None = None, softcap: float | None = None) -> jax.Array:
    """Causal, segment-aware self-attention by the named implementation; all give the same
    result (tests compare them with the XLA path). `static_window` is the sliding window
    when every layer shares it (fused kernels need it at trace time). `scale` replaces
    head_dim**-0.5; `softcap` bends scores to cap * tanh(s / cap) before the mask (Gemma)."""
    if implementation == "splash":
        if window is not None and static_window is None:
            raise ValueError("splash attention needs the same sliding window in every layer")
        return splash_attention(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, segment_ids_BxT,
                                static_window, scale=scale, softcap=softcap)
    mask = attention_mask(positions_BxT, positions_BxT, segment_ids_BxT, segment_ids_BxT,
                          window)
    if implementation == "cudnn":  # one fused kernel; the dense mask carries the segments
        return jax.nn.dot_product_attention(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, mask=mask,
                                            scale=scale, implementation="cudnn")
    return dot_product_attention(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, mask, scale=scale,
                                 softcap=softcap)


def splash_attention(q_BxTxNxH: jax.Array, k_BxSxKxH: jax.Array, v_BxSxKxH: jax.Array,
                     segment_ids_BxT: jax.Array, window: int | None,
                     interpret: bool | None = None, scale: float | None = None,
                     softcap: float | None = None) -> jax.Array:
    """TPU splash attention with segment ids (Pallas; `interpret` runs it anywhere, slowly).

    Grouped heads run as one multi-query kernel per KV head. Rows are causal in index
    order within each segment, which is what the position-based mask means for packed rows.
    """
    from jax.experimental.pallas.ops.tpu.splash_attention import (
        splash_attention_kernel as kernel_lib, splash_attention_mask as mask_lib)
    batch, length, heads, head_dim = q_BxTxNxH.shape
    kv_heads = k_BxSxKxH.shape[2]
    group = heads // kv_heads
    if interpret is None:
        interpret = jax.default_backend() != "tpu"
    shape = (length, length)
    mask = (mask_lib.LocalMask(shape, (window - 1, 0), 0) if window
            else mask_lib.CausalMask(shape))
    block = min(length, 512)
    sizes = kernel_lib.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block,
                                  block_q_dkv=block, block_kv_dkv=block,
                                  block_kv_dkv_compute=block, block_q_dq=block,
                                  block_kv_dq=block)
    kernel = kernel_lib.make_splash_mqa_single_device(
        mask_lib.MultiHeadMask([mask] * group), block_sizes=sizes, interpret=interpret,
        attn_logits_soft_cap=softcap)
    scale = head_dim ** -0.5 if scale is None else scale
    # [B, T, K*G, H] -> [B, K, G, T, H]; keys [B, T, K, H] -> [B, K, T, H]
    q = (q_BxTxNxH * scale).reshape(batch, length, kv_heads, group, head_dim)
    q = q.transpose(0, 2, 3, 1, 4)
    k = k_BxSxKxH.transpose(0, 2, 1, 3)
    v = v_BxSxKxH.transpose(0, 2, 1, 3)

    def one_row(q_KxGxTxH, k_KxTxH, v_KxTxH, segments_T):
        ids = kernel_lib.SegmentIds(q=segments_T, kv=segments_T)
        return jax.vmap(lambda qq, kk, vv: kernel(qq, kk, vv, segment_ids=ids))(
            q_KxGxTxH, k_KxTxH, v_KxTxH)

    out = jax.vmap(one_row)(q, k, v, segment_ids_BxT)  # [B, K, G, T, H]
    return out.transpose(0, 3, 1, 2, 4).reshape(batch, length, heads, head_dim).astype(
        q_BxTxNxH.dtype)


def dot_product_attention(q_BxTxNxH: jax.Array, k_BxSxKxH: jax.Array, v_BxSxKxH: jax.Array,
                          mask_Bx1xTxS: jax.Array, block_size: int = 64,
                          scale: float | None = None, softcap: float | None = None
                          ) -> jax.Array:
    """Scaled dot-product attention with grouped KV heads (N a multiple of K).

    Logits and softmax run in float32 whatever the input dtype. For self-attention over
    T > block_size, queries go in blocks that only see the keys up to their block's end:
    rows are causal in index order (positions rise within each packed example), so the
    skipped keys are masked anyway. That halves the work and keeps each block's scores in
    cache; the result is the same.
    """
    length = q_BxTxNxH.shape[1]
    attend_block = functools.partial(_attend, scale=scale, softcap=softcap)
    if k_BxSxKxH.shape[1] != length or length <= block_size or length % block_size:
        return attend_block(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, mask_Bx1xTxS)
    blocks = []
    for start in range(0, length, block_size):
        end = start + block_size
        blocks.append(attend_block(q_BxTxNxH[:, start:end], k_BxSxKxH[:, :end],
                                   v_BxSxKxH[:, :end], mask_Bx1xTxS[:, :, start:end, :end]))
    return jnp.concatenate(blocks, axis=1)


def _attend(q, k, v, mask, scale=None, softcap=None):
    if not softcap:
        return jax.nn.dot_product_attention(q, k, v, mask=mask, scale=scale,
                                            implementation="xla")
    return _capped_attention(q, k, v, mask, scale, softcap)


def _capped_attention(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, mask_Bx1xTxS, scale, softcap):
    """Attention with Gemma's score soft-capping, spelled out (no fused kernel has it):
    scores * scale -> cap * tanh(s / cap) -> mask -> float32 softmax -> values."""
    batch, length, heads, head_dim = q_BxTxNxH.shape
    kv_heads = k_BxSxKxH.shape[2]
    scale = head_dim ** -0.5 if scale is None else scale
    q = q_BxTxNxH.astype(jnp.float32).reshape(batch, length, kv_heads, heads // kv_heads,
                                              head_dim)
    scores = jnp.einsum("btkgh,bskh->bkgts", q, k_BxSxKxH.astype(jnp.float32)) * scale
    scores = softcap * jnp.tanh(scores / softcap)
    scores = jnp.where(mask_Bx1xTxS[:, :, None], scores, jnp.finfo(jnp.float32).min)
    weights = jax.nn.softmax(scores, axis=-1)
    out = jnp.einsum("bkgts,bskh->btkgh", weights, v_BxSxKxH.astype(jnp.float32))
    return out.reshape(batch, length, heads, head_dim).astype(q_BxTxNxH.dtype)
