"""Every way out of the training loop restores the signal handlers and closes the metrics
writer and the checkpoint manager: the last step, a preemption, a non-finite loss, and any
exception (a notebook's Ctrl-C must work after a failed run)."""

import math
import os
import signal

import pytest

from coach_jax import checkpoint, train
from coach_jax.errors import RunAborted
from coach_jax.train import loop, reporting, run_resources
from test_trainer import tiny_config


@pytest.fixture
def opened(monkeypatch):
    """Records every MetricsWriter and Checkpointer the loop creates."""
    made = {"writers": [], "checkpointers": []}
    writer_init = reporting.MetricsWriter.__init__
    checkpointer_init = checkpoint.Checkpointer.__init__

    def track_writer(self, *args, **kwargs):
        writer_init(self, *args, **kwargs)
        made["writers"].append(self)

    def track_checkpointer(self, *args, **kwargs):
        checkpointer_init(self, *args, **kwargs)
        made["checkpointers"].append(self)

    monkeypatch.setattr(reporting.MetricsWriter, "__init__", track_writer)
    monkeypatch.setattr(checkpoint.Checkpointer, "__init__", track_checkpointer)
    return made


@pytest.fixture
def handlers():
    """A handler of the test's own on SIGINT and SIGTERM, put back afterwards."""
    def own(signum, frame):
        pass
    previous = {sig: signal.signal(sig, own) for sig in (signal.SIGINT, signal.SIGTERM)}
    yield own
    for sig, handler in previous.items():
        signal.signal(sig, handler)


def _short_config(tmp_path, **overrides):
    settings = {"train.steps": 4, "train.eval_every": 0, "train.log_every": 1,
                "checkpoint.every_steps": 2, "data.eval": "", "export.hf": False}
    settings.update(overrides)
    return tiny_config(tmp_path, **settings)


def _assert_cleaned_up(made, own):
    assert signal.getsignal(signal.SIGINT) is own
    assert signal.getsignal(signal.SIGTERM) is own
    assert made["writers"] and all(w.closed for w in made["writers"])
    assert made["checkpointers"] and all(c.closed for c in made["checkpointers"])


def test_normal_end_cleans_up(tmp_path, opened, handlers):
    record = loop.train_and_evaluate(_short_config(tmp_path), str(tmp_path / "w"))
    assert record["step"] == 4
    _assert_cleaned_up(opened, handlers)


def test_preemption_cleans_up(tmp_path, opened, handlers, monkeypatch):
    def requested(self, step):
        if step == 2:  # what SIGTERM does, at a known step
            self.flag = True
        return self.flag
    monkeypatch.setattr(run_resources.PreemptionWatch, "requested", requested)
    record = loop.train_and_evaluate(_short_config(tmp_path), str(tmp_path / "w"))
    assert record["preempted_at"] == 2
    assert sorted(os.listdir(tmp_path / "w" / "checkpoints")) == ["2"]
    _assert_cleaned_up(opened, handlers)


def test_non_finite_stop_cleans_up(tmp_path, opened, handlers):
    config = _short_config(tmp_path, **{"optimizer.learning_rate": float("nan")})
    with pytest.raises(train.NonFiniteError, match="step 2: non-finite"):
        loop.train_and_evaluate(config, str(tmp_path / "w"))
    _assert_cleaned_up(opened, handlers)


def test_any_exception_cleans_up(tmp_path, opened, handlers, monkeypatch):
    def broken_save(self, step, iterator):
        raise RuntimeError("disk gone")
    monkeypatch.setattr(loop.Trainer, "save", broken_save)
    with pytest.raises(RuntimeError, match="disk gone"):
        loop.train_and_evaluate(_short_config(tmp_path), str(tmp_path / "w"))
    _assert_cleaned_up(opened, handlers)


def test_handlers_are_the_loops_only_inside(handlers):
    with run_resources.PreemptionWatch() as watch:
        assert signal.getsignal(signal.SIGINT) == watch._handle
        signal.raise_signal(signal.SIGTERM)
        assert watch.requested(1)
    assert signal.getsignal(signal.SIGINT) is handlers


def test_the_first_signal_says_what_happens_and_a_second_ctrl_c_aborts(handlers, capsys):
    with run_resources.PreemptionWatch() as watch:
        signal.raise_signal(signal.SIGINT)
        assert watch.requested(1)
        assert ("Ctrl-C: stopping after this step and saving; press Ctrl-C again to abort "
                "without saving") in capsys.readouterr().err
        with pytest.raises(RunAborted):
            signal.raise_signal(signal.SIGINT)


def test_a_second_ctrl_c_ends_the_run_and_keeps_the_last_checkpoint(tmp_path, opened, handlers,
                                                                     monkeypatch):
    def requested(self, step):
        if step == 3:  # Ctrl-C twice during step 3; checkpoint 2 is saved
            self._handle(signal.SIGINT, None)
            self._handle(signal.SIGINT, None)
        return self.flag
    with monkeypatch.context() as patch:
        patch.setattr(run_resources.PreemptionWatch, "requested", requested)
        workdir = tmp_path / "w"
        with pytest.raises(RunAborted, match=r"aborted at step 3 without saving; the last "
                                             r"checkpoint is step 2 in .*checkpoints"):
            loop.train_and_evaluate(_short_config(tmp_path), str(workdir))
    assert sorted(os.listdir(workdir / "checkpoints")) == ["2"]
    _assert_cleaned_up(opened, handlers)
    # The kept checkpoint restores: the run continues from it.
    record = loop.train_and_evaluate(_short_config(tmp_path), str(workdir))
    assert record["step"] == 4


def test_resume_says_where_it_continues_and_warns_when_the_schedule_changes(tmp_path, capsys):
    """train.steps 4 -> 8 moves warmup_cosine's rate at step 4 (warmup 2, peak 1e-2):
    cos(pi * 2/2) -> cos(pi * 2/6), by hand."""
    workdir = str(tmp_path / "w")
    loop.train_and_evaluate(_short_config(tmp_path), workdir)
    capsys.readouterr()
    loop.train_and_evaluate(_short_config(tmp_path, **{"train.steps": 8}), workdir)
    out = capsys.readouterr().out
    assert f"resumed from step 4 in {os.path.abspath(workdir)}/checkpoints" in out
    old = 1e-2 * 0.5 * (1 + math.cos(math.pi * 2 / 2))
    new = 1e-2 * 0.5 * (1 + math.cos(math.pi * 2 / 6))
    assert (f"warning: the learning-rate schedule changed since the checkpoint (train.steps: "
            f"4 -> 8): the learning rate at step 4 moves from {old:.3e} to {new:.3e}") in out


def test_resume_with_the_same_schedule_does_not_warn(tmp_path, capsys):
    workdir = str(tmp_path / "w")
    loop.train_and_evaluate(_short_config(tmp_path, **{"train.steps": 2}), workdir)
    config = _short_config(tmp_path, **{"train.steps": 2})
    loop.train_and_evaluate(config, workdir)  # nothing left to train: resumes at the end
    out = capsys.readouterr().out
    assert "resumed from step 2" in out and "schedule changed" not in out
