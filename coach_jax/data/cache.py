"""Encoded-example cache: each source is encoded once per (data, tokenizer, template, policy).

A cache entry is a folder named by the fingerprint of everything that decides the encoding:
the files (path, size, modification time), the format, the tokenizer (its full
tokenizer.json), the chat template, the encoding options, and the eval split part when
data.eval_split carves one (`splits.EvalSplit`: the part's records only, so a split source
never shares the unsplit one's entry). It holds the examples as
ArrayRecord (random access, so shuffling reads single records), their lengths, and the
encoding report. Entries are written to a temporary folder and renamed into place, so a
crash never leaves a half-written entry and concurrent builders (hosts sharing a disk)
cannot corrupt one another.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import shutil
import tempfile
from typing import Any, Sequence

import grain
import numpy as np
from absl import logging

from coach_jax.data.encoded import EncodedExample, EncodeOptions, EncodeReport, Skip, encode_one
from coach_jax.data.errors import DataError, Origin
from coach_jax.data.formats import detect_format, normalize
from coach_jax.data.readers import RawRecord, expand_paths, read_records
from coach_jax.data.record_source import RecordSource
from coach_jax.data.splits import EvalSplit, overlap

CACHE_VERSION = 2  # 2: masks from the probed template layout (step 11)
_EXAMPLES = "examples.array_record"
_META = "meta.json"
_LENGTHS = "lengths.npy"


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """Changes whenever tokenization or the chat template would."""
    digest = hashlib.sha256()
    digest.update(type(tokenizer).__name__.encode())
    digest.update(tokenizer.backend_tokenizer.to_str().encode())
    digest.update(json.dumps(tokenizer.special_tokens_map, sort_keys=True, default=str).encode())
    digest.update(repr(tokenizer.chat_template).encode())
    return digest.hexdigest()


def source_fingerprint(paths: str | Sequence[str], format: str, tokenizer: Any,
                       options: EncodeOptions, split: EvalSplit | None = None) -> str:
    """Names the cache entry; an unsplit source keeps the key it had before eval splits."""
    files = []
    for path in expand_paths(paths):
        if os.path.exists(path):
            stat = os.stat(path)
            files.append((os.path.abspath(path), stat.st_size, stat.st_mtime_ns))
        else:
            files.append((path, 0, 0))  # hub datasets: by name
    key = {"version": CACHE_VERSION, "files": files, "format": format,
           "tokenizer": tokenizer_fingerprint(tokenizer), "options": dataclasses.asdict(options)}
    if split is not None:
        key["split"] = dataclasses.asdict(split)
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]


def serialize(example: EncodedExample) -> bytes:
    n = len(example.input_ids)
    return (n.to_bytes(4, "little") + example.input_ids.astype("<i4").tobytes()
            + example.loss_mask.astype(np.int8).tobytes() + str(example.origin).encode())


def deserialize(raw: bytes) -> tuple[np.ndarray, np.ndarray]:
    """(input_ids int32 [L], loss_mask int8 [L]) of a cached example."""
    n = int.from_bytes(raw[:4], "little")
    return (np.frombuffer(raw, "<i4", n, 4).astype(np.int32),
            np.frombuffer(raw, np.int8, n, 4 + 4 * n))


def example_origin(raw: bytes) -> str:
    n = int.from_bytes(raw[:4], "little")
    return raw[4 + 5 * n:].decode()


@dataclasses.dataclass(frozen=True)
class EncodedSource:
    """A cache entry: the encoded examples of one source and how they came to be."""

    name: str
    directory: str
    fingerprint: str
    lengths: np.ndarray  # tokens per example
    report: EncodeReport
    from_cache: bool
    split: EvalSplit | None = None
    # With a split: {"count": held-out examples duplicating a train one, "examples": a few
    # (train origin, eval origin) pairs}.
    eval_split_overlap: dict[str, Any] | None = None

    @property
    def num_examples(self) -> int:
        return len(self.lengths)

    def data_source(self) -> grain.sources.ArrayRecordDataSource:
        return grain.sources.ArrayRecordDataSource(os.path.join(self.directory, _EXAMPLES))


def _encode_raw(raw: RawRecord, format: str, tokenizer: Any, options: EncodeOptions
                ) -> EncodedExample | Skip | DataError:
    """Worker-side: never raises, so errors reach the main process intact and in order."""
    try:
        item = raw.error if raw.error is not None else normalize(raw.data, format, raw.origin)
    except DataError as e:
        item = e  # the policy in encode_one decides: skip, count, or raise
    try:
        return encode_one(item, tokenizer, options)
    except DataError as e:
        return e


def _detect(records: RecordSource, paths: Any) -> str:
    for i in range(len(records)):
        raw = records[i]
        if raw.error is None:
            return detect_format(raw.data, raw.origin)
    raise DataError(Origin(_describe(paths)), "no readable record to detect the format from")


@dataclasses.dataclass(frozen=True)
class _Selected:
    """The records at `indices` (one part of an eval split), as a random-access source."""

    records: RecordSource
    indices: tuple[int, ...]

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> RawRecord:
        return self.records[self.indices[i]]


def _part(records: RecordSource, split: EvalSplit | None, paths: Any
          ) -> RecordSource | _Selected:
    """The records the split's part reads; a count too large for the source names both."""
    if split is None:
        return records
    try:
        return _Selected(records, tuple(split.indices(len(records))))
    except ValueError as e:
        raise DataError(Origin(_describe(paths)), str(e), kind="eval_split") from None


