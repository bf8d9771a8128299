"""The model a run config asks for, with a vocabulary that covers its tokenizer."""

from __future__ import annotations

from typing import Any

from coach_jax.models.config import ModelConfig
from coach_jax.models.decoder import Params, ShardingFn, init
from coach_jax.models.hf_checkpoint import load_hf
from coach_jax.models.vocab import fit_vocab


def build_model(model_config: Any, tokenizer_size: int, seed: int,
                sharding: ShardingFn | None = None) -> tuple[ModelConfig, Params]:
    """`model_config` is the `config.model` section: `hf_path` loads that folder, otherwise
    `init` (HF config.json names) is initialised from `seed`. See models/vocab.py for how
    the vocabulary is grown and padded."""
    runtime = dict(compute_dtype=model_config.dtype, scan_layers=model_config.scan_layers,
                   remat=model_config.remat)
    if model_config.hf_path:
        cfg, params = load_hf(model_config.hf_path, dtype=model_config.param_dtype,
                              sharding=sharding, **runtime)
    else:
        spec = dict(model_config.init)
        spec["vocab_size"] = max(spec["vocab_size"], tokenizer_size)
        cfg = ModelConfig.from_hf_dict(spec, param_dtype=model_config.param_dtype, **runtime)
        params = init(cfg, seed, sharding=sharding)
    return fit_vocab(cfg, params, tokenizer_size, model_config.vocab_multiple)
