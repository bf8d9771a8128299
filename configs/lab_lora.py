"""The default lesson with LoRA: the lab's base learns the brief format through rank-16
adapters on every projection, the base frozen (docs/adapters.md).

  python -m coach_jax.main --config configs/lab_lora.py --workdir runs/lab_lora

LoRA's update is small, so its learning rate is higher than full fine-tuning's (5e-4 in
configs/default.py).
"""

from configs import default


def get_config(lab: str = default.LAB):
    c = default.get_config(lab)
    c.adapter.kind = "lora"
    c.adapter.rank = 16
    c.adapter.alpha = 32.0
    c.adapter.targets = "all-linear"
    c.optimizer.learning_rate = 3e-3
    return c
