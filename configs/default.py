"""Default run: SFT of the lab's tiny pretrained base on its golden dataset of briefs.

Offline, on a laptop CPU, in a few minutes. The base (assets/lab/base, built by
scripts/build_lab.py) learned a fictional world's facts from prose and has never seen a
brief; the golden dataset teaches it to answer "a brief on X" with one JSON object in a
fixed schema. The evals show what SFT did and did not do:
- behaviour learned: schema conformance of briefs about held-out entities, before and after;
- knowledge from pretraining, not from SFT: facts about the held-out entities (they never
  appear in the SFT data), against the chance level of a model without that knowledge;
- forgetting: loss and KL against the base on held-out prose.

  python -m coach_jax.main --config configs/default.py --workdir runs/demo
"""

import json
import os

from coach_jax.config import base_config

LAB = "assets/lab"


def get_config(lab: str = LAB):
    with open(os.path.join(lab, "lab.json")) as f:
        info = json.load(f)
    c = base_config()
    c.model.hf_path = os.path.join(lab, "base")
    c.tokenizer.path = os.path.join(lab, "tokenizer")
    c.data.train = os.path.join(lab, "train.jsonl")
    c.data.eval = os.path.join(lab, "eval.jsonl")  # the held-out entities
    c.data.max_seq_len = 256
    c.data.epochs = 12
    c.train.global_batch_size = 8
    c.train.log_every = 10
    c.train.eval_every = 70
    c.optimizer.learning_rate = 5e-4
    c.optimizer.weight_decay = 0.0
    c.schedule.warmup_steps = 5
    c.eval.generate_examples = info["eval_entities"]
    c.eval.max_new_tokens = 64
    c.eval.json_schema = os.path.join(lab, "brief_schema.json")
    c.eval.fact_fields = tuple(info["fact_fields"])
    c.eval.fact_chance = info["fact_chance"]
    c.eval.reference = os.path.join(lab, "corpus", "reference.jsonl")
    c.checkpoint.every_steps = 100
    c.checkpoint.keep = 2
    return c
