"""The trained model in Hugging Face format, ready to serve: weights, config, tokenizer,
chat template and a generation config that stops on the template's end-of-turn token."""

from __future__ import annotations

import os
from typing import Any

import transformers

from coach_jax import models
from coach_jax.data.chat_encoding import stop_token_ids
from coach_jax.models.config import ModelConfig
from coach_jax.models.decoder import Params


def export_hf(out_dir: str, cfg: ModelConfig, params: Params, tokenizer: Any,
              dtype: str | None = None, end_of_turn: str = "") -> str:
    """Writes out_dir; the vocabulary padding is cut off. A tokenizer without a pad token
    gets its EOS as pad in the generation config (batched generation needs one)."""
    cfg, params = models.unpad_vocab(cfg, params)
    models.save_hf(cfg, params, out_dir, dtype=dtype or None)
    write_tokenizer_files(out_dir, tokenizer, end_of_turn)
    return os.path.abspath(out_dir)


def write_tokenizer_files(out_dir: str, tokenizer: Any, end_of_turn: str = "") -> None:
    """The tokenizer (with its chat template) and a generation config that stops on the
    template's end-of-turn token; beside weights or an adapter."""
    tokenizer.save_pretrained(out_dir)
    eos = stop_token_ids(tokenizer, end_of_turn)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos or [None])[0]
    transformers.GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=eos, pad_token_id=pad,
    ).save_pretrained(out_dir)
