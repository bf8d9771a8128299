"""What a training run holds open, and the guarantee that it is let go on every exit: the
metric outputs (metrics.jsonl, TensorBoard, Weights & Biases), the checkpoint manager and
the SIGTERM / Ctrl-C handlers."""

from __future__ import annotations

import contextlib
import dataclasses
import signal
import sys
from typing import Any, Iterator

import jax
from jax.experimental import multihost_utils

from coach_jax.errors import RunAborted
from coach_jax.train.reporting import MetricsWriter
from coach_jax.train.wandb_run import WandbRun



class PreemptionWatch:
    """SIGTERM or Ctrl-C asks the loop to finish its step, save and exit 0. With several
    hosts, JAX's preemption sync point makes them all stop at the same step. A context
    manager: the previous handlers come back on exit."""

    def __init__(self, announce: bool = True):
        self.flag = False
        self.announce = announce  # print what happens (process 0 only)
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "PreemptionWatch":
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc_info: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def _handle(self, signum, frame):
        if self.flag and signum == signal.SIGINT:  # a second Ctrl-C: stop now, save nothing
            raise RunAborted()
        self.flag = True
        if self.announce:
            name = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
            print(f"\n{name}: stopping after this step and saving; press Ctrl-C again to "
                  "abort without saving", file=sys.stderr, flush=True)

    def requested(self, step: int) -> bool:
        if jax.process_count() > 1:
            return multihost_utils.reached_preemption_sync_point(step) or self.flag
        return self.flag


@dataclasses.dataclass
class RunOutputs:
    """Where a run's numbers go: metrics.jsonl and TensorBoard, and Weights & Biases when
    logging.wandb_project is set (process 0 only)."""

    writer: MetricsWriter
    wandb: WandbRun | None

    def write(self, step: int, metrics: dict[str, Any]) -> dict[str, Any]:
        record = self.writer.write(step, metrics)
        if self.wandb is not None:
            self.wandb.log(step, record)
        return record


@contextlib.contextmanager
def run_resources(trainer: Any, resume_step: int
                  ) -> Iterator[tuple[RunOutputs, PreemptionWatch]]:
    """The metric outputs and the preemption watch of one run. On every exit (the last
    step, a preemption, a non-finite loss, any exception) the signal handlers are
    restored, then the outputs and the checkpoint manager (its pending saves first) closed."""
    with contextlib.ExitStack() as stack:
        stack.callback(trainer.checkpoints.close)
        # Records of steps after the checkpoint were lost with the run that wrote them.
        writer = MetricsWriter(trainer.workdir, trainer.source_names, enabled=trainer.is_main,
                               resume_step=resume_step)
        stack.callback(writer.close)
        wandb = None  # config.resolve checked that wandb is installed when asked for
        if trainer.is_main:
            wandb = WandbRun.start(trainer.settings.logging, trainer.workdir,
                                   trainer.config_values, resume_step)
        if wandb is not None:
            stack.enter_context(wandb)
        yield (RunOutputs(writer, wandb),
               stack.enter_context(PreemptionWatch(announce=trainer.is_main)))
