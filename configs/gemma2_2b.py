"""SFT of Gemma 2 2B from a local Hugging Face folder (coach_jax never downloads).

Fetch the model once where you have network access (accept its licence first), e.g.
  huggingface-cli download google/gemma-2-2b-it --local-dir models/gemma-2-2b-it
then point data.train at your data:
  python -m coach_jax.main --config configs/gemma2_2b.py:models/gemma-2-2b-it \
      --workdir runs/gemma2_2b --config.data.train=data/train.jsonl
Gemma's chat template has no system role: a system message is folded into the first user
turn (docs/data.md, system_fallback). Attention soft-capping rules out cuDNN's fused kernel; model.attention
'auto' picks XLA on GPU and splash on TPU. Full fine-tuning of Gemma is usually done with
learning rates around 1e-5 to 5e-5; this recipe starts at 1e-5.
"""

from coach_jax.config import finetune_config


def get_config(hf_path: str = "models/gemma-2-2b-it"):
    return finetune_config(hf_path, learning_rate=1e-5, max_seq_len=4096)
