"""Reading records from JSONL, JSON arrays, Parquet and saved HF datasets.

Every record keeps its origin. Readers yield problems (malformed JSON, undecodable bytes)
as `RawRecord`s with an error instead of raising, so the linter can report them all; strict
callers raise the first one.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
from typing import Any, Iterator, Sequence

from coach_jax.data.errors import DataError, Origin


@dataclasses.dataclass(frozen=True)
class RawRecord:
    origin: Origin
    data: Any = None
    error: DataError | None = None


def expand_paths(paths: str | Sequence[str]) -> list[str]:
    """Files named by paths or glob patterns, in sorted order within each pattern."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    files: list[str] = []
    for pattern in map(os.fspath, paths):
        if pattern.startswith(HUB_PREFIX):
            files.append(pattern)
            continue
        if os.path.isdir(pattern) and not _is_hf_dataset(pattern):
            raise DataError(None, f"{pattern} is a folder; name files or a glob such as "
                                  f"{os.path.join(pattern, '*.jsonl')}")
        matches = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
        if not matches or not all(os.path.exists(m) for m in matches):
            raise FileNotFoundError(f"{pattern}: no such file")
        files.extend(matches)
    return files


HUB_PREFIX = "hf://"  # hf://owner/name[:split] reads a dataset from the Hugging Face hub


def _is_hf_dataset(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "dataset_info.json")) or os.path.isfile(
        os.path.join(path, "dataset_dict.json"))


def read_records(paths: str | Sequence[str]) -> Iterator[RawRecord]:
    """All records of all files, in order. Format by file ending (or HF dataset folder)."""
    for path in expand_paths(paths):
        if path.startswith(HUB_PREFIX):
            yield from _read_hub_dataset(path)
        elif os.path.isdir(path):
            yield from _read_hf_dataset(path)
        elif path.endswith((".jsonl", ".ndjson")):
            yield from _read_jsonl(path)
        elif path.endswith(".json"):
            yield from _read_json_array(path)
        elif path.endswith(".parquet"):
            yield from _read_parquet(path)
        else:
            raise DataError(Origin(path), "unknown file type (expected .jsonl, .json, .parquet "
                                          "or a saved Hugging Face dataset folder)")


def parse_json_line(raw: bytes, origin: Origin) -> RawRecord:
    """One JSONL line as a record, or as the error that describes it."""
    try:
        return RawRecord(origin, json.loads(raw.decode("utf-8")))
    except UnicodeDecodeError as e:
        return RawRecord(origin, error=DataError(
            origin, f"undecodable text: not UTF-8 at byte {e.start} of the line",
            kind="undecodable"))
    except json.JSONDecodeError as e:
        return RawRecord(origin, error=DataError(origin, json_problem(e), kind="malformed"))


def json_problem(e: json.JSONDecodeError, with_line: bool = False) -> str:
    """`malformed JSON: <msg> at [line L] column C`, with one "at" where json's message
    already ends in one ("Unterminated string starting at")."""
    where = f"line {e.lineno} column {e.colno}" if with_line else f"column {e.colno}"
    return f"malformed JSON: {e.msg.removesuffix(' at')} at {where}"


def _read_jsonl(path: str) -> Iterator[RawRecord]:
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            if raw.strip():
                yield parse_json_line(raw, Origin(path, line=number))


def _read_json_array(path: str) -> Iterator[RawRecord]:
    """Elements of a top-level JSON array, each named by its 0-based index (`file[#i]`);
    a malformed element ends the file with an error naming its index, line and column."""
    with open(path, "rb") as f:
        data = f.read()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        yield RawRecord(Origin(path), error=DataError(
            Origin(path), f"undecodable text: not UTF-8 at byte {e.start} (line {line})",
            kind="undecodable"))
        return
    decoder = json.JSONDecoder()
    pos = _skip_ws(text, 0)
    if not text.startswith("[", pos):
        yield RawRecord(Origin(path), error=DataError(
            Origin(path), "malformed JSON: expected a top-level array of records (use .jsonl "
                          "for one record per line)", kind="malformed"))
        return
    pos, index = _skip_ws(text, pos + 1), 0
    while pos < len(text) and text[pos] != "]":
        origin = Origin(path, index=index)
        try:
            value, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            yield RawRecord(origin, error=DataError(origin, json_problem(e, with_line=True),
                                                    kind="malformed"))
            return
        yield RawRecord(origin, value)
        index += 1
        pos = _skip_ws(text, pos)
        if pos < len(text) and text[pos] == ",":
            pos = _skip_ws(text, pos + 1)
    if pos >= len(text):
        yield RawRecord(Origin(path), error=DataError(
            Origin(path), f"malformed JSON: unterminated array (no ']' after {index} "
                          "records)", kind="malformed"))


def _skip_ws(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in " \t\r\n":
        pos += 1
    return pos


def _read_parquet(path: str) -> Iterator[RawRecord]:
    try:
        import pyarrow.parquet as pq
    except ImportError as e:
        raise ImportError(f"{path}: reading Parquet needs pyarrow: pip install "
                          "'coach_jax[parquet]'") from e
    row = 0
    for batch in pq.ParquetFile(path).iter_batches():
        for record in batch.to_pylist():
            row += 1
            yield RawRecord(Origin(path, row=row), record)


def _read_hf_dataset(path: str) -> Iterator[RawRecord]:
    try:
        import datasets
    except ImportError as e:
        raise ImportError(f"{path}: reading a saved Hugging Face dataset needs datasets: "
                          "pip install 'coach_jax[hf-datasets]'") from e
    dataset = datasets.load_from_disk(path)
    if isinstance(dataset, datasets.DatasetDict):
        if "train" not in dataset:
            raise DataError(Origin(path), f"dataset has splits {list(dataset)}; name one folder "
                                          "of a split or save a 'train' split")
        dataset = dataset["train"]
    for row, record in enumerate(dataset, start=1):
        yield RawRecord(Origin(path, row=row), record)


def _read_hub_dataset(spec: str) -> Iterator[RawRecord]:
    """hf://owner/name[:split] (default split: train), where the network allows."""
    try:
        import datasets
    except ImportError as e:
        raise ImportError(f"{spec}: reading a hub dataset needs datasets: pip install "
                          "'coach_jax[hf-datasets]'") from e
    name, _, split = spec.removeprefix(HUB_PREFIX).partition(":")
    try:
        dataset = datasets.load_dataset(name, split=split or "train")
    except Exception as e:  # offline, unknown name, gated...
        raise DataError(Origin(spec), f"cannot load from the hub ({type(e).__name__}: {e}); "
                                      "download it elsewhere and save_to_disk") from e
    for row, record in enumerate(dataset, start=1):
        yield RawRecord(Origin(spec, row=row), record)
