"""LoRA on OLMo 3 7B (three sliding-window layers to one full, YaRN on the full ones) on
one 24 GB GPU, from a local Hugging Face folder (coach_jax never downloads).

Fetch the model once where you have network access, e.g.
  huggingface-cli download allenai/Olmo-3-7B-Instruct --local-dir models/Olmo-3-7B-Instruct
then:
  python -m coach_jax.main --config configs/olmo3_7b_lora.py:models/Olmo-3-7B-Instruct \
      --workdir runs/olmo3_7b_lora --config.data.train=data/train.jsonl
The bf16 base stays frozen; rank-16 adapters train on every projection, every layer
recomputed in the backward pass, one 4096-token row per micro-batch, 16 per batch.
`--mode=memory` with OLMo-3-7B's config.json: 19.3 GiB per device (params 13.7 GiB,
activations 5.4 GiB), 80% of a 24 GB GPU.
"""

from coach_jax.config import lora_config


def get_config(hf_path: str = "models/Olmo-3-7B-Instruct"):
    return lora_config(hf_path, max_seq_len=4096, global_batch_size=16,
                       micro_batches=16, big_model=True)
