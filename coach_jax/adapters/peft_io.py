"""LoRA adapters in Hugging Face PEFT's format, both ways, and merged into the base.

A PEFT adapter folder is `adapter_config.json` + `adapter_model.safetensors`, whose
tensors are named after the HF module they adapt:
`base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight` [r, in] and
`...lora_B.weight` [out, r]. Ours are A [in..., r] and B [r, out...] per projection (a
stacked `layers` axis in front when scanned), and one A per fused group: PEFT's LoRA on
Phi-3's `qkv_proj` is our shared `qkv` A with q, k and v's B rows stacked in that order.
A mixture's experts are written on transformers' stacked parameters (PEFT's
`target_parameters`) and read from that layout or from per-expert modules
(adapters/peft_experts.py).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from coach_jax.adapters import peft_experts
from coach_jax.adapters import targets as adapter_targets
from coach_jax.models import families
from coach_jax.models.config import ModelConfig
from coach_jax.models.decoder import (Params, layer_root, param_shapes, path_str, select,
                                      split_layer_path)
from coach_jax.models.lora import (EXPERT_MODULES, LoraSpec, adapter_module, is_adapter_path,
                                   join_base)

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PREFIX = peft_experts.PREFIX


class AdapterError(ValueError):
    """A PEFT adapter folder that does not fit the model, in words that say why."""


@dataclasses.dataclass(frozen=True)
class _Slot:
    """Where one of our adapter arrays (one layer of it) lives in PEFT's tensors."""

    path: str  # ours: "layers/self_attn/q_proj/lora_b"
    layer: int
    peft_name: str
    row: int  # the first of its rows in a stacked B (fused modules), 0 otherwise


def _root(cfg: ModelConfig, layer: int) -> str:
    return layer_root(cfg, layer)[0]


def _in_layer(cfg: ModelConfig, array: Any, layer: int) -> Any:
    """Layer `layer`'s part of an array of its layer subtree (a row of a stacked one)."""
    stacked = layer_root(cfg, layer)[1]
    return array if stacked is None else array[stacked]


def _layers(cfg: ModelConfig) -> range | tuple[int, ...]:
    return cfg.lora.layers if cfg.lora.layers is not None else range(cfg.num_layers)


def _expert_leaf(cfg: ModelConfig, layer: int, module: str, leaf: str) -> str:
    """Our adapter leaf of an expert weight: "layers/mlp/experts/up_proj_lora/lora_b"."""
    return f"{_root(cfg, layer)}/{adapter_module(module)}/{leaf}"


def _expert_modules(cfg: ModelConfig, layer: int) -> list[str]:
    if cfg.feed_forward[layer] != "moe":
        return []
    return [m for m in EXPERT_MODULES if m in cfg.lora.modules]




def _paths(cfg: ModelConfig, layer: int) -> dict[str, tuple[str, str]]:
    """Our adapter paths of `layer` (stacked paths when scanned) -> (HF module, leaf)."""
    root = _root(cfg, layer)
    groups = families.family(cfg.model_type).tensors.groups()
    present = adapter_targets.layer_projections(cfg, layer)
    out = {}
    for module in cfg.lora.modules:
        if module in EXPERT_MODULES or module not in present:
            continue
        hf = adapter_targets.hf_module(cfg, layer, module)
        out[f"{root}/{module}/lora_b"] = (hf, "lora_B")
        group = groups.get(module)
        parent = module.split("/")[0]
        owner = f"{parent}/{group}" if group else module
        out[f"{root}/{owner}/lora_a"] = (hf, "lora_A")
    return out


def _b_rows(shapes: dict[str, tuple[int, ...]], module: str) -> int:
    """How many output rows our projection `module` has (its share of a fused B), from
    its B's shape ([layers,] rank, out...)."""
    path, shape = next((p, s) for p, s in shapes.items()
                       if p.endswith(f"/{module}/lora_b"))
    return math.prod(shape[2 if path.startswith("layers/") else 1:])


