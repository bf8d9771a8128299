"""Telling a diverged run from a healthy one, from its per-step loss and gradient norm.

A run can diverge without a single NaN: with a learning rate far too high the model is
pushed to predict the uniform distribution (loss exactly ln V, gradients zero) or its loss
climbs and stays high. Such a run must not be saved and exported as a success. After
warmup, `DivergenceGuard.observe` flags a step as suspect when any of these hold:

- *uniform*: the loss is at or above the uniform-prediction loss ln V (less
  `UNIFORM_TOLERANCE` nats), although the smoothed loss was once clearly below it (by
  `LEARNED_MARGIN`): the model forgot everything it predicted. A model trained from scratch
  that has not yet gone below ln V is not suspect.
- *dead*: the gradient norm is zero while the loss is above `DEAD_LOSS`.
- *blow-up*: the smoothed loss (the median of the last `WINDOW` steps, so one bad batch
  moves it not at all) exceeds both `BLOWUP_FACTOR` times and `BLOWUP_FLOOR` nats above
  the best smoothed loss so far.

`PATIENCE` suspect steps in a row are a divergence (a single spike is not). The guard also
remembers the last healthy step, so the caller saves nothing newer than it.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import statistics

DIVERGENCE_MODES = ("stop", "warn", "off")
UNIFORM_TOLERANCE = 0.05  # nats below ln V still counted as "at the uniform loss"
LEARNED_MARGIN = 0.5  # nats below ln V the smoothed loss must once have reached
WINDOW = 9  # steps in the running median
BLOWUP_FACTOR = 3.0
BLOWUP_FLOOR = 1.0  # nats
DEAD_LOSS = 0.01  # a zero gradient is fine only when the loss is this small
PATIENCE = 3


@dataclasses.dataclass(frozen=True)
class Divergence:
    """Why and where a run diverged."""

    step: int
    loss: float
    learning_rate: float | None
    reason: str
    last_healthy: int  # the last step before the diverged stretch

    def message(self) -> str:
        lr = f", learning rate {self.learning_rate:.3g}" if self.learning_rate is not None else ""
        return (f"training diverged at step {self.step} (loss {self.loss:.4f}{lr}): "
                f"{self.reason}")


class DivergedError(RuntimeError):
    """The run diverged and train.on_divergence=stop: nothing of it is saved or exported."""

    def __init__(self, divergence: Divergence):
        self.divergence = divergence
        super().__init__(f"{divergence.message()}; no checkpoint after step "
                         f"{divergence.last_healthy} and no export were kept. Lower "
                         "optimizer.learning_rate, or set train.on_divergence=warn to go on")


class DivergenceGuard:
    """Watches one run's steps in order; see the module docstring for the rules."""

    def __init__(self, vocab_size: int, warmup_steps: int, start_step: int = 0):
        self.uniform_loss = math.log(vocab_size)
        self.warmup_steps = warmup_steps
        self.recent: collections.deque[float] = collections.deque(maxlen=WINDOW)
        self.smoothed: float | None = None
        self.best: float | None = None
        self.streak: list[str] = []
        self.last_healthy = start_step

    @property
    def suspect(self) -> bool:
        """True while the newest steps look diverged (do not save them)."""
        return bool(self.streak)

    def observe(self, step: int, loss: float, grad_norm: float | None,
                learning_rate: float | None = None) -> Divergence | None:
        """Takes one step's numbers; returns a Divergence once PATIENCE steps in a row
        are suspect."""
        self.recent.append(loss)
        self.smoothed = statistics.median(self.recent)
        reason = self._reason(loss, grad_norm) if step > self.warmup_steps else None
        if self.best is None or self.smoothed < self.best:
            self.best = self.smoothed
        if reason is None:
            self.streak = []
            self.last_healthy = step
            return None
        self.streak.append(reason)
        if len(self.streak) < PATIENCE:
            return None
        return Divergence(step, loss, learning_rate,
                          f"{self.streak[-1]} for {len(self.streak)} steps in a row",
                          self.last_healthy)

    def _reason(self, loss: float, grad_norm: float | None) -> str | None:
        learned = self.best is not None and self.best < self.uniform_loss - LEARNED_MARGIN
        if learned and loss >= self.uniform_loss - UNIFORM_TOLERANCE:
            return (f"the loss is at or above the uniform-prediction loss ln(vocab) = "
                    f"{self.uniform_loss:.4f}: the model predicts no better than chance")
        if grad_norm is not None and grad_norm == 0 and loss > DEAD_LOSS:
            return "the gradient norm is 0 although the loss is not small"
        if self.best is not None and self.smoothed > max(BLOWUP_FACTOR * self.best,
                                                         self.best + BLOWUP_FLOOR):
            return (f"the smoothed loss {self.smoothed:.4f} is over {BLOWUP_FACTOR:g}x and "
                    f"{BLOWUP_FLOOR:g} nat above its best {self.best:.4f}")
        return None
