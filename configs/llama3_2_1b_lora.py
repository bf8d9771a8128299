"""LoRA on Llama-3.2-1B-Instruct from a local Hugging Face folder (coach_jax never downloads).

Fetch the model once where you have network access, e.g.
  huggingface-cli download meta-llama/Llama-3.2-1B-Instruct --local-dir models/Llama-3.2-1B-Instruct
then:
  python -m coach_jax.main --config configs/llama3_2_1b_lora.py:models/Llama-3.2-1B-Instruct \
      --workdir runs/llama3_2_1b_lora --config.data.train=data/train.jsonl
Rank-16 adapters (alpha 32) on every projection, the base frozen; DIR/export is a PEFT
adapter folder, export.merge_adapters=True adds the merged model (docs/adapters.md).
"""

from coach_jax.config import lora_config


def get_config(hf_path: str = "models/Llama-3.2-1B-Instruct"):
    return lora_config(hf_path)
