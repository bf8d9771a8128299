"""Default run: SFT of a tiny Llama-family model on the lab's golden briefs dataset.

Offline, on a laptop CPU, in a few minutes. The model is initialised from scratch for now
(a pretrained lab base replaces it in a later step); it learns the brief format: a JSON
object whose fields it copies from the notes in the prompt.

  python -m coach_jax.main --config configs/default.py --workdir runs/demo
"""

from coach_jax.config import base_config


def get_config():
    c = base_config()
    c.model.init.update(vocab_size=1024, hidden_size=128, intermediate_size=352,
                        num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                        head_dim=32, tie_word_embeddings=True)
    c.tokenizer.path = "assets/lab/tokenizer"
    c.data.train = "assets/lab/train.jsonl"
    c.data.eval = "assets/lab/eval.jsonl"
    c.data.max_seq_len = 256
    c.data.epochs = 6
    c.train.global_batch_size = 16
    c.train.log_every = 10
    c.train.eval_every = 50
    c.optimizer.learning_rate = 3e-3
    c.optimizer.weight_decay = 0.01
    c.schedule.warmup_steps = 20
    c.eval.generate_examples = 16  # behaviour: briefs written for held-out prompts
    c.eval.max_new_tokens = 64
    c.eval.json_schema = "assets/lab/brief_schema.json"
    c.checkpoint.every_steps = 100
    c.checkpoint.keep = 2
    return c