def _slots(cfg: ModelConfig, shapes: dict[str, tuple[int, ...]]) -> list[_Slot]:
    """Every adapter array (per layer) and its PEFT tensor; `shapes`: the adapter's."""
    names = families.family(cfg.model_type).tensors
    slots = []
    for layer in _layers(cfg):
        for path, (hf, leaf) in _paths(cfg, layer).items():
            row = 0
            if leaf == "lora_B":
                module = split_layer_path(cfg, path)[1].removesuffix("/lora_b")
                _, position = names.in_layer(layer, module)
                fused = [f for f in names.fused if module in f.parts]
                if fused:
                    row = sum(_b_rows(shapes, p) for p in fused[0].parts[:position])
            slots.append(_Slot(path, layer, f"{PREFIX}{hf}.{leaf}.weight", row))
    return slots


def to_peft(cfg: ModelConfig, adapter: Params, per_expert: bool = False
            ) -> dict[str, np.ndarray]:
    """PEFT's tensors (float32 as stored by the run's param dtype) from our adapter tree;
    the experts on transformers' stacked parameters, or with `per_expert` on per-expert
    modules where the checkpoint has them."""
    flat = {path_str(p): np.asarray(jax.device_get(x))
            for p, x in jax.tree_util.tree_flatten_with_path(adapter)[0]}
    out = _experts_to_peft(cfg, flat, per_expert)
    pieces: dict[str, list[tuple[int, np.ndarray]]] = {}
    for slot in _slots(cfg, {path: x.shape for path, x in flat.items()}):
        ours = _in_layer(cfg, flat[slot.path], slot.layer)
        if slot.path.endswith("lora_a"):  # [in..., r] -> [r, in]
            tensor = ours.reshape(-1, ours.shape[-1]).T
        else:  # [r, out...] -> [out, r]
            tensor = ours.reshape(ours.shape[0], -1).T
        pieces.setdefault(slot.peft_name, []).append((slot.row, tensor))
    for name, parts in pieces.items():
        parts = sorted(parts, key=lambda p: p[0])
        out[name] = np.ascontiguousarray(np.concatenate([t for _, t in parts])
                                         if len(parts) > 1 else parts[0][1])
    return out


def _experts_to_peft(cfg: ModelConfig, flat: dict[str, np.ndarray], per_expert: bool
                     ) -> dict[str, np.ndarray]:
    out = {}
    for layer in _layers(cfg):
        def ours(module):
            return tuple(_in_layer(cfg, flat[_expert_leaf(cfg, layer, module, leaf)], layer)
                         for leaf in ("lora_a", "lora_b"))
        for module in _expert_modules(cfg, layer) if per_expert else ():
            a, b = ours(module)
            names = peft_experts.per_expert_names(cfg, layer, module)
            if not names:
                raise AdapterError(f"{cfg.model_type} stores its experts stacked: there are "
                                   "no per-expert modules to write adapters for")
            for e, (a_name, b_name) in enumerate(names):  # [r, in], [out, r]
                out[a_name], out[b_name] = a[e].T.copy(), b[e].T.copy()
        for slot in () if per_expert else peft_experts.fused_slots(cfg, layer):
            out[slot.a_name], out[slot.b_name] = peft_experts.to_fused(
                slot.parameter, [ours(m) for m in slot.modules])
    return out


def _experts_from_peft(cfg: ModelConfig, tensors: dict[str, np.ndarray],
                       host: dict[str, np.ndarray], scales: dict[str, float]) -> None:
    """Fills our expert adapter arrays in `host` from either PEFT layout."""
    for layer in _layers(cfg):
        def put(module, a, b):
            for leaf, value in (("lora_a", a), ("lora_b", b)):
                target = host[_expert_leaf(cfg, layer, module, leaf)]
                _in_layer(cfg, target, layer)[...] = value
        for module in _expert_modules(cfg, layer):
            names = peft_experts.per_expert_names(cfg, layer, module)
            if names and names[0][0] in tensors:
                put(module, np.stack([tensors[a].T for a, _ in names]),
                    np.stack([tensors[b].T for _, b in names]))
        for slot in peft_experts.fused_slots(cfg, layer):
            if slot.a_name not in tensors:
                continue
            try:
                parts = peft_experts.from_fused(
                    slot.parameter, tensors[slot.a_name], tensors[slot.b_name],
                    cfg.moe.num_experts, cfg.lora.rank,
                    scales.get(slot.key, cfg.lora.scale) / cfg.lora.scale, slot.b_name)
            except peft_experts.ExpertAdapterError as e:
                raise AdapterError(str(e)) from None
            for module, (a, b) in zip(slot.modules, parts):
                put(module, a, b)


