"""The "bad coach" lesson: the default lab run with a golden dataset that is not golden.

60% of the answers in assets/lab/train_bad_coach.jsonl are wrong or sloppy (half of them
another entity's facts, the rest a missing field or prose); everything else is as in
configs/default.py. Compare its report with the default's: SFT faithfully learns whatever
the coach shows, mistakes included.

  python -m coach_jax.main --config configs/lab_bad_coach.py --workdir runs/lab_bad_coach
"""

import os

from configs import default


def get_config(lab: str = default.LAB):
    c = default.get_config(lab)
    c.data.train = os.path.join(lab, "train_bad_coach.jsonl")
    return c
