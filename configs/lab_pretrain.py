"""Pretraining of the lab's tiny base on its prose corpus (text mode: every token carries
loss). scripts/build_lab.py runs it and keeps the export as assets/lab/base; it is here so
the base is trained by the same code path as any other run.

  python -m coach_jax.main --config configs/lab_pretrain.py --workdir runs/lab_pretrain
"""

import os

from coach_jax.config import base_config


def get_config(lab: str = "assets/lab"):
    c = base_config()
    c.model.init.update(vocab_size=1024, hidden_size=192, intermediate_size=512,
                        num_hidden_layers=4, num_attention_heads=6, num_key_value_heads=2,
                        head_dim=32, tie_word_embeddings=True, max_position_embeddings=1024)
    c.tokenizer.path = os.path.join(lab, "tokenizer")
    c.data.train = os.path.join(lab, "corpus", "pretrain.jsonl")
    c.data.eval = os.path.join(lab, "corpus", "reference.jsonl")
    c.data.format = "text"
    c.data.max_seq_len = 256
    c.data.epochs = 1
    c.train.steps = 600
    c.train.global_batch_size = 16
    c.train.log_every = 100
    c.train.eval_every = 300
    c.optimizer.learning_rate = 3e-3
    c.optimizer.weight_decay = 0.01
    c.schedule.warmup_steps = 100
    c.schedule.end_ratio = 0.05
    c.checkpoint.every_steps = 300
    c.checkpoint.keep = 1
    c.eval.at_start = False
    return c
