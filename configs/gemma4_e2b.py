"""LoRA on Gemma 4 E2B (text: per-layer embeddings, the last 20 of 35 layers reusing
earlier layers' keys and values) on one 24 GB GPU, from a local Hugging Face folder
(coach_jax never downloads).

Fetch the model once where you have network access, e.g.
  huggingface-cli download google/gemma-4-E2B-it --local-dir models/gemma-4-E2B-it
then:
  python -m coach_jax.main --config configs/gemma4_e2b.py:models/gemma-4-E2B-it \
      --workdir runs/gemma4_e2b --config.data.train=data/train.jsonl
The published checkpoint is multimodal: its text decoder is loaded from under the
language-model prefix and trained, the vision and audio towers left out. Its chat template
marks turns with `<|turn>` and `<turn|>`; the supervised run of each model turn ends with
`<turn|>` (docs/data.md). The bf16 base stays frozen; rank-16 adapters train on the
attention and MLP projections (the per-layer-embedding projections take none), every
layer recomputed in the backward pass, 2048-token rows, 8 micro-batches per batch of 16.
`--mode=memory` with a config.json of the published text shape (35 layers, hidden 1536,
8 heads of 256, full layers' heads of 512, 20 KV-sharing layers with double-wide MLPs,
per-layer embeddings of 256, vocabulary 262144): 11.2 GiB per device (params 8.7 GiB,
activations 2.3 GiB), 46% of a 24 GB GPU.
"""

from coach_jax.config import lora_config


def get_config(hf_path: str = "models/gemma-4-E2B-it"):
    return lora_config(hf_path, max_seq_len=2048, global_batch_size=16, micro_batches=8,
                       big_model=True)
