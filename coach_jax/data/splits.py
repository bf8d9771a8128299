"""Carving a seeded eval split from a source, and checking train/eval overlap.

Not yet reached from the config: step 13 wires it (an eval split carved from data.train,
and an overlap warning); until then it is library API, tested in tests/test_encoded.py."""

from __future__ import annotations

from typing import Sequence, TypeVar

import numpy as np

from coach_jax.data.conversation import Example

T = TypeVar("T", bound=Example)


def split_eval(examples: Sequence[T], eval_fraction: float | None = None,
               eval_count: int | None = None, seed: int = 0) -> tuple[list[T], list[T]]:
    """(train, eval): a seeded random choice of `eval_count` examples, or `eval_fraction` of
    them (rounded, at least 1); both keep the source order."""
    if (eval_fraction is None) == (eval_count is None):
        raise ValueError("give exactly one of eval_fraction and eval_count")
    n = len(examples)
    if eval_fraction is not None:
        if not 0 < eval_fraction < 1:
            raise ValueError(f"eval_fraction={eval_fraction} must be in (0, 1)")
        eval_count = max(1, round(n * eval_fraction))
    if not 0 < eval_count < n:
        raise ValueError(f"eval_count={eval_count} must be between 1 and {n - 1} "
                         f"for a source of {n} examples")
    chosen = set(np.random.default_rng(seed).permutation(n)[:eval_count].tolist())
    train = [e for i, e in enumerate(examples) if i not in chosen]
    held_out = [e for i, e in enumerate(examples) if i in chosen]
    return train, held_out


def overlap(train: Sequence[Example], held_out: Sequence[Example]) -> list[tuple[str, str]]:
    """(train origin, eval origin) of eval examples whose text (whitespace-normalised) also
    appears in train: exact duplicates that would make eval loss look better than it is."""
    seen = {}
    for e in train:
        seen.setdefault(e.text_for_dedup(), str(e.origin))
    return [(seen[e.text_for_dedup()], str(e.origin)) for e in held_out
            if e.text_for_dedup() in seen]
