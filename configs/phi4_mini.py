"""SFT of Phi-4-mini (3.8B) from a local Hugging Face folder (coach_jax never downloads).

Fetch the model once where you have network access, e.g.
  huggingface-cli download microsoft/Phi-4-mini-instruct --local-dir models/Phi-4-mini-instruct
then point data.train at your data:
  python -m coach_jax.main --config configs/phi4_mini.py:models/Phi-4-mini-instruct \
      --workdir runs/phi4_mini --config.data.train=data/train.jsonl
The same recipe fits Phi-3.5-mini and the Phi-3 models (config.json says which). Their
LongRoPE switches to its long factors for examples longer than 4096 tokens
(original_max_position_embeddings), decided per example (docs/models.md, phi3): raise
data.max_seq_len past 4096 only with data that long. Microsoft's fine-tuning samples for
Phi use learning rates around 5e-6 in bf16; the 200k vocabulary makes the chunked
cross-entropy matter (docs/benchmarks.md).
"""

from coach_jax.config import finetune_config


def get_config(hf_path: str = "models/Phi-4-mini-instruct"):
    return finetune_config(hf_path, learning_rate=5e-6, max_seq_len=4096)
