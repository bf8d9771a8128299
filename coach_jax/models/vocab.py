"""Making the model's vocabulary agree with the tokenizer's.

- Tokens the tokenizer has beyond the checkpoint's vocabulary (chat tokens added for
  fine-tuning) get new embedding rows (and LM-head columns) initialised to the mean of the
  existing ones: a new token starts as an "average" token instead of noise that would
  dominate the first steps.
- The vocabulary can be padded to a multiple (e.g. 128, so it divides a tensor-parallel
  axis). Padding rows are initialised the same way; their logits are masked
  (`ModelConfig.real_vocab_size`) and `unpad_vocab` cuts them off before export.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from coach_jax.models.config import ModelConfig
from coach_jax.models.decoder import Params


def _grow(matrix, new_size: int, axis: int):
    """Appends rows (axis 0) or columns (axis 1) equal to the mean of the existing ones."""
    extra = new_size - matrix.shape[axis]
    mean = matrix.mean(axis=axis, keepdims=True).astype(matrix.dtype)
    repeated = jnp.repeat(mean, extra, axis=axis)
    return jnp.concatenate([matrix, repeated], axis=axis)


def fitted_sizes(cfg: ModelConfig, tokenizer_size: int, multiple: int = 1
                 ) -> tuple[int, int]:
    """(real, padded): the vocabulary covering the tokenizer, padded to `multiple`."""
    real = max(cfg.real_vocab_size or cfg.vocab_size, tokenizer_size)
    return real, -(-real // multiple) * multiple


def fit_vocab(cfg: ModelConfig, params: Params, tokenizer_size: int, multiple: int = 1
              ) -> tuple[ModelConfig, Params]:
    """Grows the vocabulary to cover the tokenizer and pads it to `multiple`."""
    real, padded = fitted_sizes(cfg, tokenizer_size, multiple)
    if padded == cfg.vocab_size:
        return dataclasses.replace(cfg, real_vocab_size=real if real < padded else None), params
    if padded < cfg.vocab_size:
        raise ValueError(f"the model's vocabulary ({cfg.vocab_size}) is already larger than "
                         f"{padded}")
    params = dict(params)
    params["embed_tokens"] = _grow(params["embed_tokens"], padded, axis=0)
    if "lm_head" in params:
        params["lm_head"] = _grow(params["lm_head"], padded, axis=1)
    cfg = dataclasses.replace(cfg, vocab_size=padded,
                              real_vocab_size=real if real < padded else None)
    return cfg, params


def unpad_vocab(cfg: ModelConfig, params: Params) -> tuple[ModelConfig, Params]:
    """The model without its vocabulary padding, ready for `save_hf`."""
    if cfg.real_vocab_size is None or cfg.real_vocab_size == cfg.vocab_size:
        return dataclasses.replace(cfg, real_vocab_size=None), params
    real = cfg.real_vocab_size
    params = dict(params)
    params["embed_tokens"] = params["embed_tokens"][:real]
    if "lm_head" in params:
        params["lm_head"] = params["lm_head"][:, :real]
    return dataclasses.replace(cfg, vocab_size=real, real_vocab_size=None), params
