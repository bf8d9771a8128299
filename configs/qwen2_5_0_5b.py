"""SFT of Qwen2.5-0.5B-Instruct from a local Hugging Face folder (coach_jax never downloads).

Fetch the model once where you have network access, e.g.
  huggingface-cli download <org>/Qwen2.5-0.5B-Instruct --local-dir models/Qwen2.5-0.5B-Instruct
then point data.train at your data:
  python -m coach_jax.main --config configs/qwen2_5_0_5b.py:models/Qwen2.5-0.5B-Instruct --workdir runs/qwen2_5_0_5b \
      --config.data.train=data/train.jsonl --config.data.eval=data/eval.jsonl
The part after ':' is the model folder (default models/Qwen2.5-0.5B-Instruct); the tokenizer and its
chat template come from the same folder.
"""

from coach_jax.config import finetune_config


def get_config(hf_path: str = "models/Qwen2.5-0.5B-Instruct"):
    return finetune_config(hf_path, learning_rate=1e-5)
