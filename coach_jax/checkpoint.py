"""Orbax checkpoints you can trust: the train state, the data iterator and the run's
identity, saved together, restored exactly.

A checkpoint at step s holds the state after s updates, the iterator state that yields
batch s next, and metadata (the model architecture, tokenizer and data fingerprints). Saves
are asynchronous and atomic (Orbax writes `<step>.orbax-checkpoint-tmp` and renames it when
complete): a save cut short by kill -9 leaves only a temporary folder, removed on the next
start, and the previous step is used. A latest checkpoint that fails to restore (corrupt,
truncated) is skipped with a warning in favour of the one before. A full disk is a clear
error and leaves older checkpoints alone.
"""

from __future__ import annotations

import errno
import json
import os
import time
from typing import Any

import jax
import orbax.checkpoint as ocp
from absl import logging


class CheckpointSaveError(OSError):
    """A save that could not be completed (disk full, permissions)."""


class IncompatibleCheckpointError(ValueError):
    """The workdir's checkpoint belongs to a different model or data."""


class Checkpointer:
    def __init__(self, directory: str, every_steps: int, keep: int):
        self.every_steps = every_steps
        self.closed = False
        self.directory = os.path.abspath(directory)
        self.manager = ocp.CheckpointManager(
            self.directory, item_names=("state", "data", "meta"),
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                                 cleanup_tmp_directories=True))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def due(self, step: int) -> bool:
        return self.every_steps > 0 and step % self.every_steps == 0

    def save(self, step: int, state: Any, data_state: dict[str, Any], meta: dict[str, Any]
             ) -> None:
        try:
            self.manager.save(step, args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state),
                meta=ocp.args.JsonSave(meta)), force=True)
        except OSError as e:
            kept = self.steps()
            reason = "the disk is full" if e.errno == errno.ENOSPC else str(e)
            raise CheckpointSaveError(
                e.errno, f"cannot save step {step} to {self.directory}: {reason}; the "
                         f"checkpoints already there ({kept or 'none'}) are untouched") from e

    def delete_after(self, step: int) -> list[int]:
        """Deletes the checkpoints newer than `step` (a diverged stretch); returns them."""
        self.manager.wait_until_finished()
        newer = [s for s in self.steps() if s > step]
        for s in newer:
            self.manager.delete(s)
        return newer

    def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict[str, Any], dict]:
        """The state (placed as `abstract_state`'s shardings say), iterator state, metadata."""
        restored = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore(),
            meta=ocp.args.JsonRestore()))
        return restored["state"], restored["data"], restored["meta"]

    def restore_newest_valid(self, abstract_state: Any, meta_now: dict[str, Any],
                             allow_change: bool = False, step: int | None = None
                             ) -> tuple[int, Any, dict[str, Any]] | None:
        """The newest checkpoint that restores (or exactly `step`); None when there is none.

        A checkpoint of another model or data is an error unless `allow_change`.
        """
        candidates = [step] if step is not None else sorted(self.steps(), reverse=True)
        for candidate in candidates:
            meta = self.meta(candidate)
            if meta is not None:
                check_compatible(meta, meta_now, allow_change, self.directory)
            try:
                state, data_state, _ = self.restore(candidate, abstract_state)
                return candidate, state, data_state
            except Exception as e:  # noqa: BLE001 - any failure means this one is unusable
                if step is not None:
                    raise
                aside = self._set_aside(candidate)
                logging.warning("checkpoint %d in %s does not restore (%s: %s); moved to %s, "
                                "trying the previous one", candidate, self.directory,
                                type(e).__name__, str(e).splitlines()[0] if str(e) else "",
                                aside)
                print(f"warning: checkpoint {candidate} does not restore ({type(e).__name__}); "
                      f"moved it to {aside} and using the previous one", flush=True)
        return None

    def _set_aside(self, step: int) -> str:
        """Renames an unrestorable step out of the manager's way (kept for inspection)."""
        target = os.path.join(self.directory, f"{step}.unrestorable-{int(time.time())}")
        if jax.process_index() == 0:
            os.rename(os.path.join(self.directory, str(step)), target)
        self.manager.reload()
        return target

    def meta(self, step: int) -> dict[str, Any] | None:
        """The identity and settings saved with `step` (None when unreadable)."""
        path = os.path.join(self.directory, str(step), "meta", "metadata")
        try:
            with open(path) as f:
                return json.load(f)
        except (OSError, json.JSONDecodeError):
            return None

    def close(self) -> None:
        """Waits for asynchronous saves to land, then closes; safe to call twice."""
        if not self.closed:
            self.manager.wait_until_finished()
            self.manager.close()
            self.closed = True


def check_compatible(saved: dict[str, Any], now: dict[str, Any], allow_change: bool,
                     where: str) -> None:
    """The same architecture, tokenizer and data as the run that wrote the checkpoint."""
    changed = [key for key in ("model", "tokenizer", "data")
               if now.get(key) is not None and saved.get(key) != now.get(key)]
    if not changed:
        return
    detail = []
    if "model" in changed:
        old, new = saved.get("model", {}), now.get("model", {})
        detail += [f"model.{k}: {old.get(k)} -> {new.get(k)}" for k in sorted(set(old) | set(new))
                   if old.get(k) != new.get(k)]
    for name in ("tokenizer", "data"):
        if name in changed:
            fields = config_changes(saved.get("config"), now.get("config"),
                                    ("tokenizer.",) if name == "tokenizer" else ("data.",),
                                    NOT_DATA_IDENTITY)
            detail += fields or [f"{name}: the files' content changed"]
    message = (f"{where} holds checkpoints of a different run ({'; '.join(detail)}); use a new "
               "--workdir, or set checkpoint.allow_config_change=True to continue anyway")
    if allow_change and "model" not in changed:
        logging.warning(message)
        return
    raise IncompatibleCheckpointError(message)


# Keys that change how data is read or batched, not what the examples are: never the
# reason a checkpoint's data identity differs.
NOT_DATA_IDENTITY = ("data.cache_dir", "data.workers", "data.eval", "data.num_packing_bins",
                     "data.packing", "data.max_drop_fraction", "data.epochs")


def config_changes(saved: dict[str, Any] | None, now: dict[str, Any] | None,
                   prefixes: tuple[str, ...], exclude: tuple[str, ...] = ()) -> list[str]:
    """'key: old -> new' for the flat config keys under `prefixes` (not in `exclude`) that
    differ."""
    if not saved or not now:
        return []
    keys = sorted(k for k in set(saved) | set(now)
                  if k.startswith(prefixes) and k not in exclude)
    return [f"{k}: {saved.get(k)!r} -> {now.get(k)!r}" for k in keys
            if saved.get(k) != now.get(k)]


def abstract(tree: Any) -> Any:
    """Shapes, dtypes and shardings of a tree of arrays: what a restore needs."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                        tree)
