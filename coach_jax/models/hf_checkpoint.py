"""Hugging Face safetensors checkpoints in and out: `load_hf` and `save_hf`.

One plan, derived from the parameter tree and the family's tensor names, says which HF
tensor feeds which parameter and how (HF Linear weights are [out, in]; ours are
[in..., out...]; a fused tensor stacks several of ours along its output rows). Loading
reads tensor by tensor and places each parameter as soon as it is assembled, so peak host
memory is about the parameters once. Safetensors only: never pickle, never `torch.load`; a
folder of PyTorch pickles is refused with the command that converts it (`check_weights`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import re
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from coach_jax.models import families
from coach_jax.models.moe import is_expert_weight
from coach_jax.models.config import ModelConfig
from coach_jax.models.decoder import (Params, ShardingFn, kernel_input_dims, layers_of_root,
                                      param_shapes, path_str, split_layer_path)

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
DEFAULT_MAX_SHARD_BYTES = 5 * 2**30
# Buffers some exporters write that carry no learned weights.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


class CheckpointError(ValueError):
    """A checkpoint folder that does not match the model it claims to hold."""


# MXFP4 (OCP microscaling FP4, gpt-oss's published experts): an E2M1 code per weight, two
# per byte (low nibble first), and one power-of-two scale (E8M0, bias 127) per 32 weights.
_FP4_VALUES = np.asarray([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0,
                          -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0], np.float32)


def _mxfp4_pairs(files: dict[str, str]) -> dict[str, tuple[str, str]]:
    """Tensor name -> its MXFP4 (blocks, scales) names, for every pair in the checkpoint."""
    bases = {name.removesuffix("_blocks") for name in files if name.endswith("_blocks")}
    return {base: (f"{base}_blocks", f"{base}_scales") for base in bases
            if f"{base}_scales" in files}


def mxfp4_shape(blocks_shape: tuple[int, ...]) -> tuple[int, ...]:
    """The dequantized tensor's shape: blocks [..., out, groups, 16] hold [..., in, out]
    with in = groups x 32 (transformers' layout for gpt-oss's experts)."""
    *prefix, out, groups, width = blocks_shape
    return (*prefix, groups * width * 2, out)


def dequantize_mxfp4(blocks: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """float32 [..., in, out] from MXFP4 blocks [..., out, groups, 16] (uint8) and scales
    [..., out, groups] (uint8): every value exact, FP4 code x 2^(scale - 127)."""
    if blocks.shape[:-1] != scales.shape:
        raise CheckpointError(f"MXFP4 blocks {list(blocks.shape)} and scales "
                              f"{list(scales.shape)} do not match")
    codes = np.stack([blocks & 0x0F, blocks >> 4], axis=-1)  # low nibble first
    values = _FP4_VALUES[codes].reshape(*scales.shape, -1)  # [..., out, groups, 32]
    values = np.ldexp(values, scales.astype(np.int32)[..., None] - 127)
    return np.swapaxes(values.reshape(*scales.shape[:-1], -1), -1, -2)


@dataclasses.dataclass(frozen=True)
class _Piece:
    """One of our parameters (one layer of it when stacked) inside an HF tensor."""

    path: str
    # Where in our array the piece sits: (layer,) for a scanned parameter, (expert,) or
    # (layer, expert) for experts' weights (one HF tensor per expert), () for all of it.
    index: tuple[int, ...]
    shape: tuple[int, ...]  # ours, of the piece
    in_dims: int  # >0 for Linear weights: how many leading dims of ours are HF's "in"
    flat: bool  # a bias: one dim in HF
    # One of several parts whose columns alternate along the tensor's last axis (gpt-oss's
    # gate_up_proj: gate, up, gate, up, ...), rather than stacked along its rows.
    interleaved: bool = False

    @property
    def hf_shape(self) -> tuple[int, ...]:
        if self.in_dims:
            return (math.prod(self.shape[self.in_dims:]), math.prod(self.shape[:self.in_dims]))
        if self.flat:
            return (math.prod(self.shape),)
        return self.shape

    def to_ours(self, hf_tensor: np.ndarray) -> np.ndarray:
        return (hf_tensor.T if self.in_dims else hf_tensor).reshape(self.shape)

    def to_hf(self, ours: np.ndarray) -> np.ndarray:
        if self.in_dims:
            return ours.reshape(self.hf_shape[::-1]).T
        return ours.reshape(self.hf_shape)


@dataclasses.dataclass(frozen=True)
class _HfTensor:
    """One HF tensor: our pieces stacked along its first (output) dim, in order."""

    name: str
    pieces: tuple[_Piece, ...]

    @property
    def hf_shape(self) -> tuple[int, ...]:
        shapes = [p.hf_shape for p in self.pieces]
        if self.pieces[0].interleaved:
            return (*shapes[0][:-1], sum(s[-1] for s in shapes))
        return (sum(s[0] for s in shapes), *shapes[0][1:])

    def split(self, hf_tensor: np.ndarray) -> list[np.ndarray]:
        """Our pieces of the HF tensor."""
        if self.pieces[0].interleaved:
            n = len(self.pieces)
            return [p.to_ours(hf_tensor[..., i::n]) for i, p in enumerate(self.pieces)]
        bounds = np.cumsum([p.hf_shape[0] for p in self.pieces])[:-1]
        return [p.to_ours(rows) for p, rows in
                zip(self.pieces, np.split(hf_tensor, bounds, axis=0))]

    def join(self, ours: list[np.ndarray]) -> np.ndarray:
        """The HF tensor from our pieces."""
        parts = [p.to_hf(x) for p, x in zip(self.pieces, ours)]
        if len(parts) == 1:
            return np.ascontiguousarray(parts[0])
        if self.pieces[0].interleaved:
            return np.ascontiguousarray(np.stack(parts, axis=-1).reshape(self.hf_shape))
        return np.ascontiguousarray(np.concatenate(parts))


@dataclasses.dataclass
class _Unit:
    """Parameters that make up a set of HF tensors together: one parameter, or the parts of
    a fused tensor. Loading and saving go unit by unit."""

    shapes: dict[str, tuple[int, ...]]  # our path -> full shape
    tensors: list[_HfTensor]


def _piece(path: str, index: tuple[int, ...], shape: tuple[int, ...]) -> _Piece:
    leaf = path.rsplit("/", 1)[-1]
    if leaf == "kernel":
        in_dims = kernel_input_dims(path)
    else:
        in_dims = int(path == "lm_head" or is_expert_weight(path))
    return _Piece(path, index, shape, in_dims, flat=leaf == "bias")


def _hf_leaf(leaf: str) -> str:
    """Kernels and norm scales are HF's `weight`; other leaves (bias) keep their name."""
    return "weight" if leaf in ("kernel", "scale") else leaf


