"""Checkpoints you can trust: exact resume after kill -9 or SIGTERM, fallbacks, errors."""

import errno
import json
import os
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest
from safetensors.numpy import load_file

from coach_jax.checkpoint import CheckpointSaveError, Checkpointer
from test_trainer import ROOT

STEPS = 12


def command(workdir, *overrides):
    return [sys.executable, "-m", "coach_jax.main", "--config", "configs/default.py",
            "--workdir", str(workdir), "--config.model.hf_path=", "--config.eval.reference=",
            "--config.model.init.hidden_size=32",
            "--config.model.init.intermediate_size=64", "--config.model.init.num_hidden_layers=2",
            "--config.model.init.head_dim=8", f"--config.train.steps={STEPS}",
            "--config.train.log_every=1", "--config.train.global_batch_size=8",
            "--config.train.eval_every=0", "--config.data.eval=", "--config.data.workers=2",
            "--config.eval.generate_examples=0",
            "--config.schedule.warmup_steps=2", "--config.checkpoint.every_steps=4",
            "--config.optimizer.learning_rate=1e-2",
            f"--config.data.cache_dir={workdir}/../cache", *overrides]


def run(workdir, *overrides, check=True, make=None):
    """The run's command (`make(workdir, *overrides)`, this module's `command` by default)
    to its end; its exit status checked unless `check` is False."""
    result = subprocess.run((make or command)(workdir, *overrides), cwd=ROOT,
                            capture_output=True, text=True, timeout=600)
    if check:
        assert result.returncode == 0, result.stderr[-3000:]
    return result


