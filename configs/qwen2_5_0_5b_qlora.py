"""QLoRA on Qwen2.5-0.5B-Instruct from a local Hugging Face folder (coach_jax never downloads).

Fetch the model once where you have network access, e.g.
  huggingface-cli download Qwen/Qwen2.5-0.5B-Instruct --local-dir models/Qwen2.5-0.5B-Instruct
then:
  pip install 'coach_jax[qlora]'
  python -m coach_jax.main --config configs/qwen2_5_0_5b_qlora.py:models/Qwen2.5-0.5B-Instruct \
      --workdir runs/qwen2_5_0_5b_qlora --config.data.train=data/train.jsonl
configs/qwen2_5_0_5b_lora.py with the frozen base's projections held as NF4 in blocks of 64
(docs/adapters.md); DIR/export is a PEFT adapter folder, and export.merge_adapters=True
folds it into the checkpoint's own full-precision weights.
"""

from coach_jax.config import lora_config


def get_config(hf_path: str = "models/Qwen2.5-0.5B-Instruct"):
    return lora_config(hf_path, quantize_base="nf4")
