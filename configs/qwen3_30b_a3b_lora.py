"""LoRA on Qwen3-30B-A3B (a mixture of 128 experts, 8 per token) on one 80 GB GPU, from a
local Hugging Face folder (coach_jax never downloads).

Fetch the model once where you have network access, e.g.
  huggingface-cli download Qwen/Qwen3-30B-A3B --local-dir models/Qwen3-30B-A3B
then:
  python -m coach_jax.main --config configs/qwen3_30b_a3b_lora.py:models/Qwen3-30B-A3B \
      --workdir runs/qwen3_30b_a3b_lora --config.data.train=data/train.jsonl
The bf16 base (30.5B parameters, 57 GiB) stays frozen; rank-16 adapters train on the
attention projections and on every expert (0.84B adapter parameters, docs/adapters.md),
every layer recomputed in the backward pass, 2048-token rows, 8 micro-batches per batch
of 16. `--mode=memory` with Qwen3-30B-A3B's config.json: 68.0 GiB per device (params
58.4 GiB, gradients and optimizer 4.7 GiB, activations 4.9 GiB), 85% of an 80 GB GPU;
--config.adapter.targets=q_proj,k_proj,v_proj,o_proj leaves the experts frozen and needs
about 61 GiB. On several GPUs add --config.mesh.expert=N to
split the experts (docs/models.md, "Expert parallelism").
"""

from coach_jax.config import lora_config


def get_config(hf_path: str = "models/Qwen3-30B-A3B"):
    return lora_config(hf_path, max_seq_len=2048, global_batch_size=16,
                       micro_batches=8, big_model=True)