def start(workdir, *overrides):
    return subprocess.Popen(command(workdir, *overrides), cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def wait_for(process, text):
    for line in process.stdout:
        if text in line:
            return
    raise AssertionError(f"never printed {text!r}: {process.stderr.read()[-2000:]}")


def losses(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [(r["step"], r["loss"]) for r in map(json.loads, f) if "loss" in r]


def final_params(workdir):
    return load_file(os.path.join(workdir, "export", "model.safetensors"))


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("resume") / "uninterrupted"
    run(workdir)
    return workdir


def assert_same_run(workdir, reference):
    assert losses(workdir) == losses(reference)  # bitwise, step by step
    a, b = final_params(workdir), final_params(reference)
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_kill_9_then_resume_gives_the_uninterrupted_run(uninterrupted):
    workdir = uninterrupted.parent / "killed"
    process = start(workdir)
    wait_for(process, "step 7/12")  # checkpoint 4 exists; steps 5-7 will be lost
    process.kill()
    process.wait()
    assert not os.path.exists(workdir / "export")
    resumed = run(workdir)
    assert f"resumed from step 4 in {workdir}/checkpoints" in resumed.stdout
    assert "step 5/12" in resumed.stdout and "step 1/12" not in resumed.stdout
    assert "schedule changed" not in resumed.stdout
    assert_same_run(workdir, uninterrupted)


def test_sigterm_saves_that_step_and_exits_0(uninterrupted):
    workdir = uninterrupted.parent / "terminated"
    process = start(workdir)
    wait_for(process, "step 6/12")
    process.send_signal(signal.SIGTERM)
    out, err = process.communicate(timeout=300)
    assert process.returncode == 0, err[-2000:]
    assert "SIGTERM: stopping after this step and saving; press Ctrl-C again" in err
    preempted = [line for line in out.splitlines() if line.startswith("preempted: saved step")]
    assert preempted, out
    saved = int(preempted[0].split()[3])
    assert str(saved) in os.listdir(workdir / "checkpoints")
    run(workdir)
    assert_same_run(workdir, uninterrupted)


def test_an_interrupted_save_falls_back_to_the_previous_step(uninterrupted):
    workdir = uninterrupted.parent / "interrupted_save"
    shutil.copytree(uninterrupted, workdir, ignore=shutil.ignore_patterns("export"))
    # What kill -9 during the async save of step 12 leaves behind: a temporary folder.
    shutil.rmtree(workdir / "checkpoints" / "12")
    leftover = workdir / "checkpoints" / "12.orbax-checkpoint-tmp"
    shutil.copytree(uninterrupted / "checkpoints" / "12", leftover)
    os.remove(leftover / "_CHECKPOINT_METADATA")
    resumed = run(workdir)
    assert "step 9/12" in resumed.stdout and "step 8/12" not in resumed.stdout
    assert not leftover.exists()
    assert_same_run(workdir, uninterrupted)


def test_a_corrupt_latest_checkpoint_is_skipped_with_a_warning(uninterrupted):
    workdir = uninterrupted.parent / "corrupt"
    shutil.copytree(uninterrupted, workdir, ignore=shutil.ignore_patterns("export"))
    for root, _, files in os.walk(workdir / "checkpoints" / "12" / "state"):
        for name in files:
            path = os.path.join(root, name)
            with open(path, "r+b") as f:
                f.write(b"\0garbage\0" * 8)
    resumed = run(workdir)
    assert "warning: checkpoint 12 does not restore" in resumed.stdout
    assert "step 9/12" in resumed.stdout
    assert_same_run(workdir, uninterrupted)


@pytest.mark.parametrize("override, changed", [
    ("--config.model.init.num_hidden_layers=3", "model.num_layers: 2 -> 3"),
    ("--config.data.max_seq_len=128", "(data.max_seq_len: 256 -> 128)"),  # only that field
])
def test_a_changed_model_or_data_in_the_same_workdir_is_refused(uninterrupted, tmp_path,
                                                                 override, changed):
    workdir = tmp_path / "changed"
    shutil.copytree(uninterrupted / "checkpoints", workdir / "checkpoints")
    result = run(workdir, override, check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "holds checkpoints of a different run (" in result.stderr
    assert changed in result.stderr


def test_export_from_any_saved_step(uninterrupted, tmp_path):
    workdir = tmp_path / "export_step"
    shutil.copytree(uninterrupted / "checkpoints", workdir / "checkpoints")
    result = subprocess.run(command(workdir, "--mode=export", "--step=8"), cwd=ROOT,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads(result.stdout.strip().splitlines()[-1])["step"] == 8
    params = final_params(workdir)
    assert not np.array_equal(params["model.norm.weight"],
                              final_params(uninterrupted)["model.norm.weight"])


def test_a_checkpoint_restores_onto_another_mesh(uninterrupted, tmp_path):
    """Step 4 of the uninterrupted run (all 8 devices on `data`), resumed on a (2, 4) mesh:
    steps 5-12 are trained again on the other mesh and must match the reference."""
    reference = uninterrupted
    workdir = tmp_path / "moved"
    shutil.copytree(reference / "checkpoints", workdir / "checkpoints")
    for later in ("8", "12"):
        shutil.rmtree(workdir / "checkpoints" / later)
    with open(reference / "metrics.jsonl") as f, open(workdir / "metrics.jsonl", "w") as out:
        out.writelines(line for line in f if json.loads(line)["step"] <= 4)
    run(workdir, "--config.mesh.data=2", "--config.mesh.fsdp=4")
    ours, theirs = dict(losses(workdir)), dict(losses(reference))
    assert ours.keys() == theirs.keys()
    np.testing.assert_allclose([ours[s] for s in sorted(ours)],
                               [theirs[s] for s in sorted(theirs)], rtol=1e-5)


def test_a_full_disk_is_a_clear_error_and_keeps_older_checkpoints(tmp_path, monkeypatch):
    checkpoints = Checkpointer(str(tmp_path / "ckpt"), every_steps=1, keep=3)
    state = {"w": np.ones(4, np.float32)}
    checkpoints.save(1, state, {"batches": 1}, {"model": {}})
    checkpoints.manager.wait_until_finished()

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoints.manager, "save", full_disk)
    with pytest.raises(CheckpointSaveError, match=r"cannot save step 2 to .*: the disk is full; "
                                                  r"the checkpoints already there \(\[1\]\)"):
        checkpoints.save(2, state, {"batches": 2}, {"model": {}})
    assert checkpoints.steps() == [1]
