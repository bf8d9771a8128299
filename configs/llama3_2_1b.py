"""SFT of Llama-3.2-1B-Instruct from a local Hugging Face folder (coach_jax never downloads).

Fetch the model once where you have network access, e.g.
  huggingface-cli download <org>/Llama-3.2-1B-Instruct --local-dir models/Llama-3.2-1B-Instruct
then point data.train at your data:
  python -m coach_jax.main --config configs/llama3_2_1b.py:models/Llama-3.2-1B-Instruct --workdir runs/llama3_2_1b \
      --config.data.train=data/train.jsonl --config.data.eval=data/eval.jsonl
The part after ':' is the model folder (default models/Llama-3.2-1B-Instruct); the tokenizer and its
chat template come from the same folder.
"""

from coach_jax.config import finetune_config


def get_config(hf_path: str = "models/Llama-3.2-1B-Instruct"):
    return finetune_config(hf_path, learning_rate=1e-5)
