"""Attention kernels behind one signature, so fused paths can replace the XLA one.

Masks are built from positions and segment ids, never from array indices: the same
function serves packed training rows (positions restart per example) and, later, a KV
cache whose keys carry their own positions.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
from absl import logging
from jax.sharding import PartitionSpec as P


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
# The platforms whose kernels differ from XLA's; every other one runs the XLA path.
KERNEL_PLATFORMS = ("tpu", "cuda")
SPLASH_BLOCKS = (512, 256, 128)  # largest first; splash needs multiples of 128 lanes
_CUDNN_DTYPES = ("bfloat16", "float16")


@dataclasses.dataclass(frozen=True)
class AttentionShape:
    """What a kernel's limits depend on, known when the step is traced."""

    length: int
    head_dim: int
    dtype: str
    softcap: float | None = None
    sinks: bool = False


@dataclasses.dataclass(frozen=True)
class Choice:
    """The kernel one platform runs; `reason` says why a fused kernel was not used."""

    implementation: str
    reason: str = ""


def choose(requested: str, platform: str, shape: AttentionShape) -> Choice:
    """The kernel `requested` (a `model.attention` value) means on `platform` ('tpu',
    'cuda', 'rocm', 'cpu') for this shape.

    `auto`: splash on TPU, cuDNN on CUDA, XLA elsewhere. Splash asked for by name runs on
    any platform (interpreted off TPU: slow, for tests). A shape a kernel cannot take goes to
    the XLA path with the reason; only an explicit `cudnn` that cannot run is an error
    (ValueError), since a run that asked for it should not silently run another kernel.
    """
    if requested not in IMPLEMENTATIONS:
        raise ValueError(f"model.attention={requested!r}; expected one of "
                         f"{', '.join(IMPLEMENTATIONS)}")
    if requested == "splash" or (requested == "auto" and platform == "tpu"):
        why = splash_limit(shape)
        return Choice("xla", f"splash attention {why}") if why else Choice("splash")
    if requested == "cudnn" or (requested == "auto" and platform == "cuda"):
        why = cudnn_limit(shape, platform)
        if why and requested == "cudnn":
            raise ValueError(f"model.attention='cudnn' {why}; use 'auto' (which falls back "
                             "to XLA's attention) or 'xla'")
        return Choice("xla", f"cuDNN attention {why}") if why else Choice("cudnn")
    return Choice("xla")


def for_run(implementation: str, cfg: Any, length: int) -> Choice:
    """What a run of `length`-token rows of model `cfg` (a ModelConfig) gets on this
    process's platform; raises ValueError (naming model.attention) for an explicit
    kernel that cannot run, before any weight is read."""
    return choose(implementation, runtime_platform(), AttentionShape(
        length, cfg.head_dim, cfg.compute_dtype, cfg.attn_logit_softcapping,
        cfg.attention_sinks))


def splash_limit(shape: AttentionShape) -> str:
    """What the splash kernel needs that `shape` lacks ("" when it can take it)."""
    if shape.sinks:
        return "has no attention sinks (gpt-oss)"
    if shape.length % SPLASH_BLOCKS[-1]:
        return (f"needs a sequence length that is a multiple of {SPLASH_BLOCKS[-1]} "
                f"(length {shape.length}: data.max_seq_len)")
    return ""


def splash_block(length: int) -> int:
    """The largest block of SPLASH_BLOCKS that tiles `length` (a multiple of 128)."""
    return next(b for b in SPLASH_BLOCKS if length % b == 0)


def cudnn_limit(shape: AttentionShape, platform: str) -> str:
    """What cuDNN's fused attention (as `jax.nn.dot_product_attention` calls it, with the
    packed-row mask as a dense bias) needs that `shape` lacks ("" when it can take it)."""
    if platform != "cuda":
        return f"needs a CUDA GPU (this platform is {platform})"
    if cudnn_version() is None:
        return "needs the cuDNN library, which this machine does not have"
    if shape.softcap:
        return (f"cannot soft-cap attention logits (attn_logit_softcapping={shape.softcap})")
    if shape.sinks:
        return "has no attention sinks (gpt-oss)"
    if shape.dtype not in _CUDNN_DTYPES:
        return f"needs 16-bit compute (model.dtype={shape.dtype})"
    head_dim_max = _cudnn_head_dim_max()
    if shape.head_dim % 8 or shape.head_dim > head_dim_max:
        return (f"needs a head dim that is a multiple of 8 and at most {head_dim_max} "
                f"(head_dim={shape.head_dim})")
    if shape.length % 2:  # a mask is a bias to cuDNN, and biased training needs even lengths
        return f"needs an even sequence length with a mask (length {shape.length})"
    return ""


