"""--mode=eval|lint|inspect|export: the commands besides training."""

from __future__ import annotations

import json

import jax

from coach_jax import data
from coach_jax.config import resolve


def _sources(config) -> tuple:
    """The validated run and every data source it names (train, then eval)."""
    run = resolve(config, jax.device_count(), jax.process_count())
    return run, list(run.train_sources + run.eval_sources)


def lint(config, workdir, **_) -> int:
    """Every record of data.train and data.eval checked; exit 1 on errors."""
    run, sources = _sources(config)
    tokenizer = data.load_tokenizer(run.tokenizer_path, run.chat_template)
    failed = False
    for source in sources:
        report = data.lint(source.paths, tokenizer, source.format, config.data.max_seq_len,
                           config.data.train_on)
        print(f"== {source.name} ({source.paths})\n{report.format()}")
        failed |= not report.ok()
    return 1 if failed else 0


def inspect(config, workdir, inspect_examples: int = 3, **_) -> int:
    """The first examples of each source as the model sees them, supervised text marked."""
    run, sources = _sources(config)
    tokenizer = data.load_tokenizer(run.tokenizer_path, run.chat_template)
    for source in sources:
        print(f"== {source.name} ({source.paths})")
        print(data.inspect(source.paths, tokenizer, inspect_examples, source.format,
                           config.data.train_on))
    return 0


def _restored_trainer(config, workdir, step=None):
    from coach_jax.train.loop import Trainer
    trainer = Trainer(config, workdir, with_data=False)
    if trainer.checkpoints.latest_step() is None:
        raise FileNotFoundError(f"{workdir}/checkpoints: no checkpoint to load")
    if step is not None and step not in trainer.checkpoints.steps():
        raise FileNotFoundError(f"{workdir}/checkpoints: no step {step}; saved steps: "
                                f"{trainer.checkpoints.steps()}")
    return trainer, trainer.restore(step=step)


def eval(config, workdir, step=None, **_) -> int:  # noqa: A001 - the mode's name
    trainer, step = _restored_trainer(config, workdir, step)
    print(json.dumps({"step": step, **trainer.evaluate()}))
    return 0


def export(config, workdir, step=None, **_) -> int:
    """DIR/export from the latest checkpoint, or from `--step`."""
    trainer, step = _restored_trainer(config, workdir, step)
    print(json.dumps({"step": step, "export": trainer.export()}))
    return 0
