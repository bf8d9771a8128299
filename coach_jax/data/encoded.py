"""Encoding a stream of examples under explicit policies, with every skip counted.

Policies (config keys in CONFIG_KEYS):
- `overlong` (data.truncation): an example fits when its inputs (all tokens but the last,
  after the shift) fit `max_seq_len`. `drop` (default) skips a longer one, `truncate` keeps
  its head, `error` stops with its origin.
- `on_invalid` (data.on_invalid): `error` (default) stops at the first bad record
  (malformed JSON, unknown format, missing or empty fields, a template that rejects it);
  `skip` counts and reports.
- An example with nothing supervised (after truncation too) is never trained on: counted.
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Any, Iterable, Iterator, Literal

import numpy as np

from coach_jax.data.chat_encoding import TRAIN_ON, TrainOn, encode_example
from coach_jax.data.conversation import Example
from coach_jax.data.errors import DataError, Origin

OVERLONG = ("drop", "truncate", "error")
ON_INVALID = ("error", "skip")
# The config key (coach_jax.config) behind each option, for messages that name it.
CONFIG_KEYS = {"max_seq_len": "data.max_seq_len", "overlong": "data.truncation",
               "train_on": "data.train_on", "on_invalid": "data.on_invalid"}


@dataclasses.dataclass(frozen=True)
class EncodeOptions:
    max_seq_len: int = 2048
    overlong: Literal["drop", "truncate", "error"] = "drop"
    train_on: TrainOn = "all_assistant"
    on_invalid: Literal["error", "skip"] = "error"
    system_fallback: bool = True  # merge system text into the first user turn if rejected
    end_of_turn: str = ""  # data.end_of_turn: closes assistant turns the template leaves open

    def __post_init__(self):
        for name, allowed in (("overlong", OVERLONG), ("train_on", TRAIN_ON),
                              ("on_invalid", ON_INVALID)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{CONFIG_KEYS[name]}={getattr(self, name)!r}; expected "
                                 f"one of {', '.join(allowed)}")
        if self.max_seq_len < 1:
            raise ValueError(f"data.max_seq_len={self.max_seq_len} must be positive")


@dataclasses.dataclass(frozen=True)
class EncodedExample:
    input_ids: np.ndarray  # int32 [L]
    loss_mask: np.ndarray  # int8 [L], aligned with input_ids (the shift comes later)
    origin: Origin | None
    truncated: bool = False


@dataclasses.dataclass
class EncodeReport:
    """Counts of what happened to every record, and a few origins per skip reason."""

    counts: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    examples: dict[str, list[str]] = dataclasses.field(default_factory=dict)
    tokens: int = 0  # of the encoded examples
    supervised_tokens: int = 0  # targets with loss (the first token is never a target)

    def note(self, reason: str, where: Any) -> None:
        self.counts[reason] += 1
        shown = self.examples.setdefault(reason, [])
        if len(shown) < 5:
            shown.append(str(where))

    def record(self, result: "EncodedExample | Skip") -> None:
        if isinstance(result, Skip):
            self.note(result.reason, result.where)
            return
        if result.truncated:
            self.note("truncated", result.origin)
        self.note("encoded", result.origin)
        self.tokens += len(result.input_ids)
        self.supervised_tokens += int(result.loss_mask[1:].sum())

    @property
    def dropped(self) -> int:
        """Records left out for any reason."""
        return sum(v for k, v in self.counts.items() if k not in ("encoded", "truncated"))

    def summary(self) -> str:
        parts = [f"{k}={v}" for k, v in sorted(self.counts.items())]
        lines = ["encoded: " + (", ".join(parts) or "nothing")
                 + f"; {self.tokens} tokens, {self.supervised_tokens} supervised"]
        for reason, where in sorted(self.examples.items()):
            if reason != "encoded":
                lines.append(f"  {reason}: e.g. {'; '.join(where)}")
        return "\n".join(lines)


@dataclasses.dataclass(frozen=True)
class Skip:
    """An example the policies leave out, and why."""

    reason: str
    where: str


def encode_one(item: Example | DataError, tokenizer: Any, options: EncodeOptions
               ) -> EncodedExample | Skip:
    """Encodes one example under the policies; raises what the policies make an error."""
    try:
        if isinstance(item, DataError):
            raise item
        encoded = encode_example(tokenizer, item, options.train_on, options.system_fallback,
                                 options.end_of_turn)
    except DataError as e:
        if e.kind == "chat_template":  # the template, not the record: no policy skips it
            raise
        if e.kind == "nothing_to_learn":
            return Skip("nothing_to_learn", str(e))
        if options.on_invalid == "error":
            raise
        return Skip(f"skipped_{e.kind}", str(e))
    ids, mask = encoded["input_ids"], encoded["loss_mask"]
    truncated = False
    if len(ids) - 1 > options.max_seq_len:
        if options.overlong == "error":
            raise DataError(item.origin, f"{len(ids)} tokens: inputs exceed data.max_seq_len="
                                         f"{options.max_seq_len} (data.truncation='error')",
                            kind="overlong")
        if options.overlong == "drop":
            return Skip("dropped_overlong", str(item.origin))
        ids, mask = ids[:options.max_seq_len + 1], mask[:options.max_seq_len + 1]
        truncated = True
    if not mask[1:].any():  # the first token is never a target
        return Skip("nothing_to_learn" + ("_after_truncation" if truncated else ""),
                    str(item.origin))
    return EncodedExample(ids, mask, item.origin, truncated)


def encode_all(items: Iterable[Example | DataError], tokenizer: Any, options: EncodeOptions,
               report: EncodeReport | None = None) -> Iterator[EncodedExample]:
    """Encodes examples; bad records and skips follow `options` and land in `report`."""
    report = report if report is not None else EncodeReport()
    for item in items:
        result = encode_one(item, tokenizer, options)
        report.record(result)
        if isinstance(result, EncodedExample):
            yield result
