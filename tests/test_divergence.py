"""The divergence guard: on recorded loss curves of real runs (cheap), on hand-made curves
for each rule, and one real run with a learning rate of 1e3 that must stop, keep no
checkpoint of the diverged stretch and export nothing."""

import json
import math
import os
import subprocess
import sys

import pytest

from coach_jax.train import divergence
from coach_jax.train.divergence import DivergenceGuard

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CURVES = os.path.join(os.path.dirname(__file__), "data", "loss_curves.json")
LAB_VOCAB = 1024


def first_divergence(curve: dict, vocab: int = LAB_VOCAB):
    guard = DivergenceGuard(vocab, curve["warmup_steps"])
    for step, (loss, grad_norm) in enumerate(zip(curve["loss"], curve["grad_norm"]), 1):
        found = guard.observe(step, loss, grad_norm, 1e-3)
        if found is not None:
            return found
    return None


@pytest.fixture(scope="module")
def curves():
    with open(CURVES) as f:
        return json.load(f)


def test_recorded_lr_1e3_run_is_caught_within_patience_after_warmup(curves):
    curve = curves["lab_lr_1e3"]
    found = first_divergence(curve)
    assert found is not None
    assert found.step <= curve["warmup_steps"] + divergence.PATIENCE
    assert found.last_healthy == curve["warmup_steps"]
    assert "gradient norm is 0" in found.message()


@pytest.mark.parametrize("name", ["lab_default", "lab_coach_too_hard", "lab_batch_1_noisy"])
def test_recorded_healthy_runs_never_trigger(curves, name):
    assert len(curves[name]["loss"]) >= 250
    assert first_divergence(curves[name]) is None


def guard_over(losses, grad_norms=None, vocab=LAB_VOCAB, warmup=0):
    grad_norms = grad_norms or [1.0] * len(losses)
    return first_divergence({"loss": losses, "grad_norm": grad_norms, "warmup_steps": warmup},
                            vocab)


def test_a_loss_stuck_at_the_uniform_loss_after_learning_is_divergence():
    uniform = math.log(LAB_VOCAB)
    found = guard_over([3.0, 2.0, 1.5, 1.2] + [uniform] * 5)
    assert found is not None and found.step == 4 + divergence.PATIENCE
    assert found.last_healthy == 4 and "uniform-prediction loss" in found.reason


def test_a_model_from_scratch_near_the_uniform_loss_is_not_divergence():
    uniform = math.log(LAB_VOCAB)
    assert guard_over([uniform + 0.3 - 0.001 * i for i in range(200)]) is None


def test_a_blow_up_far_above_the_best_smoothed_loss_is_divergence():
    found = guard_over([0.5] * 20 + [4.0] * 10)  # below ln(1024): not the uniform rule
    assert found is not None and "smoothed loss" in found.reason
    assert found.step == 20 + 5 + divergence.PATIENCE - 1  # the median moves at the 5th
    assert guard_over([40.0] * 5, warmup=0) is None  # a start above ln V is not a rise


def test_single_spikes_and_small_rises_are_not_divergence():
    losses = [2.0 - 0.01 * i for i in range(100)]
    losses[50] = 60.0  # one bad batch
    losses[80:90] = [2.5] * 10  # a rise of 0.6 nat (not 1 nat above the best)
    assert guard_over(losses) is None


def test_zero_gradients_while_the_loss_is_high_is_divergence_but_not_when_small():
    assert guard_over([2.0] * 10, [1.0] * 5 + [0.0] * 5) is not None
    assert guard_over([0.001] * 10, [1.0] * 5 + [0.0] * 5) is None


def test_nothing_is_judged_during_warmup():
    assert guard_over([2.0] * 10, [0.0] * 10, warmup=10) is None


def test_a_diverged_run_stops_without_export_or_checkpoints_after_the_last_healthy_step(
        tmp_path):
    """The issue's reproduction, with a save every 2 steps: exit 3 within 10 steps after
    warmup, a message naming step, loss and learning rate, no export, and report.md says why."""
    result = subprocess.run(
        [sys.executable, "-m", "coach_jax.main", "--config", "configs/default.py",
         "--workdir", str(tmp_path), "--config.train.steps=20",
         "--config.optimizer.learning_rate=1e3", "--config.checkpoint.every_steps=2",
         "--config.eval.generate_examples=0", "--config.eval.reference=",
         f"--config.data.cache_dir={tmp_path / 'cache'}"],
        cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 3, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    error = result.stderr.strip().splitlines()[-1]
    assert error.startswith("coach_jax: error: training diverged at step ")
    step = int(error.split("at step ")[1].split()[0])
    warmup = 5  # configs/default.py
    assert step <= warmup + 10
    assert "loss 6.93" in error and "learning rate" in error
    assert not os.path.exists(tmp_path / "export")
    saved = sorted(int(d) for d in os.listdir(tmp_path / "checkpoints") if d.isdigit())
    assert saved and max(saved) <= warmup, saved
    report = open(tmp_path / "report.md").read()
    assert "stopped early: training diverged" in report
