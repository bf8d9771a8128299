"""SFT of OLMo 2 1B from a local Hugging Face folder (coach_jax never downloads).

Fetch the model once where you have network access, e.g.
  huggingface-cli download allenai/OLMo-2-0425-1B --local-dir models/OLMo-2-1B
then point data.train at your data:
  python -m coach_jax.main --config configs/olmo2_1b.py:models/OLMo-2-1B \
      --workdir runs/olmo2_1b --config.data.train=data/train.jsonl
The part after ':' is the model folder; the tokenizer and its chat template come from the
same folder (a base checkpoint has no chat template: set tokenizer.chat_template to a
.jinja file).
"""

from coach_jax.config import finetune_config


def get_config(hf_path: str = "models/OLMo-2-1B"):
    return finetune_config(hf_path, learning_rate=1e-5, max_seq_len=4096)
