"""Command line entry point.

  python -m coach_jax.main --config configs/default.py --workdir runs/demo \
      [--mode=train|eval|lint|inspect|export|memory] [--config.optimizer.name=lion ...]
  python -m coach_jax.main --mode=chat --model runs/demo/export
  python -m coach_jax.main --mode=generate --model DIR --input in.jsonl --output out.jsonl
"""

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from coach_jax import errors, parallel
from coach_jax.config import MODES, load_saved, optional_keys

_CONFIG = config_flags.DEFINE_config_file("config", None, "Run config: configs/<file>.py[:preset]",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Folder for this run's outputs and checkpoints.")
_MODE = flags.DEFINE_enum("mode", "train", MODES, "What to do.")
_INSPECT = flags.DEFINE_integer("inspect_examples", 3, "Examples --mode=inspect shows.")
_STEP = flags.DEFINE_integer("step", None,
                             "Checkpoint step for --mode=eval/export/generate/chat (latest).")
# --mode=generate / chat
_MODEL = flags.DEFINE_string("model", None, "An HF model folder to generate with (instead of "
                             "--config/--workdir's checkpoint).")
_INPUT = flags.DEFINE_string("input", None, "--mode=generate: a JSONL of conversations "
                             "and/or {\"text\": ...} prompts.")
_OUTPUT = flags.DEFINE_string("output", None, "--mode=generate: where to write the outputs.")
_SYSTEM = flags.DEFINE_string("system", None, "--mode=chat: a system prompt.")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 256, "Generation: new tokens at most.")
_TEMPERATURE = flags.DEFINE_float("temperature", 0.0, "Generation: 0 = greedy.")
_TOP_K = flags.DEFINE_integer("top_k", 0, "Generation: sample from the k most likely (0 = off).")
_TOP_P = flags.DEFINE_float("top_p", 1.0, "Generation: nucleus sampling mass (1 = off).")
_SEED = flags.DEFINE_integer("seed", 0, "Generation: sampling seed.")
_GEN_BATCH = flags.DEFINE_integer("generate_batch_size", 32, "Generation: prompts per batch.")


# `--config.<key>=None` overrides, taken out before absl parses (its parsers expect a value
# of the key's type) and applied after.
_NONE_OVERRIDES: list[str] = []


def run(mode: str, config, workdir: str) -> int:
    """One mode; returns the exit status."""
    from coach_jax import modes  # after flag parsing: keeps --help fast
    if mode == "train":
        from coach_jax.train.loop import train_and_evaluate
        from coach_jax.train.reporting import summary_line
        record = train_and_evaluate(config, workdir)
        print(summary_line(record), flush=True)
        return 0
    return getattr(modes, mode)(
        config, workdir, inspect_examples=_INSPECT.value, step=_STEP.value, model=_MODEL.value,
        input=_INPUT.value, output=_OUTPUT.value, system=_SYSTEM.value,
        max_new_tokens=_MAX_NEW.value, temperature=_TEMPERATURE.value, top_k=_TOP_K.value,
        top_p=_TOP_P.value, seed=_SEED.value, generate_batch_size=_GEN_BATCH.value)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    if _WORKDIR.value is None and _MODE.value in ("train", "eval", "export"):
        errors.exit_with(f"--workdir is required for --mode={_MODE.value}")
    saved_config = _WORKDIR.value and os.path.isfile(os.path.join(_WORKDIR.value, "config.json"))
    if _CONFIG.value is None and not (_MODE.value in ("generate", "chat") and _MODEL.value) \
            and not (_MODE.value in ("eval", "export") and saved_config):
        errors.exit_with(f"--config is required for --mode={_MODE.value}"
                         + (" (or --model=<HF folder>)" if _MODE.value in ("generate", "chat")
                            else ""))
    if not flags.FLAGS["verbosity"].present:  # progress lines only; -v 0 for library logs
        logging.set_verbosity(logging.WARNING)
    with errors.reported():
        config = run_config(_MODE.value, _WORKDIR.value)
        if config is not None:
            distributed = config.distributed
            parallel.initialize_distributed(distributed.coordinator_address,
                                            distributed.num_processes, distributed.process_id)
        sys.exit(run(_MODE.value, config, _WORKDIR.value))


def run_config(mode: str, workdir: str | None):
    """The config a mode runs with: --mode=eval/export start from the run's own
    DIR/config.json (what it trained with), other modes from --config; the command line's
    --config.<key> overrides apply on top."""
    config = _CONFIG.value
    overrides = {}
    if config is not None:
        overrides = dict(config_flags.get_override_values(flags.FLAGS["config"]))
        overrides.update({key: None for key in _NONE_OVERRIDES})
    saved = os.path.join(workdir or "", "config.json")
    if mode in ("eval", "export") and os.path.isfile(saved):
        config = load_saved(saved)
        config.update_from_flattened_dict(overrides)
        logging.info("--mode=%s: the config of %s, with %d overrides", mode, saved,
                     len(overrides))
    elif config is not None:
        config.update_from_flattened_dict({key: None for key in _NONE_OVERRIDES})
    return config


def parse_flags(argv: list[str]) -> list[str]:
    """absl's parsing, after taking out `--config.<key>=None` for the keys that may be None
    (optional_keys); None for any other key is a one-line error."""
    kept, optional = [], optional_keys()
    for arg in argv:
        key, sep, value = arg.removeprefix("--config.").partition("=")
        if arg.startswith("--config.") and sep and value == "None":
            if key not in optional:
                errors.exit_with(f"--config.{key}=None: {key} cannot be None; the keys that "
                                 f"can: {', '.join(optional)}")
            _NONE_OVERRIDES.append(key)
            continue
        kept.append(arg)
    return errors.parse_flags(kept)


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
