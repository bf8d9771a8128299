"""Where a record came from, and the error that names it."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Origin:
    """A record's file and where in it: a JSONL line (1-based, `file:7`), a Parquet or HF
    dataset row (1-based, `file row 7`), or the element of a top-level JSON array (0-based,
    `file.json[#6]`: a pretty-printed or minified array has no useful line per record)."""

    file: str
    line: int | None = None
    row: int | None = None
    index: int | None = None

    def __str__(self) -> str:
        if self.line is not None:
            return f"{self.file}:{self.line}"
        if self.row is not None:
            return f"{self.file} row {self.row}"
        if self.index is not None:
            return f"{self.file}[#{self.index}]"
        return self.file


class DataError(ValueError):
    """Bad input, reported as `file:line: field: problem`."""

    def __init__(self, origin: Origin | None, problem: str, field: str | None = None,
                 kind: str = "invalid"):
        self.origin, self.problem, self.field, self.kind = origin, problem, field, kind
        where = f"{origin}: " if origin else ""
        what = f"{field}: " if field else ""
        super().__init__(f"{where}{what}{problem}")
