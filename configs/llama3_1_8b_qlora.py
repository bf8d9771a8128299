"""QLoRA on Llama-3.1-8B-Instruct on one 16 GB GPU, from a local Hugging Face folder
(coach_jax never downloads).

Fetch the model once where you have network access (accept its licence first), e.g.
  huggingface-cli download meta-llama/Llama-3.1-8B-Instruct --local-dir models/Llama-3.1-8B-Instruct
then:
  pip install 'coach_jax[qlora]'
  python -m coach_jax.main --config configs/llama3_1_8b_qlora.py:models/Llama-3.1-8B-Instruct \
      --workdir runs/llama3_1_8b_qlora --config.data.train=data/train.jsonl
The base's projections are held as NF4 (blocks of 64) and the rank-16 adapters train in
bf16 compute with the whole layer recomputed in the backward pass (model.remat=full), one
2048-token row per step and 16 micro-batches per batch of 16 rows (docs/adapters.md).
"""

from coach_jax.config import lora_config


def get_config(hf_path: str = "models/Llama-3.1-8B-Instruct"):
    return lora_config(hf_path, quantize_base="nf4", max_seq_len=2048,
                       global_batch_size=16, micro_batches=16, big_model=True)
