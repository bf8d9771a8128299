"""Dataset lint (every record checked, every problem named by file:line) and inspect (what
the model will be trained on, supervised tokens marked).

A problem of the chat template or tokenizer rather than of a record (an `EncodingError` of
kind "chat_template") is reported once per source, with the count of records it affects.
"""

from __future__ import annotations

import collections
import dataclasses
import math
from typing import Any, Sequence

import numpy as np

from coach_jax.data.chat_encoding import TrainOn, encode_example, template_layout
from coach_jax.data.conversation import Conversation, Document, Example
from coach_jax.data.errors import DataError
from coach_jax.data.formats import role_order_problems
from coach_jax.data.sources import iter_examples

# Role-order problems that no template renders sensibly; the rest are warnings.
_FATAL_ORDER = ("no user turn", "conversation starts with")


@dataclasses.dataclass(frozen=True)
class LintIssue:
    where: str
    kind: str
    message: str
    severity: str  # "error" or "warning"
    records: int | None = None  # set for a template-level problem: the records it affects

    def __str__(self) -> str:
        affected = (f" ({self.records} record{'s' if self.records != 1 else ''} affected)"
                    if self.records is not None else "")
        return f"{self.where}: {self.severity}: [{self.kind}] {self.message}{affected}"

    @property
    def weight(self) -> int:
        """Records the issue counts for: a template problem fails every record it reaches."""
        return 1 if self.records is None else self.records


@dataclasses.dataclass
class LintReport:
    records: int = 0
    issues: list[LintIssue] = dataclasses.field(default_factory=list)
    prompt_tokens: list[int] = dataclasses.field(default_factory=list)
    response_tokens: list[int] = dataclasses.field(default_factory=list)

    @property
    def errors(self) -> int:
        return sum(i.weight for i in self.issues if i.severity == "error")

    def ok(self, max_errors: int = 0) -> bool:
        return self.errors <= max_errors

    def format(self) -> str:
        lines = [str(i) for i in self.issues]
        kinds = collections.Counter()
        for i in self.issues:
            kinds[f"{i.severity}:{i.kind}"] += i.weight
        warnings = sum(i.weight for i in self.issues if i.severity != "error")
        lines.append(f"{self.records} records, {self.errors} errors, {warnings} warnings"
                     + (f" ({', '.join(f'{k}={v}' for k, v in sorted(kinds.items()))})"
                        if kinds else ""))
        for title, lengths in (("prompt tokens", self.prompt_tokens),
                               ("response tokens", self.response_tokens)):
            if lengths:
                lines.append(f"{title}: " + histogram(lengths))
        return "\n".join(lines)


def histogram(values: Sequence[int]) -> str:
    """Counts per power-of-two bucket, plus median and max."""
    buckets = collections.Counter(0 if v <= 0 else 2 ** math.ceil(math.log2(v)) for v in values)
    parts = [f"<={b}: {buckets[b]}" for b in sorted(buckets)]
    return (f"median {int(np.median(values))}, max {max(values)}; " + ", ".join(parts))


def _texts(example: Example) -> list[str]:
    if isinstance(example, Document):
        return [example.text]
    return ([m.content for m in example.messages] + [m.reasoning for m in example.messages
                                                     if m.reasoning] + [repr(example.tools)])


def lint(paths: str | Sequence[str], tokenizer: Any = None, format: str = "auto",
         max_seq_len: int | None = None, train_on: TrainOn = "all_assistant",
         end_of_turn: str = "") -> LintReport:
    """Reads every record and reports problems; with a tokenizer also encodes each one."""
    report = LintReport()
    seen: dict[str, str] = {}
    refusals: collections.Counter[str] = collections.Counter()  # template-level, by problem
    for item in iter_examples(paths, format):
        report.records += 1
        if isinstance(item, DataError):
            report.issues.append(LintIssue(str(item.origin or paths), item.kind,
                                           str(item).split(": ", 1)[-1] if item.origin
                                           else str(item), "error"))
            continue
        where = str(item.origin)
        add = lambda kind, message, severity="error": report.issues.append(
            LintIssue(where, kind, message, severity))
        try:
            for text in _texts(item):
                text.encode("utf-8")
        except UnicodeEncodeError as e:
            add("undecodable", f"text holds an unpaired surrogate at position {e.start}")
            continue
        if isinstance(item, Conversation):
            for problem in role_order_problems(item):
                add("role_order", problem,
                    "error" if problem.startswith(_FATAL_ORDER) else "warning")
        key = item.text_for_dedup()
        if key in seen:
            add("duplicate", f"exact duplicate (after whitespace normalisation) of {seen[key]}",
                "warning")
        else:
            seen[key] = where
        if tokenizer is None:
            continue
        try:
            encoded = encode_example(tokenizer, item, train_on, end_of_turn=end_of_turn)
        except DataError as e:
            if e.kind == "chat_template":
                refusals[e.problem] += 1
            else:
                add(e.kind, e.problem)
            continue
        mask = encoded["loss_mask"]
        report.prompt_tokens.append(int((mask == 0).sum()))
        report.response_tokens.append(int(mask.sum()))
        if max_seq_len is not None and len(mask) - 1 > max_seq_len:
            add("overlong", f"{len(mask)} tokens, over data.max_seq_len={max_seq_len}",
                "warning")
        if not mask[1:].any():
            add("nothing_to_learn", "no supervised token")
    source = paths if isinstance(paths, str) else ", ".join(paths)
    report.issues[:0] = [LintIssue(source, "chat_template", problem, "error", count)
                         for problem, count in refusals.items()]
    return report


def inspect(paths: str | Sequence[str], tokenizer: Any, n: int = 3, format: str = "auto",
            train_on: TrainOn = "all_assistant", color: bool = False,
            end_of_turn: str = "") -> str:
    """The first `n` examples as the model sees them; supervised text in [[...]] (or green)."""
    open_mark, close_mark = ("\033[32m", "\033[0m") if color else ("[[", "]]")
    blocks, refused = [], set()
    for item in iter_examples(paths, format):
        if len(blocks) == n:
            break
        if isinstance(item, DataError):
            blocks.append(f"--- {item}")
            continue
        try:
            encoded = encode_example(tokenizer, item, train_on, end_of_turn=end_of_turn)
        except DataError as e:
            template_level = e.kind == "chat_template"
            blocks.append(f"--- {item.origin}: not encoded (the chat template's refusal, above)"
                          if template_level and e.problem in refused else f"--- {e}")
            if template_level:
                refused.add(e.problem)
            continue
        ids, mask = encoded["input_ids"], encoded["loss_mask"]
        pieces = []
        run_start = 0
        for i in range(1, len(ids) + 1):
            if i == len(ids) or mask[i] != mask[run_start]:
                text = tokenizer.decode(ids[run_start:i].tolist())
                pieces.append(f"{open_mark}{text}{close_mark}" if mask[run_start] else text)
                run_start = i
        blocks.append(f"--- {item.origin}: {len(ids)} tokens, {int(mask.sum())} supervised\n"
                      + "".join(pieces))
    return "\n".join(blocks)


def template_report(tokenizer: Any, end_of_turn: str = "") -> str:
    """The chat template's layout as the encoder found it, or why it is refused."""
    if not tokenizer.chat_template:
        return "chat template: none (plain text sources only)"
    try:
        layout = template_layout(tokenizer, end_of_turn)
    except DataError as e:
        return f"chat template: refused: {e}"
    return "chat template layout:\n" + "\n".join(f"  {line}"
                                                  for line in layout.describe().splitlines())
