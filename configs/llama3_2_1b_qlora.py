"""QLoRA on Llama-3.2-1B-Instruct from a local Hugging Face folder (coach_jax never downloads).

Fetch the model once where you have network access, e.g.
  huggingface-cli download meta-llama/Llama-3.2-1B-Instruct --local-dir models/Llama-3.2-1B-Instruct
then:
  pip install 'coach_jax[qlora]'
  python -m coach_jax.main --config configs/llama3_2_1b_qlora.py:models/Llama-3.2-1B-Instruct \
      --workdir runs/llama3_2_1b_qlora --config.data.train=data/train.jsonl
configs/llama3_2_1b_lora.py with the frozen base's projections held as NF4 in blocks of 64
(docs/adapters.md); DIR/export is a PEFT adapter folder, and export.merge_adapters=True
folds it into the checkpoint's own full-precision weights.
"""

from coach_jax.config import lora_config


def get_config(hf_path: str = "models/Llama-3.2-1B-Instruct"):
    return lora_config(hf_path, quantize_base="nf4")