def _describe(paths: Any) -> str:
    return ", ".join(expand_paths(paths))


OVERLAP_EXAMPLES = 3


def split_overlap(paths: Any, format: str, split: EvalSplit, n: int) -> dict[str, Any]:
    """Held-out records that duplicate a train record (after whitespace normalisation):
    their count and a few (train origin, eval origin) pairs. Unreadable records are left to
    the encoding policies."""
    held_out = set(dataclasses.replace(split, part="eval").indices(n))
    parts: dict[bool, list] = {True: [], False: []}
    for i, raw in enumerate(read_records(paths)):
        if raw.error is None:
            try:
                parts[i in held_out].append(normalize(raw.data, format, raw.origin,
                                                      require_answer=False))
            except DataError:
                pass
    pairs = overlap(parts[False], parts[True])
    return {"count": len(pairs), "examples": [list(p) for p in pairs[:OVERLAP_EXAMPLES]]}


def _load(name: str, directory: str, fingerprint: str) -> EncodedSource:
    with open(os.path.join(directory, _META)) as f:
        meta = json.load(f)
    report = EncodeReport()
    report.counts.update(meta["counts"])
    report.examples.update(meta["examples"])
    report.tokens, report.supervised_tokens = meta["tokens"], meta["supervised_tokens"]
    split = EvalSplit(**meta["split"]) if meta.get("split") else None
    return EncodedSource(name, directory, fingerprint,
                         np.load(os.path.join(directory, _LENGTHS)), report, from_cache=True,
                         split=split, eval_split_overlap=meta.get("eval_split_overlap"))


def encode_source(paths: str | Sequence[str], tokenizer: Any, options: EncodeOptions,
                  cache_dir: str, format: str = "auto", name: str = "",
                  workers: int = 0, split: EvalSplit | None = None) -> EncodedSource:
    """The cached encoding of a source (of its `split` part when given), built (with
    `workers` processes) if missing."""
    from array_record.python.array_record_module import ArrayRecordWriter
    fingerprint = source_fingerprint(paths, format, tokenizer, options, split)
    directory = os.path.join(cache_dir, fingerprint)
    if os.path.isfile(os.path.join(directory, _META)):
        logging.info("source %r: encoded examples from cache %s", name, directory)
        return _load(name, directory, fingerprint)
    records = RecordSource(paths)
    chosen = _detect(records, paths) if format == "auto" else format
    selected = _part(records, split, paths)
    os.makedirs(cache_dir, exist_ok=True)
    building = tempfile.mkdtemp(prefix=f".{fingerprint}-", dir=cache_dir)
    try:
        dataset = grain.MapDataset.source(selected).map(
            functools.partial(_encode_raw, format=chosen, tokenizer=tokenizer, options=options))
        stream = dataset.to_iter_dataset()
        if workers > 0:
            stream = stream.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers))
        report = EncodeReport()
        lengths = []
        writer = ArrayRecordWriter(os.path.join(building, _EXAMPLES), "group_size:1")
        for result in stream:
            if isinstance(result, DataError):
                raise result
            report.record(result)
            if isinstance(result, EncodedExample):
                writer.write(serialize(result))
                lengths.append(len(result.input_ids))
        writer.close()
        if not lengths:
            raise DataError(Origin(_describe(paths)), "nothing to train on: every record "
                            f"was left out ({report.summary()})", kind="empty_source")
        np.save(os.path.join(building, _LENGTHS), np.asarray(lengths, np.int32))
        meta = {"name": name, "paths": expand_paths(paths), "format": chosen,
                "counts": dict(report.counts), "examples": report.examples,
                "tokens": report.tokens, "supervised_tokens": report.supervised_tokens}
        if split is not None:
            meta["split"] = dataclasses.asdict(split)
            meta["eval_split_overlap"] = split_overlap(paths, chosen, split, len(records))
        with open(os.path.join(building, _META), "w") as f:
            json.dump(meta, f, indent=2)
        try:
            os.rename(building, directory)
        except OSError:  # another process finished the same entry first
            if not os.path.isfile(os.path.join(directory, _META)):
                raise
    finally:
        shutil.rmtree(building, ignore_errors=True)
    logging.info("source %r: encoded %s", name, report.summary())
    return dataclasses.replace(_load(name, directory, fingerprint), from_cache=False)