def _tensor_plan(cfg: ModelConfig, names: families.TensorNames | None = None
                 ) -> list[_Unit]:
    """Every parameter's HF tensors, grouped into units, in parameter order; `names`: the
    checkpoint's layout when it is not the family's own (a multimodal wrapper's)."""
    names = names or families.family(cfg.model_type).tensors
    tensors: dict[str, dict[int, _Piece]] = {}  # HF name -> {position among parts: piece}
    shapes: dict[str, tuple[int, ...]] = {}

    def add(name: str, position: int, piece: _Piece) -> None:
        slot = tensors.setdefault(name, {})
        if position in slot:
            raise ValueError(f"{piece.path} and {slot[position].path} both map to {name}")
        slot[position] = piece

    def add_in_layer(layer: int, index: tuple[int, ...], shape: tuple[int, ...],
                     path: str, inside: str) -> None:
        *module, leaf = inside.split("/")
        stacked = names.experts_tensor(leaf) if module[-1:] == ["experts"] else None
        if stacked is not None:  # all experts in one HF tensor per layer, [E, in, out]
            part = stacked.parts.index(leaf)
            interleaved = stacked.interleaved and len(stacked.parts) > 1
            add(f"{names.body}.layers.{layer}.{stacked.tensor}", part,
                _Piece(path, index, shape, 0, flat=False, interleaved=interleaved))
            return
        if is_expert_weight(path):  # one HF tensor per expert: mlp/experts/3/gate_proj
            for expert in range(shape[0]):
                hf_module, _ = names.in_layer(layer, "/".join([*module, str(expert), leaf]))
                add(f"{hf_module}.weight", 0, _piece(path, (*index, expert), shape[1:]))
            return
        if not module:  # a parameter of the layer itself (Gemma 4's layer_scalar)
            add(f"{names.body}.layers.{layer}.{leaf}", 0, _piece(path, index, shape))
            return
        hf_module, position = names.in_layer(layer, "/".join(module))
        add(f"{hf_module}.{_hf_leaf(leaf)}", position, _piece(path, index, shape))

    for key_path, leaf in jax.tree_util.tree_flatten_with_path(param_shapes(cfg))[0]:
        path = path_str(key_path)
        shapes[path] = leaf.shape
        first, *rest = path.split("/")
        in_layers = split_layer_path(cfg, path)
        if in_layers is not None:  # stacked (scanned): one HF tensor per layer
            root, inside = in_layers
            for layer, stacked in layers_of_root(cfg, root):
                if stacked is None:
                    add_in_layer(layer, (), leaf.shape, path, inside)
                else:
                    add_in_layer(layer, (stacked,), leaf.shape[1:], path, inside)
        elif not rest:  # a bare parameter: embed_tokens, lm_head
            add(f"{names.top(first)}.weight", 0, _piece(path, (), leaf.shape))
        else:  # a top-level module: the final norm
            module = ".".join([first, *rest[:-1]])
            add(f"{names.top(module)}.{_hf_leaf(rest[-1])}", 0, _piece(path, (), leaf.shape))
    units: dict[tuple[str, ...], _Unit] = {}
    for name, by_position in tensors.items():
        if sorted(by_position) != list(range(len(by_position))):
            raise ValueError(f"{name}: fused parts {sorted(by_position)} are not all present")
        pieces = tuple(by_position[i] for i in range(len(by_position)))
        paths = tuple(dict.fromkeys(p.path for p in pieces))
        unit = units.setdefault(paths, _Unit({p: shapes[p] for p in paths}, []))
        unit.tensors.append(_HfTensor(name, pieces))
    return list(units.values())


