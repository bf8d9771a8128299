"""Random access to raw records: a Grain data source over JSONL, JSON, Parquet and saved HF
datasets.

JSONL files are indexed by byte offset once, so any record can be read (shuffled, or by a
worker process) without holding the file in memory; JSON arrays, Parquet files and HF datasets
are parsed one file at a time. Each item is a `RawRecord`, malformed JSON included, exactly as
the sequential readers give it, origin too (`file:line` in JSONL, `file.json[#i]` with a
0-based index in JSON arrays).
"""

from __future__ import annotations

import os
from typing import Any, Sequence

import numpy as np

from coach_jax.data.readers import (HUB_PREFIX, RawRecord, _read_json_array, expand_paths,
                                    parse_json_line, read_records)
from coach_jax.data.errors import Origin


def _jsonl_index(path: str) -> np.ndarray:
    """[n, 3] int64 (byte offset, byte length, line number) of the non-blank lines."""
    rows = []
    offset = 0
    with open(path, "rb") as f:
        for number, line in enumerate(f, start=1):
            if line.strip():
                rows.append((offset, len(line), number))
            offset += len(line)
    return np.asarray(rows, np.int64).reshape(-1, 3)


class RecordSource:
    """`len()` and `[i]` over every record of the given files, in reading order."""

    def __init__(self, paths: str | Sequence[str]):
        self._files = expand_paths(paths)
        self._parsed: dict[int, list[RawRecord]] = {}
        parts = []  # per file: (kind, index rows or records)
        for file_index, path in enumerate(self._files):
            if path.endswith((".jsonl", ".ndjson")) and not os.path.isdir(path):
                index = _jsonl_index(path)
                parts.append(np.column_stack([np.full(len(index), file_index), index]))
            else:  # JSON arrays, Parquet, HF datasets: small enough to keep parsed per file
                parts.append(np.asarray([[file_index, -1, i, 0] for i, _ in
                                         enumerate(self._records(file_index))],
                                        np.int64).reshape(-1, 4))
        self._index = np.concatenate(parts) if parts else np.zeros((0, 4), np.int64)

    def _records(self, file_index: int) -> list[RawRecord]:
        if file_index not in self._parsed:
            path = self._files[file_index]
            reader = (_read_json_array(path) if path.endswith(".json") and
                      not path.startswith(HUB_PREFIX) else read_records(path))
            self._parsed = {file_index: list(reader)}  # one parsed file at a time
        return self._parsed[file_index]

    def __len__(self) -> int:
        return len(self._index)

    def __getitem__(self, i: int) -> RawRecord:
        file_index, offset, length_or_position, line = (int(x) for x in self._index[i])
        path = self._files[file_index]
        if offset < 0:
            return self._records(file_index)[length_or_position]
        with open(path, "rb") as f:
            f.seek(offset)
            return parse_json_line(f.read(length_or_position), Origin(path, line=line))

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_parsed": {}}

    def __repr__(self) -> str:
        return f"RecordSource({self._files!r}, records={len(self)})"
