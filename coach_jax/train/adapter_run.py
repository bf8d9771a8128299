"""What an adapter (LoRA) run builds besides a full fine-tuning run's parts: the adapter
on the frozen base, the base's fingerprint for checkpoints, and the exports.

The base stays outside the train state: the state holds the adapter and its optimizer
state only, so checkpoints are adapter-sized, and evals, generation and the forgetting
monitor apply the same base arrays (never a second copy).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
from typing import Any, Callable

import jax
import jax.numpy as jnp

from coach_jax import adapters, models, parallel
from coach_jax.config import AdapterSettings, ConfigError, Settings
from coach_jax.export import export_hf, write_tokenizer_files
from coach_jax.models.config import ModelConfig
from coach_jax.models.decoder import Params
from coach_jax.models.builder import build_model
from coach_jax.models.lora import LoraSpec, is_adapter_path, join_base

# The base fingerprint reads tensors up to this size whole, larger ones by SLICES slices.
WHOLE_TENSOR_BYTES = 1 << 20
SLICES, SLICE_BYTES = 16, 1 << 12


def build_adapter(settings: Settings, base_cfg: ModelConfig, tokenizer_size: int,
                  mesh: jax.sharding.Mesh) -> tuple[ModelConfig, Params]:
    """The LoRA model's config and its adapter parameters, placed on the mesh: fresh
    (A Kaiming-uniform, B zero, seeded by train.seed) or adapter.init_from's."""
    a = settings.adapter
    if settings.model.hf_path:
        real_vocab = ModelConfig.from_hf_dir(settings.model.hf_path).vocab_size
        if tokenizer_size > real_vocab:
            raise ConfigError(
                f"the tokenizer has {tokenizer_size - real_vocab} tokens the base model has no "
                f"embedding for (vocab_size {real_vocab} in {settings.model.hf_path}); "
                "adapter.kind=lora trains no embedding rows, so the model could never learn "
                "them (e.g. a chat template's end-of-turn token): use a tokenizer the base "
                "model knows, or full fine-tuning (adapter.kind=none)")
    modules, layers = adapters.resolve(base_cfg, a.targets, a.layers or None)
    wanted = LoraSpec(a.rank, a.alpha, modules, a.use_rslora, a.dropout, layers)
    if a.init_from:
        spec, adapter = adapters.load_peft(a.init_from, base_cfg)
        check_matches(spec, wanted, a)
    cfg = dataclasses.replace(base_cfg, projection="lora", lora=wanted)
    if a.init_from:
        return cfg, parallel.place(adapter, parallel.tree_shardings(adapter, cfg, mesh))
    return cfg, models.init(cfg, settings.train.seed, parallel.sharding_fn(cfg, mesh),
                            only=is_adapter_path)


def base_transform(settings: Settings) -> Callable[[str, jax.Array], Any] | None:
    """QLoRA: quantizes each projection kernel of the base as it is loaded."""
    a = settings.adapter
    if not a.enabled or a.quantize_base == "none":
        return None
    return functools.partial(_quantize_leaf, qtype=a.quantize_base, block=a.quantize_block)


def _quantize_leaf(path: str, x: jax.Array, *, qtype: str, block: int) -> Any:
    from coach_jax.models import quantize  # qwix is needed only for QLoRA
    return quantize.quantize_leaf(path, x, qtype, block)


def check_matches(found: LoraSpec, wanted: LoraSpec, a: AdapterSettings) -> None:
    """adapter.init_from's adapter must be the one the config describes (its dropout, a
    training choice, may differ: the config's applies)."""
    differences = [f"{key}: the folder has {f!r}, the config {w!r}" for key, f, w in (
        ("adapter.rank", found.rank, wanted.rank), ("adapter.alpha", found.alpha, wanted.alpha),
        ("adapter.use_rslora", found.use_rslora, wanted.use_rslora),
        ("adapter.targets", found.modules, wanted.modules),
        ("adapter.layers", found.layers, wanted.layers)) if f != w]
    if differences:
        raise ConfigError(f"adapter.init_from={a.init_from}: its adapter differs from the "
                          "config's (" + "; ".join(differences) + ")")