# PyTorch pickles (`pytorch_model.bin`, its `*.bin` shards, `consolidated.pth`), and the
# pickles a training run leaves beside its weights, which hold none.
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
_NOT_WEIGHTS = ("training_args", "optimizer", "scheduler", "rng_state")


def convert_command(folder: str) -> str:
    """A shell line that rewrites a folder's PyTorch pickle weights as safetensors."""
    return ('python -c "from transformers import AutoModelForCausalLM as M; '
            f"M.from_pretrained({folder!r}).save_pretrained({folder!r}, "
            'safe_serialization=True)"')


def check_weights(folder: str, require: bool = True) -> None:
    """Raises a one-line CheckpointError unless the folder holds safetensors weights. Pickle
    weights are named with the command that converts them, never opened: unpickling a
    file can run any code in it. `require=False` refuses only a pickle-only folder (the
    early check, before config.json is read: a folder without weights gets its config
    checked first)."""
    if os.path.isfile(os.path.join(folder, INDEX_FILE)) or \
            os.path.isfile(os.path.join(folder, SINGLE_FILE)):
        return
    found = sorted(os.listdir(folder))
    pickles = [f for f in found if f.endswith(_PICKLE_SUFFIXES) and not f.startswith(
        _NOT_WEIGHTS)]
    if pickles:
        shown = ", ".join(pickles[:3]) + (f" and {len(pickles) - 3} more" if len(pickles) > 3
                                          else "")
        raise CheckpointError(
            f"{folder}: PyTorch pickle weights ({shown}) and no {SINGLE_FILE}; coach_jax reads "
            f"safetensors only and never unpickles (it can run code). Convert them once "
            f"with transformers: {convert_command(folder)}")
    if not require:
        return
    raise CheckpointError(f"{folder}: neither {SINGLE_FILE} nor {INDEX_FILE} found "
                          f"(folder holds: {', '.join(found) or 'nothing'})")


