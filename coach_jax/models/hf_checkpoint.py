"""Hugging Face safetensors checkpoints in and out: `load_hf` and `save_hf`.

One table, derived from the parameter tree itself, says which HF tensor feeds which
parameter and how (HF Linear weights are [out, in]; ours are [in..., out...]). Loading reads
tensor by tensor and places each parameter as soon as it is assembled, so peak host memory
is about the parameters once. Safetensors only: never pickle, never `torch.load`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import re
from typing import Any, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from coach_jax.models.config import ModelConfig
from coach_jax.models.decoder import (Params, ShardingFn, kernel_input_dims, param_shapes,
                                      path_str)

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
DEFAULT_MAX_SHARD_BYTES = 5 * 2**30
# Buffers some exporters write that carry no learned weights.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


class CheckpointError(ValueError):
    """A checkpoint folder that does not match the model it claims to hold."""


@dataclasses.dataclass(frozen=True)
class _TensorMap:
    """One HF tensor and the slice of one of our parameters it becomes."""

    hf_name: str
    layer: int | None  # index into the stacked `layers` axis, None when unstacked
    shape: tuple[int, ...]  # ours, per layer
    in_dims: int  # >0 for Linear weights: how many leading dims of ours are HF's "in"

    @property
    def hf_shape(self) -> tuple[int, ...]:
        if self.in_dims:
            return (math.prod(self.shape[self.in_dims:]), math.prod(self.shape[:self.in_dims]))
        if self.hf_name.endswith(".bias"):
            return (math.prod(self.shape),)
        return self.shape

    def to_ours(self, hf_tensor: np.ndarray) -> np.ndarray:
        return (hf_tensor.T if self.in_dims else hf_tensor).reshape(self.shape)

    def to_hf(self, ours: np.ndarray) -> np.ndarray:
        if self.in_dims:
            return ours.reshape(self.hf_shape[::-1]).T
        return ours.reshape(self.hf_shape)


def _hf_suffix(path: list[str]) -> tuple[str, int]:
    """Our path inside a layer (or at the top) -> HF name suffix and Linear in-dims."""
    leaf = path[-1]
    module = ".".join(path[:-1])
    if leaf == "kernel":
        return f"{module}.weight", kernel_input_dims("/".join(path))
    if leaf == "scale":
        return f"{module}.weight", 0
    return f"{module}.{leaf}", 0


def _tensor_plan(cfg: ModelConfig) -> dict[str, list[_TensorMap]]:
    """For every parameter path, the HF tensors that make it up, in layer order."""
    plan: dict[str, list[_TensorMap]] = {}
    for key_path, leaf in jax.tree_util.tree_flatten_with_path(param_shapes(cfg))[0]:
        path = path_str(key_path)
        parts = path.split("/")
        if parts == ["embed_tokens"]:
            plan[path] = [_TensorMap("model.embed_tokens.weight", None, leaf.shape, 0)]
        elif parts == ["lm_head"]:
            plan[path] = [_TensorMap("lm_head.weight", None, leaf.shape, 1)]
        elif parts[0] == "layers":
            suffix, in_dims = _hf_suffix(parts[1:])
            plan[path] = [_TensorMap(f"model.layers.{i}.{suffix}", i, leaf.shape[1:], in_dims)
                          for i in range(leaf.shape[0])]
        elif parts[0].startswith("layers_"):
            suffix, in_dims = _hf_suffix(parts[1:])
            i = int(parts[0].removeprefix("layers_"))
            plan[path] = [_TensorMap(f"model.layers.{i}.{suffix}", None, leaf.shape, in_dims)]
        else:
            suffix, in_dims = _hf_suffix(parts)
            plan[path] = [_TensorMap(f"model.{suffix}", None, leaf.shape, in_dims)]
    return plan


def _weight_files(folder: str) -> dict[str, str]:
    """HF tensor name -> file holding it, from the index or the single-file checkpoint."""
    index_path = os.path.join(folder, INDEX_FILE)
    if os.path.isfile(index_path):
        try:
            with open(index_path) as f:
                weight_map = json.load(f)["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index_path}: not a valid safetensors index ({e!r})") from e
        return {name: os.path.join(folder, file) for name, file in weight_map.items()}
    single = os.path.join(folder, SINGLE_FILE)
    if not os.path.isfile(single):
        found = sorted(os.listdir(folder))
        raise CheckpointError(f"{folder}: neither {SINGLE_FILE} nor {INDEX_FILE} found "
                              f"(folder holds: {', '.join(found) or 'nothing'})")
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


def _check_tensors(plan: dict[str, list[_TensorMap]], files: dict[str, str],
                   handles: dict[str, Any], cfg: ModelConfig, folder: str) -> None:
    """Raises one error listing every missing, unexpected or wrongly shaped tensor."""
    expected = {m.hf_name: m.hf_shape for maps in plan.values() for m in maps}
    missing = sorted(set(expected) - set(files))
    unexpected = sorted(
        name for name in set(files) - set(expected)
        if not name.endswith(_IGNORED_SUFFIXES)
        and not (name == "lm_head.weight" and cfg.tie_word_embeddings))
    wrong_shape = []
    for name in sorted(set(expected) & set(files)):
        handle = handles[files[name]]
        if name not in handle.keys():
            missing.append(f"{name} (indexed in {os.path.basename(files[name])} but absent)")
            continue
        shape = tuple(handle.get_slice(name).get_shape())
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


def _read_param(maps: list[_TensorMap], files: dict[str, str], dtype: np.dtype) -> np.ndarray:
    """Assembles one parameter on the host from its HF tensors.

    Files are opened per parameter: safetensors memory-maps them, and mapped pages that
    were read count as resident until unmapped, which would otherwise double peak memory.
    """
    with contextlib.ExitStack() as stack:
        handles = {f: stack.enter_context(_open(f)) for f in {files[m.hf_name] for m in maps}}
        read = lambda m: m.to_ours(handles[files[m.hf_name]].get_tensor(m.hf_name))
        if maps[0].layer is None:
            return read(maps[0]).astype(dtype, copy=False)
        host = np.empty((len(maps), *maps[0].shape), dtype)
        for m in maps:
            host[m.layer] = read(m)
        return host


def load_hf(path: str | os.PathLike, dtype: Any = jnp.float32,
            sharding: ShardingFn | None = None, **config_overrides: Any
            ) -> tuple[ModelConfig, Params]:
    """Loads a local HF folder (config.json + model.safetensors or a sharded index).

    `dtype` is the parameter dtype. `sharding(path)` places each parameter as it is read.
    `config_overrides` set runtime fields of the `ModelConfig` (compute_dtype, scan_layers).
    """
    folder = os.fspath(path)
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"{folder}: no such model folder")
    cfg = ModelConfig.from_hf_dir(folder, param_dtype=jnp.dtype(dtype).name, **config_overrides)
    plan = _tensor_plan(cfg)
    files = _weight_files(folder)
    np_dtype = np.dtype(jnp.dtype(dtype))
    with contextlib.ExitStack() as stack:
        handles = {f: stack.enter_context(_open(f)) for f in sorted(set(files.values()))}
        _check_tensors(plan, files, handles, cfg, folder)
    leaves = {}
    for our_path, maps in plan.items():
        leaves[our_path] = _place(_read_param(maps, files, np_dtype), our_path, sharding)
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
    for our_path, maps in _tensor_plan(cfg).items():
        host = np.asarray(jax.device_get(flat[our_path]))
        if dtype is not None:
            host = host.astype(np.dtype(jnp.dtype(dtype)))
        out_dtype = out_dtype or host.dtype
        for m in maps:
            tensor = np.ascontiguousarray(m.to_hf(host if m.layer is None else host[m.layer]))
            if shard and shard_bytes + tensor.nbytes > max_shard_bytes:
                flush()
            shard[m.hf_name] = tensor
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
