"""QLoRA on Mixtral-8x7B-Instruct (8 experts, 2 per token) on one 40 GB GPU, from a local
Hugging Face folder (coach_jax never downloads).

Fetch the model once where you have network access (accept its licence first), e.g.
  huggingface-cli download mistralai/Mixtral-8x7B-Instruct-v0.1 \
      --local-dir models/Mixtral-8x7B-Instruct-v0.1
then:
  pip install 'coach_jax[qlora]'
  python -m coach_jax.main --config configs/mixtral_8x7b_qlora.py:models/Mixtral-8x7B-Instruct-v0.1 \
      --workdir runs/mixtral_8x7b_qlora --config.data.train=data/train.jsonl
The base's attention projections and all experts are held as NF4 (blocks of 64; the
router stays as loaded) and rank-16 adapters train on the attention projections and the
experts, every layer recomputed in the backward pass, one 2048-token row per micro-batch,
16 per batch (docs/adapters.md, docs/models.md). `--mode=memory` with Mixtral-8x7B's
config.json: 52.1 GiB per device on CPU, where jax stores a 4-bit code in a whole byte;
packed two per byte on a GPU the base takes 21.6 GiB less, about 31 GiB in all.
"""

from coach_jax.config import lora_config


def get_config(hf_path: str = "models/Mixtral-8x7B-Instruct-v0.1"):
    return lora_config(hf_path, quantize_base="nf4", max_seq_len=2048,
                       global_batch_size=16, micro_batches=16, big_model=True)
