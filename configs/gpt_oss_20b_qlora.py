"""QLoRA on gpt-oss-20b (a mixture of 32 experts, 4 per token) on one 24 GB GPU, from a
local Hugging Face folder (coach_jax never downloads).

Fetch the model once where you have network access, e.g.
  huggingface-cli download openai/gpt-oss-20b --local-dir models/gpt-oss-20b
then:
  pip install 'coach_jax[qlora]'
  python -m coach_jax.main --config configs/gpt_oss_20b_qlora.py:models/gpt-oss-20b \
      --workdir runs/gpt_oss_20b_qlora --config.data.train=data/train.jsonl
The base's experts and attention projections are held as MXFP4 (FP4 codes, a power of
two per 32 weights): the experts exactly as the checkpoint publishes them, no second
rounding; the router, embeddings and head stay bf16.
Rank-16 adapters on the attention projections and the experts, every layer recomputed
in the backward pass, one 2048-token row per micro-batch, 16 per batch
(docs/adapters.md). `--mode=memory` with gpt-oss-20b's config.json: 27.5 GiB per device
on CPU, where jax stores a 4-bit code in a whole byte; packed two per byte on a GPU the
base takes 9.2 GiB less, about 18 GiB in all.
"""

from coach_jax.config import lora_config


def get_config(hf_path: str = "models/gpt-oss-20b"):
    return lora_config(hf_path, quantize_base="mxfp4", max_seq_len=2048,
                       global_batch_size=16, micro_batches=16, big_model=True)
