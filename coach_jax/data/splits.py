"""Carving a seeded eval split from a source, and checking train/eval overlap.

data.eval_split reaches here through `pipeline.with_eval_split`: each training source gets an
`EvalSplit` for its train part and one for its held-out part; the encoded cache
(`cache.encode_source`) reads only the part's records (`EvalSplit.indices`) and stores the
`overlap` report. `split_eval` does the same choice over examples already in memory.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal, Sequence, TypeVar

import numpy as np

from coach_jax.data.conversation import Example

T = TypeVar("T", bound=Example)
PARTS = ("train", "eval")


def check_eval_split(value: float) -> None:
    """Raises a one-line ValueError naming data.eval_split unless `value` is a fraction in
    (0, 1) or a whole count >= 1."""
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"data.eval_split={value:g}: expected a fraction in (0, 1) or a count "
                         ">= 1 of each training source's records (0 = off)")
    if value >= 1 and value != int(value):
        raise ValueError(f"data.eval_split={value:g}: a count must be a whole number (a "
                         "fraction must be below 1)")


@dataclasses.dataclass(frozen=True)
class EvalSplit:
    """One part of a source under data.eval_split: `value` is a fraction (0 < value < 1) or a
    count (a whole number >= 1) of the source's records held out, chosen by `seed` from the
    record positions alone (so every process, resume and part agrees); part "train" reads
    the other records, part "eval" the held-out ones."""

    value: float
    seed: int
    part: Literal["train", "eval"] = "train"

    def __post_init__(self):
        check_eval_split(self.value)
        if self.part not in PARTS:
            raise ValueError(f"eval split part {self.part!r} is not one of {', '.join(PARTS)}")

    def indices(self, n: int) -> list[int]:
        """Positions of this part's records among the source's `n`, in source order."""
        count = max(1, round(n * self.value)) if self.value < 1 else int(self.value)
        if count >= n:
            raise ValueError(f"data.eval_split={self.value:g} holds out {count} of the "
                             f"source's {n} records, leaving none to train on")
        train, held_out = split_indices(n, eval_count=count, seed=self.seed)
        return held_out if self.part == "eval" else train


def split_indices(n: int, eval_fraction: float | None = None, eval_count: int | None = None,
                  seed: int = 0) -> tuple[list[int], list[int]]:
    """(train, eval) positions among `n`: a seeded random choice of `eval_count`, or
    `eval_fraction` of them (rounded, at least 1); both in increasing order."""
    if (eval_fraction is None) == (eval_count is None):
        raise ValueError("give exactly one of eval_fraction and eval_count")
    if eval_fraction is not None:
        if not 0 < eval_fraction < 1:
            raise ValueError(f"the eval fraction {eval_fraction} must be in (0, 1)")
        eval_count = max(1, round(n * eval_fraction))
    if not 0 < eval_count < n:
        raise ValueError(f"the eval count must be between 1 and {n - 1} for a source of "
                         f"{n} records (it is {eval_count})")
    chosen = np.zeros(n, bool)
    chosen[np.random.default_rng(seed).permutation(n)[:eval_count]] = True
    return np.flatnonzero(~chosen).tolist(), np.flatnonzero(chosen).tolist()


def split_eval(examples: Sequence[T], eval_fraction: float | None = None,
               eval_count: int | None = None, seed: int = 0) -> tuple[list[T], list[T]]:
    """(train, eval): `split_indices` applied to examples; both keep the source order."""
    train, held_out = split_indices(len(examples), eval_fraction, eval_count, seed)
    return [examples[i] for i in train], [examples[i] for i in held_out]


def overlap(train: Sequence[Example], held_out: Sequence[Example]) -> list[tuple[str, str]]:
    """(train origin, eval origin) of eval examples whose text (whitespace-normalised) also
    appears in train: exact duplicates that would make eval loss look better than it is."""
    seen = {}
    for e in train:
        seen.setdefault(e.text_for_dedup(), str(e.origin))
    return [(seen[e.text_for_dedup()], str(e.origin)) for e in held_out
            if e.text_for_dedup() in seen]
