"""The model a run config asks for, with a vocabulary that covers its tokenizer, created
directly with the shardings a mesh gives it."""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import jax

from coach_jax import parallel
from coach_jax.models.config import ModelConfig
from coach_jax.models.decoder import Params, ShardingFn, init, path_str
from coach_jax.models.hf_checkpoint import load_hf
from coach_jax.models.vocab import fit_vocab


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """The model section of a run: a local HF folder, or an HF-style config to initialise
    from scratch (`init`, config.json names and values), and the runtime switches."""

    hf_path: str
    init: tuple[tuple[str, int | float | str | bool], ...]
    dtype: str  # compute dtype
    param_dtype: str
    remat: str
    attention: str
    scan_layers: bool
    vocab_multiple: int


def model_config_of(model_config: ModelSpec, tokenizer_size: int) -> ModelConfig:
    """The ModelConfig of `model_config`: its HF folder's config.json, or `init` with a
    vocabulary that covers the tokenizer; runtime switches from the spec."""
    runtime = dict(compute_dtype=model_config.dtype, scan_layers=model_config.scan_layers,
                   remat=model_config.remat, attention=model_config.attention,
                   param_dtype=model_config.param_dtype)
    if model_config.hf_path:
        return ModelConfig.from_hf_dir(model_config.hf_path, **runtime)
    spec = dict(model_config.init)
    spec["vocab_size"] = max(spec["vocab_size"], tokenizer_size)
    return ModelConfig.from_hf_dict(spec, **runtime)


def build_model(model_config: ModelSpec, tokenizer_size: int, seed: int,
                mesh: jax.sharding.Mesh | None = None,
                transform: Callable[[str, jax.Array], Any] | None = None,
                sharding: ShardingFn | None = None) -> tuple[ModelConfig, Params]:
    """`hf_path` loads that folder, otherwise `init` is initialised from `seed`. With a
    mesh, every parameter is created or read straight into its shards (without one,
    `sharding` may place them, on the host for instance); `transform(path, array)`
    replaces each as it arrives (QLoRA's quantization). See models/vocab.py
    for how the vocabulary is grown and padded (also to a multiple of the tensor axis)."""
    cfg = model_config_of(model_config, tokenizer_size)
    if mesh is not None:
        sharding = parallel.sharding_fn(cfg, mesh)
    if model_config.hf_path:  # config.json parsed once, above
        cfg, params = load_hf(model_config.hf_path, dtype=model_config.param_dtype,
                              sharding=sharding, cfg=cfg, transform=transform)
    else:
        params = init(cfg, seed, sharding=sharding)
        if transform is not None:
            params = jax.tree_util.tree_map_with_path(
                lambda p, x: transform(path_str(p), x), params)
    multiple = model_config.vocab_multiple
    if mesh is not None:
        multiple = math.lcm(multiple, mesh.shape["tensor"])
    grown_cfg, params = fit_vocab(cfg, params, tokenizer_size, multiple)
    if mesh is not None and grown_cfg.vocab_size != cfg.vocab_size:
        table = parallel.param_shardings(grown_cfg, mesh)
        params = {**params, **{k: jax.device_put(params[k], table[k])
                               for k in ("embed_tokens", "lm_head") if k in params}}
    return grown_cfg, params