def cudnn_version() -> int | None:
    """The installed cuDNN's version (9.8.0 is 90800), as cuDNN attention's own lowering
    reads it; None without the library (every step traces the CUDA branch, on any machine)."""
    from jax._src.cudnn import fused_attention_stablehlo
    try:
        return fused_attention_stablehlo.check_cudnn_version()
    except RuntimeError:
        return None


def _cudnn_head_dim_max() -> int:
    """256 on Hopper and later, 128 before (and when no GPU is attached: a lowering for
    CUDA on another machine must fit every card)."""
    try:
        capability = jax.devices("gpu")[0].compute_capability
    except RuntimeError:
        return 128
    return 256 if tuple(int(x) for x in capability.split(".")) >= (9, 0) else 128


def runtime_platform() -> str:
    """'tpu', 'cuda', 'rocm' or 'cpu': the platform this process's arrays live on."""
    backend = jax.default_backend()
    if backend != "gpu":
        return backend
    version = jax.devices()[0].client.platform_version.lower()
    return "rocm" if "rocm" in version else "cuda"


@functools.cache
def _log_once(message: str, warn: bool) -> None:
    """One line per distinct choice and process, however often the step is traced."""
    (logging.warning if warn else logging.info)(message)


def attend(implementation: str, q_BxTxNxH: jax.Array, k_BxSxKxH: jax.Array,
           v_BxSxKxH: jax.Array, positions_BxT: jax.Array, segment_ids_BxT: jax.Array,
           window: jax.Array | int | None, windows: tuple[int, ...] = (),
           scale: float | None = None, softcap: float | None = None,
           sinks_N: jax.Array | None = None) -> jax.Array:
    """Causal, segment-aware self-attention by the `model.attention` value `implementation`;
    all kernels give the same result (tests compare them with the XLA path).

    The kernel is chosen per platform when the step is lowered (`lax.platform_dependent`):
    one jitted step runs splash when lowered for TPU and cuDNN for CUDA. `window` is this
    layer's sliding window (an int, or traced under scan); `windows` every value it can
    take (fused kernels build their masks at trace time). `scale` replaces head_dim**-0.5;
    `softcap` bends scores to cap * tanh(s / cap) before the mask (Gemma); `sinks_N`, one
    logit per head, joins every softmax (gpt-oss)."""
    shape = AttentionShape(q_BxTxNxH.shape[1], q_BxTxNxH.shape[-1],
                           jnp.dtype(q_BxTxNxH.dtype).name, softcap, sinks_N is not None)
    here = runtime_platform()
    if here in KERNEL_PLATFORMS or implementation != "cudnn":  # explicit cuDNN off a GPU:
        choice = choose(implementation, here, shape)          # the Trainer refuses it
        if choice.implementation != "xla" or choice.reason:
            _log_once(f"attention: {choice.implementation}"
                      + (f" ({choice.reason})" if choice.reason else ""), bool(choice.reason))
    args = (q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, positions_BxT, segment_ids_BxT, window)
    kernels = {}
    for platform in KERNEL_PLATFORMS:
        if implementation == "cudnn" and platform != "cuda":
            continue
        kernel = choose(implementation, platform, shape).implementation
        if kernel != "xla":
            kernels[platform] = functools.partial(
                _KERNELS[kernel], windows=windows, scale=scale, softcap=softcap,
                interpret=platform != "tpu")
    default = functools.partial(_xla_attention, scale=scale, softcap=softcap, sinks_N=sinks_N)
    if "tpu" in kernels and implementation == "splash":  # by name: interpreted elsewhere
        default = functools.partial(_splash, windows=windows, scale=scale, softcap=softcap,
                                    interpret=True)
    if not kernels:
        return default(*args)
    return jax.lax.platform_dependent(*args, default=default, **kernels)


def _xla_attention(q, k, v, positions, segment_ids, window, scale=None, softcap=None,
                   sinks_N=None):
    mask = attention_mask(positions, positions, segment_ids, segment_ids, window)
    return dot_product_attention(q, k, v, mask, scale=scale, softcap=softcap, sinks_N=sinks_N)


