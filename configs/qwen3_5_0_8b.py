"""Full SFT of Qwen3.5-0.8B (three Gated DeltaNet layers to one gated attention layer)
from a local Hugging Face folder (coach_jax never downloads).

Fetch the model once where you have network access, e.g.
  huggingface-cli download Qwen/Qwen3.5-0.8B --local-dir models/Qwen3.5-0.8B
then:
  python -m coach_jax.main --config configs/qwen3_5_0_8b.py:models/Qwen3.5-0.8B \
      --workdir runs/qwen3_5_0_8b --config.data.train=data/train.jsonl
The published checkpoint is multimodal: its text decoder is loaded from under the
language-model prefix and trained; the vision tower is left out (one log line says so) and
the export is a text-only Qwen3_5ForCausalLM. The 24 layers compile as one scanned group of
four. `--mode=memory` with a config.json of the published
text shape (24 layers, hidden 1024, 8 heads of 256, DeltaNet 16 key and 16 value heads of
128, vocabulary 248320, tied embeddings): 18.9 GiB per device with 2 rows of 4096 tokens
per micro-batch (params 2.8 GiB fp32, optimizer 5.6 GiB, activations 7.7 GiB), 79% of a
24 GB GPU.
"""

from coach_jax.config import finetune_config


def get_config(hf_path: str = "models/Qwen3.5-0.8B"):
    c = finetune_config(hf_path, learning_rate=1e-5, max_seq_len=4096,
                        global_batch_size=32, micro_batches=16)
    c.model.remat = "full"  # fp32 weights (small), every layer recomputed
    return c
