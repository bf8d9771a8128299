"""A Weights & Biases mirror of DIR/metrics.jsonl and DIR/report.md (optional).

`logging.wandb_project` turns it on; the `wandb` package is the optional extra
`pip install 'coach_jax[wandb]'`. The run's id lives in DIR/wandb_id.txt, so a run resumed
from its checkpoint continues the same W&B run instead of starting a second one.
`WANDB_MODE=offline` (or `disabled`), `WANDB_DIR`, `WANDB_API_KEY` work as wandb documents.
"""

from __future__ import annotations

import math
import os
import secrets
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from absl import logging

if TYPE_CHECKING:
    from coach_jax.config import LoggingSettings

ID_FILE = "wandb_id.txt"
REPORT_IMAGES = ("loss.png", "behaviour.png", "forgetting.png")


class WandbMissingError(ImportError):
    """logging.wandb_project is set but the wandb package is not installed."""

    def __init__(self) -> None:
        super().__init__("logging.wandb_project is set but wandb is not installed: "
                         "pip install 'coach_jax[wandb]' (or set logging.wandb_project='')")


def _import_wandb() -> Any:
    try:
        import wandb
    except ImportError as error:
        raise WandbMissingError() from error
    return wandb


def run_id(workdir: str, resume_step: int) -> str:
    """The id of the workdir's W&B run: the saved one when resuming from a checkpoint, else
    a new one (saved for a later resume). A fresh start (step 0) is a new W&B run, since its
    steps would go back below the ones the old run logged."""
    path = os.path.join(workdir, ID_FILE)
    if resume_step > 0 and os.path.exists(path):
        with open(path) as f:
            saved = f.read().strip()
        if saved:
            return saved
    new_id = secrets.token_hex(4)  # W&B ids: lower-case letters and digits
    os.makedirs(workdir, exist_ok=True)
    with open(path, "w") as f:
        f.write(new_id + "\n")
    return new_id


def scalars(record: Mapping[str, Any]) -> dict[str, float]:
    """The numbers of one metrics.jsonl record, keys as written (behaviour/<source>/<metric>
    stays flat; W&B groups panels by the part before the first '/'); no step, no flags."""
    return {key: float(value) for key, value in record.items()
            if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value)}


class WandbRun:
    """One W&B run for one workdir; process 0 of a multi-host run starts it, others don't."""

    def __init__(self, run: Any, wandb: Any, logged_through: int):
        self._run = run
        self._wandb = wandb
        self._logged_through = logged_through  # steps W&B has from before a resume
        self._last_step = max(logged_through, 0)
        self.finished = False

    @classmethod
    def start(cls, settings: LoggingSettings, workdir: str, config: Mapping[str, Any],
              resume_step: int = 0) -> WandbRun | None:
        """None when logging.wandb_project is ""; WandbMissingError when wandb is missing."""
        if not settings.wandb_project:
            return None
        wandb = _import_wandb()
        workdir = os.path.abspath(workdir)
        run = wandb.init(
            project=settings.wandb_project, entity=settings.wandb_entity or None,
            name=settings.wandb_run_name or os.path.basename(workdir),
            tags=list(settings.wandb_tags) or None, config=dict(config),
            id=run_id(workdir, resume_step), resume="allow",
            dir=None if os.environ.get("WANDB_DIR") else workdir)
        logging.info("W&B run %s (%s)", run.id, getattr(run, "url", None) or "offline")
        # A run resumed from step N's checkpoint logs again the steps after N that the
        # interrupted run had logged: W&B (online) starts at the step after those; the
        # values are the same (resume is exact), so they are skipped, not refused one by one.
        return cls(run, wandb, max(resume_step if resume_step else -1, (run.step or 0) - 1))

    @property
    def id(self) -> str:
        return self._run.id

    def log(self, step: int, record: Mapping[str, Any]) -> None:
        """The record metrics.jsonl got for `step`; two records of one step (train, eval)
        become one W&B row."""
        if self.finished or step <= self._logged_through or step < self._last_step:
            return
        values = scalars(record)
        if values:
            self._run.log(values, step=step)
            self._last_step = step

    def log_report(self, workdir: str) -> None:
        """The report's plots as images at the last step, and report.md with them as a
        'report' artifact."""
        if self.finished:
            return
        images = {f"report/{name.removesuffix('.png')}":
                  self._wandb.Image(os.path.join(workdir, name), caption=name)
                  for name in REPORT_IMAGES if os.path.exists(os.path.join(workdir, name))}
        if images:
            self._run.log(images, step=self._last_step)
        report = os.path.join(workdir, "report.md")
        if os.path.exists(report):
            artifact = self._wandb.Artifact(f"report-{self._run.id}", type="report")
            artifact.add_file(report)
            for name in REPORT_IMAGES:
                if os.path.exists(os.path.join(workdir, name)):
                    artifact.add_file(os.path.join(workdir, name))
            self._run.log_artifact(artifact)

    def __enter__(self) -> WandbRun:
        return self

    def __exit__(self, error_type: type | None, *_: Any) -> None:
        """A run left by an exception is marked failed in W&B."""
        self.finish(exit_code=0 if error_type is None else 1)

    def finish(self, exit_code: int = 0) -> None:
        """Closes the run (failed when exit_code != 0); safe to call twice."""
        if self.finished:
            return
        self.finished = True
        self._run.finish(exit_code=exit_code)