def _cudnn(q, k, v, positions, segment_ids, window, windows=(), scale=None, softcap=None,
           interpret=False):
    """cuDNN's fused kernel; the dense mask carries the segments and the window."""
    del windows, softcap, interpret  # a capped model never gets here (choose)
    mask = attention_mask(positions, positions, segment_ids, segment_ids, window)
    return jax.nn.dot_product_attention(q, k, v, mask=mask, scale=scale,
                                        implementation="cudnn")


def _splash(q, k, v, positions, segment_ids, window, windows=(), scale=None, softcap=None,
            interpret=False):
    """Splash with one static mask per sliding-window size the layers use: a traced
    window (scanned layers) picks its kernel with `lax.switch`."""
    del positions  # splash is causal in index order, as positions rise within a segment
    run = functools.partial(splash_attention, q, k, v, segment_ids, interpret=interpret,
                            scale=scale, softcap=softcap)
    if window is None or isinstance(window, int):
        return run(window or None)
    sizes = tuple(sorted(set(windows) or {0}))
    if len(sizes) == 1:
        return run(sizes[0] or None)
    index = jnp.argmax(jnp.asarray(sizes, jnp.int32) == window)
    return jax.lax.switch(index, [functools.partial(run, size or None) for size in sizes])


_KERNELS = {"cudnn": _cudnn, "splash": _splash}


def splash_attention(q_BxTxNxH: jax.Array, k_BxSxKxH: jax.Array, v_BxSxKxH: jax.Array,
                     segment_ids_BxT: jax.Array, window: int | None,
                     interpret: bool | None = None, scale: float | None = None,
                     softcap: float | None = None) -> jax.Array:
    """TPU splash attention with segment ids (Pallas; `interpret` runs it anywhere, slowly).

    Grouped heads run as one multi-query kernel per KV head, in blocks of up to 512 (the
    length must be a multiple of 128: `splash_limit`). Rows are causal in index order
    within each segment, which is what the position-based mask means for packed rows.
    On a mesh of several devices (`jax.set_mesh`) the kernel runs per shard (`shard_map`):
    rows split like the batch, heads like the tensor axis; Mosaic kernels cannot be
    partitioned by XLA.
    """
    from jax.experimental.pallas.ops.tpu.splash_attention import (
        splash_attention_kernel as kernel_lib, splash_attention_mask as mask_lib)
    batch, length, heads, head_dim = q_BxTxNxH.shape
    kv_heads = k_BxSxKxH.shape[2]
    if interpret is None:
        interpret = jax.default_backend() != "tpu"
    why = splash_limit(AttentionShape(length, head_dim, jnp.dtype(q_BxTxNxH.dtype).name))
    if why:
        raise ValueError(f"splash attention {why}")
    scale = head_dim ** -0.5 if scale is None else scale

    def local(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, segment_ids_BxT):
        heads, kv_heads = q_BxTxNxH.shape[2], k_BxSxKxH.shape[2]
        group = heads // kv_heads
        shape = (length, length)
        mask = (mask_lib.LocalMask(shape, (window - 1, 0), 0) if window
                else mask_lib.CausalMask(shape))
        block = splash_block(length)
        sizes = kernel_lib.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block,
                                      block_q_dkv=block, block_kv_dkv=block,
                                      block_kv_dkv_compute=block, block_q_dq=block,
                                      block_kv_dq=block)
        kernel = kernel_lib.make_splash_mqa_single_device(
            mask_lib.MultiHeadMask([mask] * group), block_sizes=sizes, interpret=interpret,
            attn_logits_soft_cap=softcap)
        rows = q_BxTxNxH.shape[0]
        # [B, T, K*G, H] -> [B, K, G, T, H]; keys [B, T, K, H] -> [B, K, T, H]
        q = (q_BxTxNxH * scale).reshape(rows, length, kv_heads, group, head_dim)
        q = q.transpose(0, 2, 3, 1, 4)
        k = k_BxSxKxH.transpose(0, 2, 1, 3)
        v = v_BxSxKxH.transpose(0, 2, 1, 3)

        def one_row(q_KxGxTxH, k_KxTxH, v_KxTxH, segments_T):
            ids = kernel_lib.SegmentIds(q=segments_T, kv=segments_T)
            return jax.vmap(lambda qq, kk, vv: kernel(qq, kk, vv, segment_ids=ids))(
                q_KxGxTxH, k_KxTxH, v_KxTxH)

        out = jax.vmap(one_row)(q, k, v, segment_ids_BxT)  # [B, K, G, T, H]
        return out.transpose(0, 3, 1, 2, 4).reshape(rows, length, heads, head_dim).astype(
            q_BxTxNxH.dtype)

    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return local(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, segment_ids_BxT)
    rows = dividing_axes(mesh, batch, BATCH_AXES)
    head_axes = dividing_axes(mesh, kv_heads, HEAD_AXES)  # q heads follow their KV head
    q_spec = P(rows, None, head_axes, None)
    return jax.shard_map(local, mesh=mesh, in_specs=(q_spec, q_spec, q_spec, P(rows, None)),
                         out_specs=q_spec, check_vma=False)(
        q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, segment_ids_BxT)


