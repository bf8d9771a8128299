"""LoRA on gpt-oss-20b (a mixture of 32 experts, 4 per token; its MXFP4 experts are read
as bf16) on one 80 GB GPU, from a local Hugging Face folder (coach_jax never downloads).

Fetch the model once where you have network access, e.g.
  huggingface-cli download openai/gpt-oss-20b --local-dir models/gpt-oss-20b
then:
  python -m coach_jax.main --config configs/gpt_oss_20b_lora.py:models/gpt-oss-20b \
      --workdir runs/gpt_oss_20b_lora --config.data.train=data/train.jsonl
Rank-16 adapters on the attention projections and the experts (docs/adapters.md), the
bf16 base frozen, every layer recomputed in the backward pass, 2048-token rows, 8
micro-batches per batch of 16. Its chat template writes the harmony format (channels;
`<|return|>` closes the last assistant turn), masked as docs/data.md says.
`--mode=memory` with gpt-oss-20b's config.json: 46.8 GiB per device (params 39.4 GiB,
activations 6.2 GiB; attention on XLA's path, as the sinks need), 58% of an 80 GB GPU.
"""

from coach_jax.config import lora_config


def get_config(hf_path: str = "models/gpt-oss-20b"):
    return lora_config(hf_path, max_seq_len=2048, global_batch_size=16,
                       micro_batches=8, big_model=True)
