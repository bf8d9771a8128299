"""LoRA on Qwen2.5-0.5B-Instruct from a local Hugging Face folder (coach_jax never downloads).

Fetch the model once where you have network access, e.g.
  huggingface-cli download Qwen/Qwen2.5-0.5B-Instruct --local-dir models/Qwen2.5-0.5B-Instruct
then:
  python -m coach_jax.main --config configs/qwen2_5_0_5b_lora.py:models/Qwen2.5-0.5B-Instruct \
      --workdir runs/qwen2_5_0_5b_lora --config.data.train=data/train.jsonl
Rank-16 adapters (alpha 32) on every projection, the base frozen; DIR/export is a PEFT
adapter folder, export.merge_adapters=True adds the merged model (docs/adapters.md).
"""

from coach_jax.config import lora_config


def get_config(hf_path: str = "models/Qwen2.5-0.5B-Instruct"):
    return lora_config(hf_path)
