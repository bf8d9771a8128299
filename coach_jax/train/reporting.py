"""Where a run's numbers go: a progress line, DIR/metrics.jsonl, TensorBoard, a PNG.

TensorBoard (tensorboardX) and the plot (matplotlib) are optional extras
(`pip install coach_jax[monitor]`); without them the run says so once and goes on.
"""

from __future__ import annotations

import datetime
import json
import os
from typing import Any

import numpy as np
from absl import logging


def _scalar(value: Any) -> Any:
    array = np.asarray(value)
    if array.ndim == 0:
        return array.item()
    return array.tolist()


class MetricsWriter:
    """Appends one JSON object per logged step; mirrors scalars to TensorBoard."""

    def __init__(self, workdir: str, source_names: tuple[str, ...] = (), enabled: bool = True,
                 resume_step: int = 0):
        self.enabled = enabled
        self.closed = False
        self.source_names = source_names
        self.path = os.path.join(workdir, "metrics.jsonl")
        if enabled:
            self._drop_after(resume_step)
        self._tensorboard = None
        if enabled:
            try:
                from tensorboardX import SummaryWriter
                self._tensorboard = SummaryWriter(os.path.join(workdir, "tb"))
            except ImportError:
                logging.warning("tensorboardX is not installed: no TensorBoard events "
                                "(pip install 'coach_jax[monitor]')")

    def _drop_after(self, step: int) -> None:
        """Keeps only records up to `step`: a resumed run rewrites what came after."""
        if not os.path.exists(self.path):
            return
        with open(self.path) as f:
            kept = [line for line in f if line.strip() and json.loads(line)["step"] <= step]
        with open(self.path, "w") as f:
            f.writelines(kept)

    def write(self, step: int, metrics: dict[str, Any]) -> dict[str, Any]:
        record = {"step": step}
        for name, value in metrics.items():
            value = _scalar(value)
            if isinstance(value, list) and name.startswith("source_"):
                for source, v in zip(self.source_names, value):
                    record[f"{name}/{source}"] = v
            else:
                record[name] = value
        if not self.enabled:
            return record
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self._tensorboard is not None:
            for name, value in record.items():
                if name != "step" and isinstance(value, (int, float)):
                    self._tensorboard.add_scalar(name, value, step)
            self._tensorboard.flush()
        return record

    def close(self) -> None:
        """Flushes and closes TensorBoard; safe to call twice."""
        if self._tensorboard is not None:
            self._tensorboard.close()
            self._tensorboard = None
        self.closed = True


def progress_line(step: int, total: int, record: dict[str, Any], seconds_left: float) -> str:
    eta = datetime.timedelta(seconds=int(max(seconds_left, 0)))
    parts = [f"step {step}/{total}"]
    if "loss" in record:
        parts.append(f"loss {record['loss']:.4f}")
    if "eval_loss" in record:
        parts.append(f"eval_loss {record['eval_loss']:.4f}")
    for key, value in record.items():
        if key.startswith("behaviour/") and key.endswith(("/schema_valid", "/exact_match")):
            parts.append(f"{key.removeprefix('behaviour/')} {100 * value:.0f}%")
    if "forgetting/reference_loss_delta" in record:
        parts.append(f"forgetting {record['forgetting/reference_loss_delta']:+.4f} nats "
                     f"(KL {record['forgetting/kl']:.4f})")
    if "tokens_per_s" in record:
        parts.append(f"{record['tokens_per_s'] / 1e3:.1f}k tok/s")
    if "learning_rate" in record:
        parts.append(f"lr {record['learning_rate']:.2e}")
    parts.append(f"ETA {eta}")
    return " | ".join(parts)


def plot_losses(metrics_path: str, out_path: str) -> bool:
    """Train and eval loss against step as a PNG; False when matplotlib is missing."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logging.warning("matplotlib is not installed: no loss plot "
                        "(pip install 'coach_jax[monitor]')")
        return False
    train, held_out = [], []
    with open(metrics_path) as f:
        for line in f:
            record = json.loads(line)
            if "loss" in record:
                train.append((record["step"], record["loss"]))
            if "eval_loss" in record:
                held_out.append((record["step"], record["eval_loss"]))
    figure, axis = plt.subplots(figsize=(7, 4))
    for points, label in ((train, "train loss"), (held_out, "eval loss")):
        if points:
            axis.plot(*zip(*points), marker="o" if len(points) < 30 else None, label=label)
    axis.set_xlabel("step")
    axis.set_ylabel("loss (supervised tokens)")
    axis.legend()
    axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(out_path, dpi=100)
    plt.close(figure)
    return True