def _weight_files(folder: str) -> dict[str, str]:
    """HF tensor name -> file holding it, from the index or the single-file checkpoint."""
    check_weights(folder)
    index_path = os.path.join(folder, INDEX_FILE)
    if os.path.isfile(index_path):
        try:
            with open(index_path) as f:
                weight_map = json.load(f)["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index_path}: not a valid safetensors index ({e!r})") from e
        return {name: os.path.join(folder, file) for name, file in weight_map.items()}
    single = os.path.join(folder, SINGLE_FILE)
    with _open(single) as handle:
        return {name: single for name in handle.keys()}


@contextlib.contextmanager
def _open(file: str) -> Iterator[Any]:
    if not os.path.isfile(file):
        raise CheckpointError(f"{file}: listed in the checkpoint but missing")
    try:
        handle = safe_open(file, framework="numpy")
    except (SafetensorError, OSError) as e:
        raise CheckpointError(
            f"{file}: cannot read as safetensors ({e}); the file may be truncated or "
            "not a safetensors file") from e
    with handle:
        yield handle


def _layout(cfg: ModelConfig, files: dict[str, str]) -> families.TensorNames:
    """The family's tensor names, or a multimodal wrapper's when the checkpoint holds its
    text decoder under a language-model prefix."""
    own = families.family(cfg.model_type).tensors
    for layout in families.MULTIMODAL_LAYOUTS:
        if f"{layout.top('embed_tokens')}.weight" in files:
            logging.warning("loading only the text decoder of a multimodal checkpoint: its "
                            "vision tower is not loaded, trained or exported")
            return dataclasses.replace(layout, fused=own.fused, renames=own.renames)
    return own


def _check_tensors(plan: list[_Unit], files: dict[str, str], handles: dict[str, Any],
                   cfg: ModelConfig, folder: str, names: families.TensorNames,
                   packed: dict[str, tuple[str, str]]) -> None:
    """Raises one error listing every missing, unexpected or wrongly shaped tensor
    (`packed`: tensors stored as MXFP4 blocks and scales, `files` naming their blocks')."""
    expected = {t.name: t.hf_shape for unit in plan for t in unit.tensors}
    # A tied checkpoint may still carry the LM head (a copy of the embeddings).
    redundant = {f"{names.top('lm_head')}.weight"} if cfg.tie_word_embeddings else set()
    ignored = families.VISION_PREFIXES if names is not families.family(
        cfg.model_type).tensors else ()
    missing = sorted(set(expected) - set(files))
    unexpected = sorted(
        name for name in set(files) - set(expected) - redundant
        if not name.endswith(_IGNORED_SUFFIXES) and not (ignored and name.startswith(ignored)))
    wrong_shape = []
    for name in sorted(set(expected) & set(files)):
        handle = handles[files[name]]
        stored = packed[name][0] if name in packed else name
        if stored not in handle.keys():
            missing.append(f"{stored} (indexed in {os.path.basename(files[name])} but absent)")
            continue
        shape = tuple(handle.get_slice(stored).get_shape())
        if name in packed:
            shape = mxfp4_shape(shape)
        if shape != expected[name]:
            wrong_shape.append(f"{name}: {list(shape)} in {os.path.basename(files[name])}, "
                               f"expected {list(expected[name])}")
    problems = []
    for title, items in (("missing", missing), ("unexpected", unexpected),
                         ("wrong shape", wrong_shape)):
        if items:
            problems.append(f"{title} ({len(items)}):\n  " + "\n  ".join(items))
    if problems:
        raise CheckpointError(
            f"{folder}: the checkpoint does not match its config.json "
            f"({cfg.model_type}, {cfg.num_layers} layers)\n" + "\n".join(problems))


