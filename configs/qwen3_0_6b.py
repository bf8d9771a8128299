"""SFT of Qwen3-0.6B from a local Hugging Face folder (coach_jax never downloads).

Fetch the model once where you have network access, e.g.
  huggingface-cli download <org>/Qwen3-0.6B --local-dir models/Qwen3-0.6B
then point data.train at your data:
  python -m coach_jax.main --config configs/qwen3_0_6b.py:models/Qwen3-0.6B --workdir runs/qwen3_0_6b \
      --config.data.train=data/train.jsonl --config.data.eval=data/eval.jsonl
The part after ':' is the model folder (default models/Qwen3-0.6B); the tokenizer and its
chat template come from the same folder.
"""

from coach_jax.config import finetune_config


def get_config(hf_path: str = "models/Qwen3-0.6B"):
    return finetune_config(hf_path, learning_rate=1e-5)
