"""LoRA on Qwen3.5-35B-A3B (Gated DeltaNet and gated attention layers, 3:1; a mixture of
256 experts, 8 per token, and a shared expert) from a local Hugging Face folder (coach_jax
never downloads).

Fetch the model once where you have network access, e.g.
  huggingface-cli download Qwen/Qwen3.5-35B-A3B --local-dir models/Qwen3.5-35B-A3B
then:
  python -m coach_jax.main --config configs/qwen3_5_moe_lora.py:models/Qwen3.5-35B-A3B \
      --workdir runs/qwen3_5_moe_lora --config.data.train=data/train.jsonl
The base is held in NF4 (QLoRA: 34.7B parameters do not fit one 80 GB GPU in bf16, 83.5
GiB by `--mode=memory`) and stays frozen; rank-16 adapters train on the attention and
DeltaNet projections and on every expert, every layer recomputed in the backward pass,
2048-token rows, 8 micro-batches per batch of 16. The text decoder of the multimodal
checkpoint is loaded and trained, the vision tower left out. `--mode=memory` with a
config.json of the published text shape (40 layers, hidden 2048, 256 experts of 512,
shared expert 512): 53.2 GiB per device on CPU (params 36.6 GiB as CPU holds NF4,
activations 9.5 GiB), 66% of an 80 GB GPU. On several GPUs,
--config.adapter.quantize_base=none with --config.mesh.fsdp=N (or mesh.expert) trains on
the bf16 base.
"""

from coach_jax.config import lora_config


def get_config(hf_path: str = "models/Qwen3.5-35B-A3B"):
    return lora_config(hf_path, quantize_base="nf4", max_seq_len=2048,
                       global_batch_size=16, micro_batches=8, big_model=True)
