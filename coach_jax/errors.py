"""Bad input ends a command with one clear line, not a wall of traceback.

The errors listed here are the user's to fix (config, data, files, checkpoints); anything
else is a bug and keeps its traceback.
"""

from __future__ import annotations

import contextlib
import sys
from typing import Iterator

from absl import flags

from coach_jax.checkpoint import CheckpointSaveError, IncompatibleCheckpointError
from coach_jax.config import ConfigError
from coach_jax.data.errors import DataError
from coach_jax.data.pipeline import PipelineError
from coach_jax.evals.behaviour import SchemaError
from coach_jax.memory import DoesNotFitError
from coach_jax.models.config import UnsupportedModelError
from coach_jax.models.hf_checkpoint import CheckpointError
from coach_jax.train.optimizers import OptimizerConfigError
from coach_jax.train.divergence import DivergedError
from coach_jax.train.param_groups import ParamGroupError
from coach_jax.train.step import NonFiniteError

USER_ERRORS = (ConfigError, DivergedError, ParamGroupError, DataError, PipelineError,
               UnsupportedModelError, CheckpointError, OptimizerConfigError, NonFiniteError,
               DoesNotFitError, CheckpointSaveError, IncompatibleCheckpointError, SchemaError,
               FileNotFoundError)


class RunAborted(Exception):
    """A second Ctrl-C during training: the run ends at once, nothing more is saved."""


def exit_with(message: str, status: int = 2) -> None:
    print(f"coach_jax: error: {message}", file=sys.stderr)
    sys.exit(status)


@contextlib.contextmanager
def reported() -> Iterator[None]:
    try:
        yield
    except USER_ERRORS as e:
        stops = isinstance(e, (NonFiniteError, DivergedError))  # the run failed, not the input
        exit_with(str(e).splitlines()[0] if isinstance(e, NonFiniteError) else str(e),
                  3 if stops else 2)
    except RunAborted as e:
        exit_with(str(e) or "aborted", 130)
    except KeyboardInterrupt:
        exit_with("interrupted", 130)


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing, with config override errors (a misspelled key, a value of the
    wrong type) turned into one line."""
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        exit_with(str(e))
    except (AttributeError, KeyError, TypeError, ValueError) as e:
        message = str(e).strip("'\"").replace("\\n", " ").replace('\\"', '"').replace("\\'", "'")
        exit_with(f"bad config override: {message}")
    return []
