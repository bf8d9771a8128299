"""SFT of SmolLM3-3B from a local Hugging Face folder (coach_jax never downloads).

Fetch the model once where you have network access, e.g.
  huggingface-cli download HuggingFaceTB/SmolLM3-3B --local-dir models/SmolLM3-3B
then point data.train at your data:
  python -m coach_jax.main --config configs/smollm3_3b.py:models/SmolLM3-3B \
      --workdir runs/smollm3_3b --config.data.train=data/train.jsonl
The part after ':' is the model folder; the tokenizer and its chat template come from the
same folder. SmolLM3 leaves every fourth layer without RoPE (config.json no_rope_layers),
which coach_jax reads from the checkpoint.
"""

from coach_jax.config import finetune_config


def get_config(hf_path: str = "models/SmolLM3-3B"):
    return finetune_config(hf_path, learning_rate=1e-5, max_seq_len=4096, global_batch_size=32)
