"""Command line entry point.

  python -m coach_jax.main --config configs/default.py --workdir runs/demo \
      [--mode=train|eval|lint|inspect|export] [--config.optimizer.name=lion ...]
"""

import json
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from coach_jax import errors, parallel
from coach_jax.config import MODES

_CONFIG = config_flags.DEFINE_config_file("config", None, "Run config: configs/<file>.py[:preset]",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Folder for this run's outputs and checkpoints.")
_MODE = flags.DEFINE_enum("mode", "train", MODES, "What to do.")
_INSPECT = flags.DEFINE_integer("inspect_examples", 3, "Examples --mode=inspect shows.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step for --mode=eval/export (latest).")


def run(mode: str, config, workdir: str) -> int:
    """One mode; returns the exit status."""
    from coach_jax import modes  # after flag parsing: keeps --help fast
    if mode == "train":
        from coach_jax.train.loop import train_and_evaluate
        record = train_and_evaluate(config, workdir)
        print(json.dumps(record))
        return 0
    return getattr(modes, mode)(config, workdir, inspect_examples=_INSPECT.value,
                                step=_STEP.value)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    if _WORKDIR.value is None and _MODE.value in ("train", "eval", "export"):
        errors.exit_with(f"--workdir is required for --mode={_MODE.value}")
    if not flags.FLAGS["verbosity"].present:  # progress lines only; -v 0 for library logs
        logging.set_verbosity(logging.WARNING)
    with errors.reported():
        distributed = _CONFIG.value.distributed
        parallel.initialize_distributed(distributed.coordinator_address,
                                        distributed.num_processes, distributed.process_id)
        sys.exit(run(_MODE.value, _CONFIG.value, _WORKDIR.value))


if __name__ == "__main__":
    app.run(main, flags_parser=errors.parse_flags)