def from_peft(cfg: ModelConfig, tensors: dict[str, np.ndarray], dtype: Any,
              scales: dict[str, float] | None = None) -> Params:
    """Our adapter tree from PEFT's tensors (each checked for presence and shape);
    `scales`: a stacked expert parameter's own PEFT scale where its rank or alpha differs
    from the adapter's ("model.layers.0.mlp.experts.gate_up_proj" -> alpha / R)."""
    tree = adapter_shapes(cfg)
    shapes = {path_str(p): x.shape for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}
    host = {path: np.zeros(shape, np.dtype(jnp.dtype(dtype))) for path, shape in shapes.items()}
    _experts_from_peft(cfg, tensors, host, scales or {})
    for slot in _slots(cfg, shapes):
        target = host[slot.path]
        per_layer = _in_layer(cfg, target, slot.layer)
        tensor = tensors[slot.peft_name]
        if slot.path.endswith("lora_a"):
            per_layer[...] = tensor.T.reshape(per_layer.shape)
        else:
            rows = math.prod(per_layer.shape[1:])
            per_layer[...] = tensor[slot.row:slot.row + rows].T.reshape(per_layer.shape)
    return jax.tree_util.tree_map_with_path(lambda p, _: jnp.asarray(host[path_str(p)]), tree)


def adapter_shapes(cfg: ModelConfig) -> Params:
    """The adapter part of the parameter tree, as shapes."""
    return split(param_shapes(cfg))[1]


def split(params: Params) -> tuple[Params, Params]:
    """(base, adapter): the tree's dense leaves and its LoRA leaves, as two nested dicts."""
    return (select(params, lambda p: not is_adapter_path(p)),
            select(params, is_adapter_path))


def union(base: Params, adapter: Params) -> Params:
    """One parameter tree of both (the tree a LoRA model applies); shares the arrays."""
    return join_base(base, adapter)


