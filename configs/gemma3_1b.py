"""SFT of Gemma 3 1B from a local Hugging Face folder (coach_jax never downloads).

Fetch the model once where you have network access (accept its licence first), e.g.
  huggingface-cli download google/gemma-3-1b-it --local-dir models/gemma-3-1b-it
then point data.train at your data:
  python -m coach_jax.main --config configs/gemma3_1b.py:models/gemma-3-1b-it \
      --workdir runs/gemma3_1b --config.data.train=data/train.jsonl
The 4B and larger Gemma 3 checkpoints are multimodal: coach_jax loads, trains and exports
their text decoder only (the vision tower is left out). Gemma's chat template has no system
role: a system message is folded into the first user turn (docs/data.md, system_fallback).
Its 262k vocabulary makes the chunked cross-entropy (train.chunk_tokens) matter:
docs/benchmarks.md. Full fine-tuning usually uses learning rates around 1e-5 to 5e-5.
"""

from coach_jax.config import finetune_config


def get_config(hf_path: str = "models/gemma-3-1b-it"):
    return finetune_config(hf_path, learning_rate=1e-5, max_seq_len=4096)
