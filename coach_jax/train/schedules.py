"""Learning-rate schedules by name: constant, linear, warmup_cosine, warmup_linear, wsd."""

from __future__ import annotations

import dataclasses

import optax

SCHEDULES = ("constant", "linear", "warmup_cosine", "warmup_linear", "wsd")


@dataclasses.dataclass(frozen=True)
class ScheduleConfig:
    """`warmup_steps`, or `warmup_ratio` of the total steps (not both). `end_ratio` is the
    final learning rate as a fraction of the peak; `decay_ratio` is WSD's decay share."""

    name: str = "warmup_cosine"
    warmup_steps: int = 0
    warmup_ratio: float | None = None
    end_ratio: float = 0.0
    decay_ratio: float = 0.1

    def __post_init__(self):
        if self.name not in SCHEDULES:
            raise ValueError(f"unknown schedule {self.name!r}; expected one of "
                             f"{', '.join(SCHEDULES)}")
        if self.warmup_ratio is not None and self.warmup_steps:
            raise ValueError("set warmup_steps or warmup_ratio, not both")
        if self.warmup_ratio is not None and not 0 <= self.warmup_ratio < 1:
            raise ValueError(f"warmup_ratio={self.warmup_ratio} must be in [0, 1)")
        if not 0 < self.decay_ratio <= 1:
            raise ValueError(f"decay_ratio={self.decay_ratio} must be in (0, 1]")

    def warmup(self, total_steps: int) -> int:
        if self.warmup_ratio is not None:
            return int(round(self.warmup_ratio * total_steps))
        return self.warmup_steps


def make_schedule(config: ScheduleConfig, peak: float, total_steps: int) -> optax.Schedule:
    """The learning rate at each step 0 .. total_steps - 1."""
    warmup = config.warmup(total_steps)  # may outlast the run: the loop warns
    end = peak * config.end_ratio
    ramp = optax.linear_schedule(0.0, peak, warmup)
    after = max(total_steps - warmup, 1)
    if config.name == "constant":
        body = optax.constant_schedule(peak)
    elif config.name in ("linear", "warmup_linear"):
        body = optax.linear_schedule(peak, end, after)
    elif config.name == "warmup_cosine":
        body = optax.cosine_decay_schedule(peak, after, alpha=config.end_ratio)
    else:  # wsd: warmup, stable at the peak, linear decay over the last decay_ratio
        decay = max(int(round(config.decay_ratio * total_steps)), 1)
        stable = max(after - decay, 0)
        body = optax.join_schedules(
            [optax.constant_schedule(peak), optax.linear_schedule(peak, end, decay)], [stable])
    if warmup == 0:
        return body
    return optax.join_schedules([ramp, body], [warmup])
