"""Command line entry point.

  python -m coach_jax.main --config configs/default.py --workdir runs/demo \
      --config.model.num_layers=8
"""

from absl import app, flags, logging
from ml_collections import config_flags

from coach_jax.demo import forward_demo

_CONFIG = config_flags.DEFINE_config_file("config", None, "Run config (a python file).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Folder for this run's outputs.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    result = forward_demo(_CONFIG.value, _WORKDIR.value)
    logging.info("demo: %s", result)
    print(f"forward pass ok: next-token NLL {result['next_token_nll']:.3f} on random tokens "
          f"(uniform: {result['uniform_nll']:.3f}), {result['parameters']:,} parameters; "
          f"outputs in {_WORKDIR.value}")


if __name__ == "__main__":
    app.run(main)
