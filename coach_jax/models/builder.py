"""The model a run config asks for: pretrained HF weights, or a random tiny model."""

from __future__ import annotations

from typing import Any

from coach_jax.models.config import ModelConfig
from coach_jax.models.decoder import Params, ShardingFn, init
from coach_jax.models.hf_checkpoint import load_hf

# Fields of `config.model` that describe a from-scratch architecture (ignored with hf_path).
ARCHITECTURE_FIELDS = ("model_type", "vocab_size", "hidden_size", "intermediate_size",
                       "num_layers", "num_heads", "num_kv_heads", "head_dim", "rope_theta",
                       "rms_norm_eps", "tie_word_embeddings", "max_position_embeddings")
RUNTIME_FIELDS = ("compute_dtype", "scan_layers")


def build_model(model_config: Any, seed: int, sharding: ShardingFn | None = None
                ) -> tuple[ModelConfig, Params]:
    """`model_config` is the `config.model` section: `hf_path` set loads that folder,
    otherwise a model of the listed architecture is initialised from `seed`."""
    runtime = {k: model_config[k] for k in RUNTIME_FIELDS}
    if model_config.hf_path:
        return load_hf(model_config.hf_path, dtype=model_config.param_dtype, sharding=sharding,
                       **runtime)
    cfg = ModelConfig(**{k: model_config[k] for k in ARCHITECTURE_FIELDS},
                      param_dtype=model_config.param_dtype, **runtime)
    return cfg, init(cfg, seed, sharding=sharding)
