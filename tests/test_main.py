"""The command line: the README's default command runs, and bad flags fail clearly."""

import json
import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(*args):
    return subprocess.run([sys.executable, "-m", "coach_jax.main", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)


def test_default_command_runs_a_forward_pass(tmp_path):
    result = _run("--config", "configs/default.py", "--workdir", str(tmp_path),
                  "--config.model.num_layers=2", "--config.demo.seq_len=16")
    assert result.returncode == 0, result.stderr
    demo = json.load(open(tmp_path / "demo.json"))
    # A random model on random tokens scores about log(vocab) but not exactly: far from it
    # (or NaN) means a broken forward pass, exactly it means all-equal logits.
    assert 0 < abs(demo["next_token_nll"] - demo["uniform_nll"]) < 0.5
    saved = json.load(open(tmp_path / "config.json"))
    assert saved["model"]["num_layers"] == 2


def test_misspelled_config_field_fails(tmp_path):
    result = _run("--config", "configs/default.py", "--workdir", str(tmp_path),
                  "--config.model.num_layerz=3")
    assert result.returncode != 0
    assert 'Did you mean "num_layers"' in result.stderr


def test_ci_runs_the_readme_test_command():
    readme = open(os.path.join(ROOT, "README.md")).read()
    ci = open(os.path.join(ROOT, ".ci", "run")).read()
    command = re.search(r"^(python -m pytest.*)$", ci, re.M).group(1)
    assert f"&& {command}\n" in readme