# Where activations live on the mesh (parallel.py's layout): rows over the data-parallel
# axes, heads over the tensor axis. An axis a dimension does not divide is left out.
BATCH_AXES = ("data", "fsdp", "expert")
HEAD_AXES = ("tensor",)


def dividing_axes(mesh: Any, size: int, names: tuple[str, ...]) -> tuple[str, ...] | None:
    used, ways = [], 1
    for name in names:
        if name in mesh.axis_names and mesh.shape[name] > 1 \
                and size % (ways * mesh.shape[name]) == 0:
            used.append(name)
            ways *= mesh.shape[name]
    return tuple(used) or None


def dot_product_attention(q_BxTxNxH: jax.Array, k_BxSxKxH: jax.Array, v_BxSxKxH: jax.Array,
                          mask_Bx1xTxS: jax.Array, block_size: int = 64,
                          scale: float | None = None, softcap: float | None = None,
                          sinks_N: jax.Array | None = None) -> jax.Array:
    """Scaled dot-product attention with grouped KV heads (N a multiple of K).

    Logits and softmax run in float32 whatever the input dtype. For self-attention over
    T > block_size, queries go in blocks that only see the keys up to their block's end:
    rows are causal in index order (positions rise within each packed example), so the
    skipped keys are masked anyway. That halves the work and keeps each block's scores in
    cache; the result is the same.
    """
    length = q_BxTxNxH.shape[1]
    attend_block = functools.partial(_attend, scale=scale, softcap=softcap, sinks_N=sinks_N)
    if k_BxSxKxH.shape[1] != length or length <= block_size or length % block_size:
        return attend_block(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, mask_Bx1xTxS)
    blocks = []
    for start in range(0, length, block_size):
        end = start + block_size
        blocks.append(attend_block(q_BxTxNxH[:, start:end], k_BxSxKxH[:, :end],
                                   v_BxSxKxH[:, :end], mask_Bx1xTxS[:, :, start:end, :end]))
    return jnp.concatenate(blocks, axis=1)


def _attend(q, k, v, mask, scale=None, softcap=None, sinks_N=None):
    if not softcap and sinks_N is None:
        return jax.nn.dot_product_attention(q, k, v, mask=mask, scale=scale,
                                            implementation="xla")
    return _explicit_attention(q, k, v, mask, scale, softcap, sinks_N)


def _explicit_attention(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, mask_Bx1xTxS, scale, softcap,
                        sinks_N=None):
    """Attention spelled out for what no fused kernel has: scores * scale -> Gemma's
    cap * tanh(s / cap) -> mask -> float32 softmax (over the keys and gpt-oss's sink logit
    of the head, whose weight is dropped) -> values."""
    batch, length, heads, head_dim = q_BxTxNxH.shape
    kv_heads = k_BxSxKxH.shape[2]
    scale = head_dim ** -0.5 if scale is None else scale
    q = q_BxTxNxH.astype(jnp.float32).reshape(batch, length, kv_heads, heads // kv_heads,
                                              head_dim)
    scores = jnp.einsum("btkgh,bskh->bkgts", q, k_BxSxKxH.astype(jnp.float32)) * scale
    if softcap:
        scores = softcap * jnp.tanh(scores / softcap)
    scores = jnp.where(mask_Bx1xTxS[:, :, None], scores, jnp.finfo(jnp.float32).min)
    if sinks_N is None:
        weights = jax.nn.softmax(scores, axis=-1)
    else:  # heads n = kv_head * group + g, as q was split
        sinks = jnp.broadcast_to(sinks_N.astype(jnp.float32).reshape(
            1, kv_heads, heads // kv_heads, 1, 1), (*scores.shape[:-1], 1))
        weights = jax.nn.softmax(jnp.concatenate([scores, sinks], axis=-1), axis=-1)[..., :-1]
    out = jnp.einsum("bkgts,bskh->btkgh", weights, v_BxSxKxH.astype(jnp.float32))
    return out.reshape(batch, length, heads, head_dim).astype(q_BxTxNxH.dtype)
