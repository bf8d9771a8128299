"""The "coach too hard" lesson: the default lab run with a much higher learning rate and
many more epochs. The format is learned as well or better, but the base model's general
predictions drift far more: compare the forgetting section of its report with the default's.

  python -m coach_jax.main --config configs/lab_coach_too_hard.py --workdir runs/lab_too_hard
"""

from configs import default


def get_config(lab: str = default.LAB):
    c = default.get_config(lab)
    c.optimizer.learning_rate *= 10
    c.data.epochs *= 4
    c.train.eval_every *= 4
    return c
