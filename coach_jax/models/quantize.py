"""A frozen base held quantized (QLoRA): projection kernels as qwix `QArray`s.

Google's qwix holds the representation (int8, int4 or NF4 codes with one scale per block
of `block` consecutive input channels, absmax-calibrated: bitsandbytes' blocks of a
[out, in] weight; or MXFP4, FP4 codes with a power-of-two scale per 32, which holds
gpt-oss's published experts exactly) and does the (de)quantization; coach_jax decides
what is quantized (the decoder layers' projection kernels and experts; embeddings, norms,
routers and the LM head stay as loaded) and
where it lives (a kernel's codes shard as the kernel does). A projection dequantizes its
kernel to the compute dtype when it runs (models/lora.py), a mixture its experts
(models/moe.py), one layer at a time under scan.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import qwix

from coach_jax.models.decoder import Params, kernel_input_dims, path_str
from coach_jax.models.moe import is_expert_weight

QTYPES = {"int8": jnp.int8, "int4": jnp.int4, "nf4": "nf4", "mxfp4": "mxfp4"}
BITS = {"int8": 8, "int4": 4, "nf4": 4, "mxfp4": 4}


def is_quantized(x: Any) -> bool:
    return isinstance(x, qwix.QArray)


def _quantizes(path: str) -> bool:
    """Projection kernels of the decoder layers (Gated DeltaNet's in_proj_* too) and a
    mixture's stacked experts (not its router or its shared expert's gate, whose few
    weights steer every token)."""
    module, _, leaf = path.rpartition("/")
    module = module.rsplit("/", 1)[-1]
    projection = leaf == "kernel" and (module.endswith("_proj") or module.startswith("in_proj_"))
    return path.startswith("layers") and (projection or is_expert_weight(path))


def quantize_kernel(kernel: jax.Array, path: str, qtype: str, block: int) -> qwix.QArray:
    """One layer's kernel, in blocks along its last input axis (q/k/v/gate/up/down
    contract one leading dim, o_proj two: heads, head_dim; experts [experts, in, out]
    one, after the expert axis)."""
    axis = 1 if is_expert_weight(path) else kernel_input_dims(path) - 1
    if kernel.shape[axis] % block:
        raise ValueError(f"{path}: input dim {kernel.shape[axis]} is not a multiple of the "
                         f"quantization block {block} (adapter.quantize_block)")
    others = tuple(a for a in range(kernel.ndim) if a != axis)  # one scale per block
    return qwix.quantize(kernel, QTYPES[qtype], channelwise_axes=others,
                         tiled_axes={axis: block}, scale_dtype=kernel.dtype)


def dequantize(kernel: qwix.QArray, dtype: Any) -> jax.Array:
    return qwix.dequantize(kernel).astype(dtype)


def quantize_leaf(path: str, x: jax.Array, qtype: str, block: int) -> Any:
    """`x` quantized if it is a decoder layer's projection kernel (as it is otherwise), on
    the devices and shards of the kernel it replaces; a stacked kernel layer by layer, so
    the float copy being quantized is one layer's."""
    if not _quantizes(path):
        return x

    def quantize(kernel):
        if path.startswith("layers/"):  # stacked: [layers, ...]
            return jax.lax.map(lambda k: quantize_kernel(k, path, qtype, block), kernel)
        return quantize_kernel(kernel, path, qtype, block)

    sharding = getattr(x, "sharding", None)
    out_shardings = None
    if isinstance(sharding, jax.sharding.NamedSharding):
        out_shardings = jax.tree.map(lambda s: _like(sharding, s.shape),
                                     jax.eval_shape(quantize, x))
    return jax.jit(quantize, out_shardings=out_shardings)(x)


def quantize_base(base: Params, qtype: str, block: int) -> Params:
    """`base` with every projection kernel quantized (`quantize_leaf`)."""
    return jax.tree_util.tree_map_with_path(
        lambda p, x: quantize_leaf(path_str(p), x, qtype, block), base)


def _like(sharding: jax.sharding.NamedSharding, shape: tuple[int, ...]
          ) -> jax.sharding.NamedSharding:
    """The kernel's sharding for its codes; for its scales (fewer rows along the block
    axis) the same, except on axes the mesh no longer divides, which replicate."""
    spec = list(sharding.spec) + [None] * (len(shape) - len(sharding.spec))
    mesh = sharding.mesh
    for i, (axis, size) in enumerate(zip(spec, shape)):
        if axis is None:
            continue
        names = axis if isinstance(axis, tuple) else (axis,)
        ways = int(np.prod([mesh.shape[n] for n in names]))
        if size % ways:
            spec[i] = None
    return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(*spec))


def packed_bytes(tree: Params) -> int:
    """Bytes of `tree` with quantized codes counted at their bit width (int4 and NF4: two
    per byte, as a GPU stores them; CPU jax keeps one per byte)."""
    total = 0
    for leaf in jax.tree.leaves(tree, is_leaf=is_quantized):
        if is_quantized(leaf):
            bits = 8 if leaf.qtype in (jnp.int8, "int8") else 4
            total += leaf.qvalue.size * bits // 8 + leaf.scale.nbytes
        else:
            total += leaf.size * np.dtype(leaf.dtype).itemsize
    return int(total)


def device_bytes(tree: Params) -> int:
    """Bytes of `tree`'s arrays as this backend stores them."""
    return int(sum(x.nbytes for x in jax.tree.leaves(tree)))