def count_base_params(base: Params) -> int:
    """The base's weights (a quantized kernel counts its weights, not its scales)."""
    leaves = jax.tree.leaves(base, is_leaf=lambda x: hasattr(x, "qvalue"))
    return int(sum(x.qvalue.size if hasattr(x, "qvalue") else x.size for x in leaves))


def base_note(settings: Settings) -> str:
    """How the frozen base is held, for the parameter line of the run log."""
    a = settings.adapter
    if not a.enabled:
        return ""
    if a.quantize_base == "none":
        return f" (the base; LoRA rank {a.rank})"
    return (f" (the base, its projections in {a.quantize_base} blocks of "
            f"{a.quantize_block}; LoRA rank {a.rank})")


def zero_adapter(adapter: Params) -> Params:
    """B = 0 everywhere (and A too): with it, the LoRA model computes the base exactly.
    The forgetting monitor's reference is the base joined with this, not a copy."""
    return jax.tree.map(jnp.zeros_like, adapter)


def base_fingerprint(settings: Settings) -> str:
    """Which base an adapter belongs to: config.json and every tensor of the weight files,
    small ones whole and large ones by slices spread over them (a few MB read for an 8B
    model; a fine-tuned derivative changes every tensor); a from-scratch base is its
    model.init and seed."""
    digest = hashlib.sha256()
    folder = settings.model.hf_path
    if not folder:
        digest.update(json.dumps([settings.model.init, settings.train.seed]).encode())
        return digest.hexdigest()[:16]
    with open(os.path.join(folder, "config.json"), "rb") as f:
        digest.update(f.read())
    for name in sorted(n for n in os.listdir(folder) if n.endswith(".safetensors")):
        with open(os.path.join(folder, name), "rb") as f:
            header_size = int.from_bytes(f.read(8), "little")
            header = f.read(header_size)
            digest.update(header)
            for entry in json.loads(header).values():
                if "data_offsets" not in entry:  # __metadata__
                    continue
                begin, end = (8 + header_size + o for o in entry["data_offsets"])
                starts = ([begin] if end - begin <= WHOLE_TENSOR_BYTES else
                          [begin + (end - begin - SLICE_BYTES) * i // (SLICES - 1)
                           for i in range(SLICES)])
                for start in starts:
                    f.seek(start)
                    digest.update(f.read(min(end - start, WHOLE_TENSOR_BYTES)
                                         if len(starts) == 1 else SLICE_BYTES))
    return digest.hexdigest()[:16]


def full_precision_base(settings: Settings, tokenizer_size: int) -> Params:
    """A QLoRA run's base as the checkpoint holds it, read again into host memory (never
    the device, which holds the quantized one)."""
    host = jax.sharding.SingleDeviceSharding(jax.devices("cpu")[0])
    _, base = build_model(settings.model, tokenizer_size, settings.train.seed,
                          sharding=lambda path: host)
    return base


def export_adapter(workdir: str, cfg: ModelConfig, params: Params, tokenizer: Any,
                   settings: Settings) -> str:
    """DIR/export: a PEFT adapter folder with the tokenizer and generation config; with
    export.merge_adapters, DIR/export_merged: the base with the adapter folded in (in
    float32, written in export.dtype or the parameter dtype)."""
    out = os.path.join(workdir, "export")
    _, adapter = adapters.split(params)
    base_name = os.path.abspath(settings.model.hf_path) if settings.model.hf_path else ""
    adapters.save_peft(cfg, adapter, out, base_model=base_name)
    end_of_turn = settings.data.encode.end_of_turn
    write_tokenizer_files(out, tokenizer, end_of_turn)
    if settings.adapter.merge_on_export:
        if settings.adapter.quantize_base != "none":  # merge into the full-precision base
            params = join_base(full_precision_base(settings, len(tokenizer)),
                               jax.device_get(adapter))
        merged_cfg, merged = adapters.merge(cfg, params)
        export_hf(os.path.join(workdir, "export_merged"), merged_cfg, merged, tokenizer,
                  settings.export.dtype, end_of_turn)
    return os.path.abspath(out)
