"""The command line: the README's commands run."""

import json
import os
import re
import subprocess
import sys

from safetensors.numpy import load_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_default_command_trains(short_default_run):
    """The README's run command, 3 steps (conftest's run, shared with test_generate_modes)."""
    tmp_path, _, result = short_default_run
    assert result.returncode == 0, result.stderr
    assert "step 3/3 | loss" in result.stdout
    assert json.load(open(tmp_path / "config.json"))["train"]["steps"] == 3
    assert len(open(tmp_path / "metrics.jsonl").readlines()) >= 3
    assert os.path.exists(tmp_path / "export" / "model.safetensors")


def test_the_run_prints_parameter_counts_warnings_and_a_summary(short_default_run):
    """Before step 1: trainable / frozen counts (against the base's safetensors) and the
    warmup (5 steps) outlasting the run (3 steps) as a warning, not an error; at the end a
    sentence, not a JSON dump."""
    tmp_path, _, result = short_default_run
    sizes = load_file(os.path.join(ROOT, "assets", "lab", "base", "model.safetensors"))
    total = sum(v.size for v in sizes.values())
    assert f"parameters: {total:,} trainable, 0 frozen" in result.stdout
    assert ("warning: the schedule's warmup (5 steps) is not shorter than the run (3 steps)"
            in result.stdout)
    lines = result.stdout.strip().splitlines()
    step_1 = next(l for l in lines if l.startswith("step 1/3 |"))
    step_2 = next(l for l in lines if l.startswith("step 2/3 |"))
    assert "ETA" not in step_1 and "ETA" in step_2  # step 1's time is mostly compilation
    last = lines[-1]
    assert last.startswith("done: 3 steps | train loss ")
    assert f"report {tmp_path / 'report.md'}" in last and f"export {tmp_path / 'export'}" in last


def test_eval_mode_reads_the_runs_config_and_flags_override_it(short_default_run):
    """The run trained without eval data, behaviour or forgetting; --mode=eval with only the
    held-out data named evaluates just that (configs/default.py alone would also generate and
    measure forgetting), and without --config it needs nothing but the workdir."""
    workdir, _, _ = short_default_run
    result = subprocess.run(
        [sys.executable, "-m", "coach_jax.main", "--config", "configs/default.py",
         "--workdir", str(workdir), "--mode=eval", "--config.data.eval=assets/lab/eval.jsonl",
         "--config.eval.max_batches=1"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    metrics = json.loads(result.stdout.strip().splitlines()[-1])
    assert metrics["step"] == 3 and "eval_loss" in metrics
    assert not any(k.startswith(("behaviour/", "forgetting/")) for k in metrics)
    bare = subprocess.run([sys.executable, "-m", "coach_jax.main", "--workdir", str(workdir),
                           "--mode=eval"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert bare.returncode == 0, bare.stderr[-2000:]
    assert json.loads(bare.stdout.strip().splitlines()[-1]) == {"step": 3}


def test_ci_runs_the_readme_test_command():
    readme = open(os.path.join(ROOT, "README.md")).read()
    ci = open(os.path.join(ROOT, ".ci", "run")).read()
    command = re.search(r"^(python -m pytest.*)$", ci, re.M).group(1)
    assert f"&& {command}\n" in readme
