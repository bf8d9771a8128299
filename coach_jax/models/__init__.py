"""The decoder (each family of families.py, by configuration) and its HF interop."""

from coach_jax.models.config import Llama3RopeScaling, ModelConfig, UnsupportedModelError
from coach_jax.models.decoder import (Params, ShardingFn, apply, count_params, decode,
                                      hidden_states, init, logical_axes, logits_from_hidden,
                                      param_shapes)
from coach_jax.models.kv_cache import KVCache, init_cache
from coach_jax.models.hf_checkpoint import CheckpointError, load_hf, save_hf
from coach_jax.models.vocab import fit_vocab, unpad_vocab

__all__ = [
    "CheckpointError", "KVCache", "Llama3RopeScaling", "ModelConfig", "Params", "ShardingFn",
    "UnsupportedModelError", "apply", "count_params", "decode", "fit_vocab", "hidden_states",
    "init", "init_cache", "load_hf", "logical_axes", "logits_from_hidden", "param_shapes",
    "save_hf", "unpad_vocab",
]
