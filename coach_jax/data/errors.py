"""Where a record came from, and the error that names it."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Origin:
    """A record's file and its line (JSON/JSONL) or row (Parquet, HF datasets), 1-based."""

    file: str
    line: int | None = None
    row: int | None = None

    def __str__(self) -> str:
        if self.line is not None:
            return f"{self.file}:{self.line}"
        if self.row is not None:
            return f"{self.file} row {self.row}"
        return self.file


class DataError(ValueError):
    """Bad input, reported as `file:line: field: problem`."""

    def __init__(self, origin: Origin | None, problem: str, field: str | None = None,
                 kind: str = "invalid"):
        self.origin, self.problem, self.field, self.kind = origin, problem, field, kind
        where = f"{origin}: " if origin else ""
        what = f"{field}: " if field else ""
        super().__init__(f"{where}{what}{problem}")
