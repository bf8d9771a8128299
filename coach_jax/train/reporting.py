"""Where a run's numbers go: a progress line, DIR/metrics.jsonl, TensorBoard, a PNG.

TensorBoard (tensorboardX) and the plot (matplotlib) are optional extras
(`pip install coach_jax[monitor]`); without them the run says so once and goes on.
"""

from __future__ import annotations

import datetime
import json
import math
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


def progress_line(step: int, total: int, record: dict[str, Any],
                  seconds_left: float | None) -> str:
    """One line per logged step; no ETA until a step after the first (compiling) one is timed."""
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
    if "router_aux_loss" in record:  # MoE: the busiest and idlest expert of any layer
        parts.append(f"router aux {record['router_aux_loss']:.3f}, expert share "
                     f"{100 * max(record['expert_share_max']):.0f}% max / "
                     f"{100 * min(record['expert_share_min']):.0f}% min")
    if "tokens_per_s" in record:
        parts.append(f"{record['tokens_per_s'] / 1e3:.1f}k tok/s")
    if "learning_rate" in record:
        parts.append(f"lr {record['learning_rate']:.2e}")
    if seconds_left is not None:
        parts.append(f"ETA {datetime.timedelta(seconds=int(max(seconds_left, 0)))}")
    return " | ".join(parts)


def _behaviour_shares(record: dict[str, Any]) -> list[str]:
    """'<source>: metric 100%, ...' per source, from the behaviour/<source>/<metric> keys."""
    by_source: dict[str, list[str]] = {}
    for key, value in record.items():
        if key.startswith("behaviour/") and isinstance(value, (int, float)):
            source, _, metric = key.removeprefix("behaviour/").rpartition("/")
            by_source.setdefault(source, []).append(f"{metric} {100 * value:.0f}%")
    return [f"{source}: " + ", ".join(shares) for source, shares in by_source.items()]


def summary_line(record: dict[str, Any]) -> str:
    """The last line a run prints, for a person: how it ended and what it reached, and
    where to look next (`report` and `export`, which train_and_evaluate adds to its
    record; the full record stays in metrics.jsonl)."""
    if "preempted_at" in record:
        parts = [f"preempted at step {record['preempted_at']} (run the same command again "
                 "to continue)"]
    elif record.get("stopped"):
        parts = [f"stopped early after {record.get('step', 0)} steps: {record['stopped']}"]
    else:
        parts = [f"done: {record.get('step', 0)} steps"]
    if "loss" in record:
        parts.append(f"train loss {record['loss']:.4f}")
    if "eval_loss" in record:
        parts.append(f"eval loss {record['eval_loss']:.4f}")
    parts += _behaviour_shares(record)
    if "forgetting/reference_loss_delta" in record:
        kl = record.get("forgetting/kl")
        parts.append(f"forgetting {record['forgetting/reference_loss_delta']:+.4f} nats"
                     + (f" (KL {kl:.4f})" if kl is not None else ""))
    for key in ("report", "export"):
        if record.get(key):
            parts.append(f"{key} {record[key]}")
    return " | ".join(parts)


def _spans_a_decade(values: list[float]) -> bool:
    """A loss that falls more than tenfold gets a log axis: on a linear one the first drop
    flattens everything after it."""
    values = [v for v in values if math.isfinite(v)]
    return bool(values) and min(values) > 0 and max(values) / min(values) > 10


def _log_axis(axis: Any) -> None:
    """A log y axis labelled in plain numbers at 1, 2, 5 x 10^k (not only at powers of ten,
    which a loss spanning one or two decades barely shows)."""
    from matplotlib import ticker
    axis.set_yscale("log")
    axis.yaxis.set_major_locator(ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
    axis.yaxis.set_major_formatter(ticker.FuncFormatter(lambda value, _: f"{value:g}"))
    axis.yaxis.set_minor_formatter(ticker.NullFormatter())


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
    log = _spans_a_decade([v for _, v in train + held_out])
    if log:
        _log_axis(axis)
    axis.set_xlabel("step")
    axis.set_ylabel("loss (supervised tokens)" + (", log scale" if log else ""))
    axis.legend()
    axis.grid(alpha=0.3, which="both" if log else "major")
    figure.tight_layout()
    figure.savefig(out_path, dpi=100)
    plt.close(figure)
    return True
