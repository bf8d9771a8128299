"""The command line: the README's commands run."""

import json
import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_default_command_trains(short_default_run):
    """The README's run command, 3 steps (conftest's run, shared with test_generate_modes)."""
    tmp_path, _, result = short_default_run
    assert result.returncode == 0, result.stderr
    assert "step 3/3 | loss" in result.stdout
    assert json.load(open(tmp_path / "config.json"))["train"]["steps"] == 3
    assert len(open(tmp_path / "metrics.jsonl").readlines()) >= 3
    assert os.path.exists(tmp_path / "export" / "model.safetensors")


def test_warmup_longer_than_the_run_is_one_clear_line(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "coach_jax.main", "--config", "configs/default.py", "--workdir",
         str(tmp_path), "--config.train.steps=3", f"--config.data.cache_dir={tmp_path / 'c'}"],
        cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().endswith(
        "schedule warmup (5 steps) must be shorter than the run (3 steps)")


def test_ci_runs_the_readme_test_command():
    readme = open(os.path.join(ROOT, "README.md")).read()
    ci = open(os.path.join(ROOT, ".ci", "run")).read()
    command = re.search(r"^(python -m pytest.*)$", ci, re.M).group(1)
    assert f"&& {command}\n" in readme