def _place(array: np.ndarray, path: str, sharding: ShardingFn | None) -> jax.Array:
    if sharding is None:
        return jax.device_put(array)
    return jax.make_array_from_callback(array.shape, sharding(path), lambda index: array[index])


def _read_tensor(handles: dict[str, Any], files: dict[str, str], name: str,
                 packed: dict[str, tuple[str, str]]) -> np.ndarray:
    """One HF tensor, dequantized when the checkpoint holds it as MXFP4."""
    if name not in packed:
        return handles[files[name]].get_tensor(name)
    blocks, scales = packed[name]
    return dequantize_mxfp4(handles[files[blocks]].get_tensor(blocks),
                            handles[files[scales]].get_tensor(scales))


def _read_unit(unit: _Unit, files: dict[str, str], dtype: np.dtype,
               packed: dict[str, tuple[str, str]]) -> dict[str, np.ndarray]:
    """Assembles a unit's parameters on the host from their HF tensors.

    Files are opened per unit: safetensors memory-maps them, and mapped pages that were
    read count as resident until unmapped, which would otherwise double peak memory.
    """
    host: dict[str, np.ndarray] = {}
    with contextlib.ExitStack() as stack:
        stored = [n for t in unit.tensors for n in packed.get(t.name, (t.name,))]
        handles = {f: stack.enter_context(_open(f)) for f in {files[n] for n in stored}}
        for tensor in unit.tensors:
            ours = tensor.split(_read_tensor(handles, files, tensor.name, packed))
            for piece, array in zip(tensor.pieces, ours):
                if not piece.index:
                    host[piece.path] = array.astype(dtype, copy=False)
                else:
                    if piece.path not in host:
                        host[piece.path] = np.empty(unit.shapes[piece.path], dtype)
                    host[piece.path][piece.index] = array
    return host


def load_hf(path: str | os.PathLike, dtype: Any = jnp.float32,
            sharding: ShardingFn | None = None, cfg: ModelConfig | None = None,
            transform: Callable[[str, jax.Array], Any] | None = None,
            **config_overrides: Any) -> tuple[ModelConfig, Params]:
    """Loads a local HF folder (config.json + model.safetensors or a sharded index).

    `dtype` is the parameter dtype. `sharding(path)` places each parameter as it is read;
    `transform(path, array)` then replaces it (QLoRA quantizes kernels as they arrive, so
    the float model never exists whole).
    `config_overrides` set runtime fields of the `ModelConfig` (compute_dtype, scan_layers);
    a caller that has already parsed the folder's config.json passes it as `cfg` instead.
    """
    folder = os.fspath(path)
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"{folder}: no such model folder")
    check_weights(folder, require=False)  # a pickle-only folder's fix comes first
    if cfg is None:
        cfg = ModelConfig.from_hf_dir(folder, param_dtype=jnp.dtype(dtype).name,
                                      **config_overrides)
    files = _weight_files(folder)
    names = _layout(cfg, files)
    plan = _tensor_plan(cfg, names)
    np_dtype = np.dtype(jnp.dtype(dtype))
    packed = _mxfp4_pairs(files)
    if packed:
        logging.info("%d tensors stored as MXFP4: dequantized to %s", len(packed), np_dtype)
    # A packed tensor is listed under its own name (in its blocks' file); its blocks and
    # scales are listed as well.
    listed = {**files, **{name: files[blocks] for name, (blocks, _) in packed.items()}}
    for name, pair in packed.items():
        for part in pair:
            listed.pop(part)
    with contextlib.ExitStack() as stack:
        handles = {f: stack.enter_context(_open(f)) for f in sorted(set(files.values()))}
        _check_tensors(plan, listed, handles, cfg, folder, names, packed)
    leaves = {}
    for unit in plan:
        for our_path, host in _read_unit(unit, files, np_dtype, packed).items():
            leaves[our_path] = _place(host, our_path, sharding)
            if transform is not None:
                leaves[our_path] = transform(our_path, leaves[our_path])
    params = jax.tree_util.tree_map_with_path(lambda p, _: leaves[path_str(p)],
                                              param_shapes(cfg))
    return cfg, params


