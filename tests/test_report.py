"""What a person reads after a run: report.md and its plots, the final summary line, and
the Weights & Biases mirror (offline, read back from its own .wandb file)."""

from __future__ import annotations

import glob
import json
import os
import struct
import sys

import matplotlib.pyplot as plt
import pytest

from coach_jax.config import LoggingSettings
from coach_jax.evals.report import write_report
from coach_jax.train import wandb_run
from coach_jax.train.reporting import plot_losses, summary_line

SHARES = ("exact_match", "json_parses", "schema_valid")


def _eval(step: int, parses: float, loss: float, sources: tuple[str, ...] = ("eval",)
          ) -> dict:
    record = {"step": step, "eval_loss": loss, "forgetting/reference_loss_delta": step / 100,
              "forgetting/kl": step / 50}
    for source in sources:
        record.update({f"behaviour/{source}/exact_match": parses / 2,
                       f"behaviour/{source}/json_parses": parses,
                       f"behaviour/{source}/schema_valid": parses})
    return record


def _workdir(tmp_path, records: list[dict], generation_steps: tuple[int, ...] = ()) -> str:
    workdir = str(tmp_path / "run")
    os.makedirs(os.path.join(workdir, "generations"))
    with open(os.path.join(workdir, "metrics.jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    for step in generation_steps:
        with open(os.path.join(workdir, "generations", f"step_{step:06d}.jsonl"), "w") as f:
            f.write(json.dumps({"source": "eval", "origin": "eval.jsonl:1", "prompt": "p",
                                "reference": "r", "output": f"out{step}"}) + "\n")
    return workdir


@pytest.fixture
def figures(monkeypatch) -> list:
    """The figures the plots close, instead of closing them."""
    kept: list = []
    close = plt.close
    monkeypatch.setattr(plt, "close", kept.append)
    yield kept
    close("all")


# ---- report.md: before and after ---------------------------------------------------------


def test_report_without_an_eval_before_training_has_no_before_after(tmp_path):
    """eval.at_start=False: step 10 vs step 20 is no before/after; a destroyed model must
    not read as 'change 0'."""
    workdir = _workdir(tmp_path, [{"step": 10, "loss": 2.0}, _eval(10, 1.0, 1.5),
                                  {"step": 20, "loss": 9.0}, _eval(20, 1.0, 9.0)],
                       generation_steps=(10, 20))
    report = open(write_report(workdir)).read()
    assert "## Before and after" not in report and "| change |" not in report
    assert "No evaluation ran before training (eval.at_start=False)" in report
    assert "| metric | step 20 |\n" in report and "| eval_loss | 9 |" in report
    assert "## Behaviour after training" in report
    assert "out20" in report and "out10" not in report and "before (step" not in report


def test_report_with_an_eval_at_step_0_compares_before_and_after(tmp_path):
    workdir = _workdir(tmp_path, [_eval(0, 0.0, 8.0), {"step": 20, "loss": 2.0},
                                  _eval(20, 1.0, 3.0)], generation_steps=(0, 20))
    report = open(write_report(workdir)).read()
    assert "## Before and after" in report and "No evaluation ran before" not in report
    assert "| eval_loss | 8 | 3 | -5 |" in report
    assert "| behaviour/eval/json_parses | 0 | 1 | 1 |" in report
    assert "- before (step 0): `` out0 ``" in report and "out20" in report


# ---- the plots ---------------------------------------------------------------------------


def _losses(tmp_path, values: list[float]) -> str:
    path = str(tmp_path / "metrics.jsonl")
    with open(path, "w") as f:
        f.writelines(json.dumps({"step": 10 * i, "loss": v}) + "\n"
                     for i, v in enumerate(values))
    return path


@pytest.mark.parametrize("values, scale", [([13.0, 4.0, 1.0, 0.4, 0.3], "log"),
                                           ([13.0, 5.0, 3.5], "linear")])
def test_loss_axis_is_log_when_the_loss_spans_a_decade(tmp_path, figures, values, scale):
    assert plot_losses(_losses(tmp_path, values), str(tmp_path / "loss.png"))
    assert figures[0].axes[0].get_yscale() == scale
    assert os.path.getsize(tmp_path / "loss.png") > 0


def _lines(axis) -> list[tuple]:
    return [(line.get_label(), line.get_marker(), line.get_markersize(), line.get_linestyle(),
             tuple(line.get_ydata())) for line in axis.get_lines()]


def test_behaviour_plot_hides_no_line(tmp_path, figures):
    """json_parses == schema_valid and two sources with equal values: every metric gets its
    own panel, and equal lines within a panel differ in marker, size and style, so the one
    drawn last never covers the other."""
    records = [_eval(step, share, 1.0, sources=("eval", "chat"))
               for step, share in ((0, 0.0), (10, 1.0), (20, 1.0))]
    write_report(_workdir(tmp_path, records))
    behaviour = next(f for f in figures if len(f.axes) > 1)
    panels = {axis.get_title(): axis for axis in behaviour.axes if axis.get_visible()}
    assert set(panels) == set(SHARES)
    lines = _lines(panels["json_parses"])
    assert [line[0] for line in lines] == ["eval", "chat"]
    assert lines[0][4] == lines[1][4] == (0.0, 1.0, 1.0)
    assert len({line[1:4] for line in lines}) == 2 and lines[0][2] > lines[1][2]
    assert _lines(panels["json_parses"])[0][4] == _lines(panels["schema_valid"])[0][4]
    assert os.path.exists(tmp_path / "run" / "behaviour.png")


# ---- the summary line --------------------------------------------------------------------

FINAL = {"step": 30, "loss": 3.5204, "learning_rate": 2e-6, "eval_loss": 3.5842,
         "eval_token_accuracy": 0.36, "behaviour/eval/exact_match": 0.0,
         "behaviour/eval/schema_valid": 0.5, "behaviour/chat/schema_valid": 1.0,
         "forgetting/reference_loss_delta": 0.0197, "forgetting/kl": 0.0586}


def test_summary_line_reads_like_a_sentence():
    line = summary_line({**FINAL, "report": "/r/report.md", "export": "/r/export"})
    assert line == ("done: 30 steps | train loss 3.5204 | eval loss 3.5842 | "
                    "eval: exact_match 0%, schema_valid 50% | chat: schema_valid 100% | "
                    "forgetting +0.0197 nats (KL 0.0586) | report /r/report.md | "
                    "export /r/export")
    assert "\n" not in line and "{" not in line


def test_summary_line_says_how_the_run_ended():
    stopped = summary_line({**FINAL, "stopped": "forgetting budget exceeded at step 30"})
    assert stopped.startswith("stopped early after 30 steps: forgetting budget exceeded")
    preempted = summary_line({"step": 17, "loss": 4.0, "preempted_at": 17})
    assert preempted.startswith("preempted at step 17 (run the same command again")
    assert "report" not in preempted and "export" not in preempted


# ---- Weights & Biases --------------------------------------------------------------------


def _wandb_records(path: str):
    """The records of a .wandb file (a LevelDB-style log of wandb_internal_pb2.Record:
    32 KiB blocks, 7-byte headers <crc32, length, kind>, kinds full/first/middle/last)."""
    from wandb.proto import wandb_internal_pb2
    with open(path, "rb") as f:
        data = f.read()
    assert data[:4] == b":W&B"
    position, pending, block = 7, b"", 32768
    while position + 7 <= len(data):
        if block - position % block < 7:
            position += block - position % block
            continue
        _, length, kind = struct.unpack("<IHB", data[position:position + 7])
        position += 7
        pending += data[position:position + length]
        position += length
        if kind in (1, 4):  # full, last
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def _history(path: str) -> dict[int, dict]:
    """{step: row}; a media value (nested keys: name, field) becomes a dict of its fields."""
    rows: dict[int, dict] = {}
    for record in _wandb_records(path):
        if record.WhichOneof("record_type") != "history":
            continue
        row: dict = {}
        for item in record.history.item:
            *parents, key = list(item.nested_key) or [item.key]
            node = row
            for parent in parents:
                node = node.setdefault(parent, {})
            node[key] = json.loads(item.value_json)
        rows.setdefault(row["_step"], {}).update(row)
    return rows


def _flush() -> None:
    """Stops wandb's service: a finished run's .wandb file may still be buffered there."""
    import wandb
    wandb.teardown()


@pytest.fixture
def offline_wandb(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    for key, value in {"WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path / "wandb_dir"),
                       "WANDB_SILENT": "true", "WANDB_ERROR_REPORTING": "false",
                       "WANDB_DISABLE_GIT": "true", "WANDB_CONSOLE": "off",
                       "WANDB_API_KEY": ""}.items():
        monkeypatch.setenv(key, value)
    os.makedirs(tmp_path / "wandb_dir")
    yield tmp_path / "wandb_dir"


SETTINGS = LoggingSettings(wandb_project="coach-tests", wandb_tags=("ci", "offline"))


def test_wandb_mirrors_the_metrics_and_the_report(tmp_path, offline_wandb):
    train_1 = {"step": 1, "loss": 4.0, "learning_rate": 1e-4, "finite": True}
    train_2 = {"step": 2, "loss": 3.0, "learning_rate": 2e-4, "grad_norm": 0.5}
    workdir = _workdir(tmp_path, [_eval(0, 0.0, 5.0), train_1, train_2, _eval(2, 1.0, 2.5)])
    write_report(workdir)
    run = wandb_run.WandbRun.start(SETTINGS, workdir, {"optimizer": {"name": "adamw"}}, 0)
    for record in (_eval(0, 0.0, 5.0), train_1, train_2, _eval(2, 1.0, 2.5)):
        run.log(record["step"], record)
    run.log_report(workdir)
    run.finish()
    run.finish()  # idempotent
    run.log(3, {"loss": 1.0})  # after finish: ignored, no error
    _flush()

    [path] = glob.glob(str(offline_wandb / "wandb" / "offline-run-*" / "run-*.wandb"))
    assert open(os.path.join(workdir, "wandb_id.txt")).read().strip() == run.id
    assert path.endswith(f"run-{run.id}.wandb")
    history = _history(path)
    assert sorted(history) == [0, 1, 2]
    assert history[1]["loss"] == 4.0 and "finite" not in history[1]
    assert history[2]["loss"] == 3.0 and history[2]["grad_norm"] == 0.5
    assert history[2]["eval_loss"] == 2.5 and history[2]["behaviour/eval/json_parses"] == 1.0
    assert history[0]["behaviour/eval/schema_valid"] == 0.0
    assert history[2]["report/loss"]["_type"] == "image-file"
    assert history[2]["report/behaviour"]["_type"] == "image-file"
    [start] = [r.run for r in _wandb_records(path) if r.WhichOneof("record_type") == "run"]
    config = {item.key: json.loads(item.value_json) for item in start.config.update}
    assert config["optimizer"] == {"name": "adamw"}
    assert start.project == "coach-tests" and start.display_name == "run"
    assert list(start.tags) == ["ci", "offline"]


def test_a_resumed_run_continues_the_same_wandb_run(tmp_path, offline_wandb):
    workdir = str(tmp_path / "run")
    first = wandb_run.WandbRun.start(SETTINGS, workdir, {}, resume_step=0)
    first.log(5, {"loss": 2.0})
    first.finish()
    resumed = wandb_run.WandbRun.start(SETTINGS, workdir, {}, resume_step=4)
    resumed.log(4, {"loss": 9.0})  # before the checkpoint: already logged, skipped
    resumed.log(5, {"loss": 2.0})
    resumed.finish()
    _flush()
    assert resumed.id == first.id
    runs = glob.glob(str(offline_wandb / "wandb" / "offline-run-*" / f"run-{first.id}.wandb"))
    assert len(runs) == 2
    assert sorted(_history(max(runs, key=os.path.getmtime))) == [5]
    restarted = wandb_run.WandbRun.start(SETTINGS, workdir, {}, resume_step=0)
    with pytest.raises(RuntimeError), restarted:  # a crash marks the run failed
        raise RuntimeError("diverged")
    _flush()
    assert restarted.finished and restarted.id != first.id
    [path] = glob.glob(str(offline_wandb / "wandb" / "offline-run-*" /
                            f"run-{restarted.id}.wandb"))
    [end] = [r.exit for r in _wandb_records(path) if r.WhichOneof("record_type") == "exit"]
    assert end.exit_code == 1


def test_wandb_is_off_without_a_project_and_clear_when_missing(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` raises ImportError
    assert wandb_run.WandbRun.start(LoggingSettings(), str(tmp_path), {}, 0) is None
    with pytest.raises(ImportError, match=r"pip install 'coach_jax\[wandb\]'"):
        wandb_run.WandbRun.start(SETTINGS, str(tmp_path), {}, 0)


def test_a_training_run_logs_to_wandb_what_metrics_jsonl_gets(tmp_path, offline_wandb):
    """Through train_and_evaluate: every train step's loss and the config in W&B as in
    metrics.jsonl and config.json, the report's plots at the end."""
    from coach_jax.train import loop
    from test_trainer import tiny_config
    config = tiny_config(tmp_path, **{"train.steps": 4, "train.eval_every": 0,
                                      "train.log_every": 1, "data.eval": "",
                                      "export.hf": False, "logging.wandb_project": "coach"})
    workdir = str(tmp_path / "w")
    loop.train_and_evaluate(config, workdir)
    _flush()
    [path] = glob.glob(str(offline_wandb / "wandb" / "offline-run-*" / "run-*.wandb"))
    history = _history(path)
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        expected = {r["step"]: r["loss"] for r in map(json.loads, f) if "loss" in r}
    assert {s: history[s]["loss"] for s in expected} == expected
    assert any("report/loss" in row for row in history.values())
    [start] = [r.run for r in _wandb_records(path) if r.WhichOneof("record_type") == "run"]
    config_logged = {item.key: json.loads(item.value_json) for item in start.config.update}
    assert config_logged["train.steps"] == 4 and start.project == "coach"