def save_peft(cfg: ModelConfig, adapter: Params, out_dir: str | os.PathLike,
              base_model: str) -> None:
    """Writes a PEFT LoRA folder that `peft.PeftModel.from_pretrained` loads."""
    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    spec = cfg.lora
    ranks, alphas = peft_experts.written_patterns(cfg, spec.scale, spec.use_rslora)
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": spec.rank,
        "lora_alpha": spec.alpha, "lora_dropout": spec.dropout, "use_rslora": spec.use_rslora,
        "target_modules": adapter_targets.hf_names(cfg, spec.modules), "bias": "none",
        "target_parameters": adapter_targets.hf_parameters(cfg, spec.modules,
                                                           spec.layers) or None,
        "rank_pattern": ranks, "alpha_pattern": alphas,
        "fan_in_fan_out": False, "inference_mode": True, "init_lora_weights": True,
        "modules_to_save": None, "use_dora": False,
        "layers_to_transform": None if spec.layers is None else list(spec.layers),
        "base_model_name_or_path": base_model}
    save_file(to_peft(cfg, adapter), os.path.join(out_dir, WEIGHTS_FILE),
              metadata={"format": "pt"})
    with open(os.path.join(out_dir, CONFIG_FILE), "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)


# adapter_config.json settings whose other values change what the adapter computes.
_MUST_BE = {"peft_type": "LORA", "bias": "none", "fan_in_fan_out": False, "use_dora": False,
            "modules_to_save": None}


def _read_config(folder: str) -> tuple[str, dict]:
    path = os.path.join(folder, CONFIG_FILE)
    if not os.path.isfile(path):
        raise AdapterError(f"{folder}: no {CONFIG_FILE} (expected a PEFT LoRA adapter folder)")
    try:
        with open(path) as f:
            return path, json.load(f)
    except json.JSONDecodeError as e:
        raise AdapterError(f"{path}: not valid JSON ({e})") from e


def _expert_keys(cfg: ModelConfig) -> list[str]:
    """Every stacked expert parameter as PEFT's patterns match it."""
    tensors = families.family(cfg.model_type).tensors
    return [f"{tensors.body}.layers.{i}.{t.tensor}" for i in range(cfg.num_layers)
            if cfg.feed_forward[i] == "moe" for t in tensors.expert_parameters()]


def _check_patterns(path: str, config: dict, cfg: ModelConfig) -> None:
    """rank_pattern / alpha_pattern may only size the stacked expert parameters (whose
    rank we read from the tensors); elsewhere our one rank and alpha would be wrong."""
    others = [adapter_targets.hf_module(cfg, i, m) for i in range(cfg.num_layers)
              for m in adapter_targets.layer_projections(cfg, i) if m not in EXPERT_MODULES]
    for key in ("rank_pattern", "alpha_pattern"):
        for pattern in config.get(key) or {}:
            def hits(names):
                return any(peft_experts.pattern_value({pattern: 1}, n, None) for n in names)
            if hits(others) or not hits(_expert_keys(cfg)):
                raise AdapterError(f"{path}: {key} {pattern!r} is not supported (only the "
                                   "experts' stacked parameters may take another rank)")


def _resolve_targets(path: str, config: dict, cfg: ModelConfig
                     ) -> tuple[tuple[str, ...], tuple[int, ...] | None]:
    """Our modules from target_modules and target_parameters together."""
    layers = config.get("layers_to_transform")
    layers = (layers,) if isinstance(layers, int) else tuple(layers) if layers else None
    modules, chosen = [], set()
    for key in ("target_modules", "target_parameters"):
        raw = config.get(key)
        if not raw:
            continue
        wanted = f"re:{raw}" if isinstance(raw, str) and raw != adapter_targets.ALL_LINEAR \
            else raw
        try:
            found, where = adapter_targets.resolve(cfg, adapter_targets.parse(wanted), layers)
        except adapter_targets.TargetError as e:
            raise AdapterError(f"{path}: {key}: {e}") from e
        modules += [m for m in found if m not in modules]
        chosen |= set(range(cfg.num_layers) if where is None else where)
    if not modules:
        raise AdapterError(f"{path}: no target_modules or target_parameters")
    return tuple(modules), (None if len(chosen) == cfg.num_layers else tuple(sorted(chosen)))


def read_spec(folder: str, cfg: ModelConfig) -> LoraSpec:
    """The LoraSpec an adapter folder's config describes for model `cfg`."""
    return _spec(*_read_config(folder), cfg)


def _spec(path: str, config: dict, cfg: ModelConfig) -> LoraSpec:
    """The LoraSpec of adapter_config.json `config` (read from `path`) for model `cfg`."""
    for key, expected in _MUST_BE.items():
        value = config.get(key, expected)
        if value != expected and not (expected is None and not value):
            raise AdapterError(f"{path}: {key}={value!r} is not supported (only {expected!r})")
    for key in ("r", "lora_alpha"):
        if key not in config:
            raise AdapterError(f"{path}: no {key!r}")
    _check_patterns(path, config, cfg)
    modules, layers = _resolve_targets(path, config, cfg)
    try:
        return LoraSpec(int(config["r"]), float(config["lora_alpha"]), modules,
                        bool(config.get("use_rslora", False)),
                        float(config.get("lora_dropout") or 0.0), layers)
    except ValueError as e:
        raise AdapterError(f"{path}: {e}") from None


def _expert_scales(config: dict, cfg: ModelConfig) -> dict[str, float]:
    """PEFT's scale of each stacked expert parameter: alpha / R from its patterns."""
    out = {}
    for key in _expert_keys(cfg):
        rank = peft_experts.pattern_value(config.get("rank_pattern"), key, config["r"])
        alpha = peft_experts.pattern_value(config.get("alpha_pattern"), key,
                                           config["lora_alpha"])
        out[key] = alpha / (rank ** 0.5 if config.get("use_rslora") else rank)
    return out


def _expected_shapes(cfg: ModelConfig, config: dict, per_expert: bool
                     ) -> dict[str, tuple[int, ...]]:
    """PEFT's tensor shapes for this adapter; a stacked expert parameter's at the rank its
    rank_pattern gives."""
    expected = {name: t.shape for name, t in
                to_peft(cfg, adapter_shapes_zeros(cfg), per_expert).items()}
    for layer in [] if per_expert else _layers(cfg):
        for slot in peft_experts.fused_slots(cfg, layer):
            rows = cfg.moe.num_experts * peft_experts.pattern_value(
                config.get("rank_pattern"), slot.key, config["r"])
            expected[slot.a_name] = (rows, expected[slot.a_name][1])
            expected[slot.b_name] = (expected[slot.b_name][0], rows)
    return expected


def load_peft(folder: str | os.PathLike, cfg: ModelConfig) -> tuple[LoraSpec, Params]:
    """An adapter folder for base model `cfg`: its spec and our adapter tree (param dtype
    of `cfg`). Every tensor must be there with its shape; extra ones are refused. The
    experts' adapters may be on the stacked parameters or on per-expert modules."""
    folder = os.fspath(folder)
    path, config = _read_config(folder)
    spec = _spec(path, config, cfg)
    lora_cfg = dataclasses.replace(cfg, projection="lora", lora=spec)
    file = os.path.join(folder, WEIGHTS_FILE)
    try:
        with safe_open(file, framework="numpy") as handle:
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    except (SafetensorError, OSError, FileNotFoundError) as e:
        raise AdapterError(f"{file}: cannot read as safetensors ({e})") from e
    per_expert = any(".experts.0." in name for name in tensors)
    expected = _expected_shapes(lora_cfg, config, per_expert)
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    wrong = sorted(f"{n}: {list(tensors[n].shape)}, expected {list(expected[n])}"
                   for n in set(expected) & set(tensors) if tensors[n].shape != expected[n])
    if missing or unexpected or wrong:
        lines = [f"{title} ({len(items)}): " + ", ".join(items[:4])
                 + (" ..." if len(items) > 4 else "")
                 for title, items in (("missing", missing), ("unexpected", unexpected),
                                      ("wrong shape", wrong)) if items]
        raise AdapterError(f"{file}: the adapter does not fit this {cfg.model_type} model "
                           f"(rank {spec.rank}, {cfg.num_layers} layers)\n  " + "\n  ".join(lines))
    return spec, from_peft(lora_cfg, tensors, cfg.param_dtype, _expert_scales(config, cfg))


def adapter_shapes_zeros(cfg: ModelConfig) -> Params:
    """Zero arrays in the adapter's shapes (host numpy), to name and size PEFT tensors."""
    return jax.tree.map(lambda s: np.zeros(s.shape, np.float32), adapter_shapes(cfg))


def merge(cfg: ModelConfig, params: Params) -> tuple[ModelConfig, Params]:
    """The dense model with every adapter folded into its kernel: W + scale * A B, summed
    in float32 and cast back to the kernel's dtype."""
    base, adapter = split(params)
    flat_adapter = {path_str(p): x for p, x in jax.tree_util.tree_flatten_with_path(adapter)[0]}
    groups = families.family(cfg.model_type).tensors.groups()
    scale = cfg.lora.scale

    def fold(key_path, kernel):
        path = path_str(key_path)
        root, inside = split_layer_path(cfg, path) or (path, "")
        parts = inside.split("/")
        module, leaf = "/".join(parts[:-1]), inside
        if leaf in EXPERT_MODULES and leaf in cfg.lora.modules:  # a stacked expert weight
            lora = f"{root}/{adapter_module(leaf)}"
            a = flat_adapter[f"{lora}/lora_a"].astype(jnp.float32)
            b = flat_adapter[f"{lora}/lora_b"].astype(jnp.float32)
            delta = jnp.einsum("...eir,...ero->...eio", a, b)
            return (kernel.astype(jnp.float32) + scale * delta).astype(kernel.dtype)
        if parts[-1] != "kernel" or module not in cfg.lora.modules:
            return kernel
        group = groups.get(module)
        owner = f"{module.split('/')[0]}/{group}" if group else module
        a = flat_adapter[f"{root}/{owner}/lora_a"].astype(jnp.float32)
        b = flat_adapter[f"{root}/{module}/lora_b"].astype(jnp.float32)
        stacked = root.startswith("layers") and cfg.scan_layers
        lead = a.shape[:1] if stacked else ()
        a2 = a.reshape(*lead, -1, a.shape[-1])
        b2 = b.reshape(*lead, b.shape[len(lead)], -1)
        delta = jnp.matmul(a2, b2).reshape(kernel.shape)
        return (kernel.astype(jnp.float32) + scale * delta).astype(kernel.dtype)

    merged = jax.tree_util.tree_map_with_path(fold, base)
    return dataclasses.replace(cfg, projection="dense", lora=None), merged