def _check_params(cfg: ModelConfig, params: Params) -> None:
    expected = param_shapes(cfg)
    got = {path_str(p): tuple(x.shape) for p, x in jax.tree_util.tree_flatten_with_path(params)[0]}
    want = {path_str(p): tuple(x.shape)
            for p, x in jax.tree_util.tree_flatten_with_path(expected)[0]}
    if got != want:
        diff = sorted(f"{k}: {got.get(k, 'absent')} vs expected {want.get(k, 'absent')}"
                      for k in set(got) | set(want) if got.get(k) != want.get(k))
        raise CheckpointError("params do not match the config:\n  " + "\n  ".join(diff))


def save_hf(cfg: ModelConfig, params: Params, out_dir: str | os.PathLike, dtype: Any = None,
            max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> None:
    """Writes config.json and safetensors that `transformers` loads.

    `dtype` (default: the params' own) is the dtype written. Above `max_shard_bytes` the
    weights are split into numbered shards with a `model.safetensors.index.json`. Host
    memory holds one shard at a time.
    """
    _check_params(cfg, params)
    hf_config = cfg.to_hf_dict()  # fails early on a config HF cannot express
    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    flat = {path_str(p): x for p, x in jax.tree_util.tree_flatten_with_path(params)[0]}
    written: list[tuple[str, list[str], int]] = []  # (temp file, tensor names, bytes)
    shard: dict[str, np.ndarray] = {}
    shard_bytes = 0

    def flush():
        nonlocal shard, shard_bytes
        temp = os.path.join(out_dir, f".shard-{len(written):05d}.tmp")
        save_file(shard, temp, metadata={"format": "pt"})
        written.append((temp, list(shard), shard_bytes))
        shard, shard_bytes = {}, 0

    out_dtype = None
    for unit in _tensor_plan(cfg):
        host = {}
        for our_path in unit.shapes:
            host[our_path] = np.asarray(jax.device_get(flat[our_path]))
            if dtype is not None:
                host[our_path] = host[our_path].astype(np.dtype(jnp.dtype(dtype)))
            out_dtype = out_dtype or host[our_path].dtype
        for hf_tensor in unit.tensors:
            tensor = hf_tensor.join([host[p.path][p.index] if p.index else host[p.path]
                                     for p in hf_tensor.pieces])
            if shard and shard_bytes + tensor.nbytes > max_shard_bytes:
                flush()
            shard[hf_tensor.name] = tensor
            shard_bytes += tensor.nbytes
    flush()

    for stale in os.listdir(out_dir):
        if stale in (SINGLE_FILE, INDEX_FILE) or re.fullmatch(r"model-\d+-of-\d+\.safetensors", stale):
            os.remove(os.path.join(out_dir, stale))
    if len(written) == 1:
        os.replace(written[0][0], os.path.join(out_dir, SINGLE_FILE))
    else:
        weight_map = {}
        for i, (temp, names, _) in enumerate(written):
            name = f"model-{i + 1:05d}-of-{len(written):05d}.safetensors"
            os.replace(temp, os.path.join(out_dir, name))
            weight_map.update({n: name for n in names})
        index = {"metadata": {"total_size": sum(b for _, _, b in written)},
                 "weight_map": dict(sorted(weight_map.items()))}
        with open(os.path.join(out_dir, INDEX_FILE), "w") as f:
            json.dump(index, f, indent=2)
    hf_config["dtype"] = jnp.dtype(out_dtype).name
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(hf_config, f, indent=2, sort_keys=True)
