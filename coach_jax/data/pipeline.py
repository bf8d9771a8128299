"""The Grain pipeline that feeds the trainer: encoded sources -> shuffle -> repeat ->
host shard -> shift -> pack -> batch.

Every batch is a dict of int32 [B, T] arrays: `inputs`, `targets`, `loss_mask`,
`segment_ids` (0 = padding), `positions` (restart at 0 per example) and `source_ids`
(which source each token came from). The shift happens per example before packing, so the
last token of one example never predicts the first of the next, and an example is never
split across rows. The iterator's state (packer included) is a small dict: saving it and
restoring it in a fresh process continues with exactly the next batch, without re-reading
what came before.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Iterator, Sequence

import grain
import grain.experimental as grain_experimental
import numpy as np
from absl import logging

from coach_jax.data.cache import EncodedSource, deserialize, encode_source
from coach_jax.data.encoded import EncodeOptions, EncodeReport
from coach_jax.data.splits import EvalSplit, check_eval_split

PACKING = ("first_fit", "best_fit", "none")
BATCH_KEYS = ("inputs", "targets", "loss_mask", "segment_ids", "positions", "source_ids")
_PACKERS = {"first_fit": grain_experimental.FirstFitPackIterDataset,
            "best_fit": grain_experimental.BestFitPackIterDataset}


class PipelineError(ValueError):
    """A data configuration that cannot give the run it asks for."""


@dataclasses.dataclass(frozen=True)
class SourceConfig:
    """A data source; with `split` set, only its train part or its held-out part."""

    name: str
    paths: str | tuple[str, ...]
    format: str = "auto"
    weight: float = 1.0
    split: EvalSplit | None = None


def with_eval_split(sources: Sequence[SourceConfig], value: float, seed: int
                    ) -> tuple[tuple[SourceConfig, ...], tuple[SourceConfig, ...]]:
    """(train sources, eval sources) for data.eval_split=`value`: each source's records
    minus a held-out `value` (a fraction < 1 or a whole count >= 1, chosen by `seed`), and
    the held-out ones under the same name (per-source eval metrics line up with the train
    ones). 0 keeps the sources whole and gives no eval sources. A bad value raises
    PipelineError here; a count the source cannot spare raises a DataError naming the file
    when the pipeline is built."""
    if value == 0:
        return tuple(sources), ()
    try:
        check_eval_split(value)
    except ValueError as e:
        raise PipelineError(str(e)) from None
    if any(s.split is not None for s in sources):
        raise PipelineError("data.eval_split: a source is already split")
    part = lambda s, name: dataclasses.replace(s, split=EvalSplit(float(value), seed, name))
    return (tuple(part(s, "train") for s in sources),
            tuple(part(s, "eval") for s in sources))


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
    """What decides the batches. `batch_size` is rows per process.

    Length: with `steps` set the data repeats as needed (required for mixtures); otherwise
    `epochs` full passes, the last batch padded with empty rows.
    """

    sources: tuple[SourceConfig, ...]
    max_seq_len: int
    batch_size: int
    cache_dir: str
    seed: int = 0
    packing: str = "first_fit"
    num_packing_bins: int = 64
    epochs: int = 1
    steps: int | None = None
    workers: int = 0
    process_index: int = 0
    process_count: int = 1
    encode: EncodeOptions = EncodeOptions()
    max_drop_fraction: float = 0.05

    def __post_init__(self):
        if not self.sources:
            raise PipelineError("no data sources configured")
        if self.packing not in PACKING:
            raise PipelineError(f"data.packing={self.packing!r}; expected one of "
                                f"{', '.join(PACKING)}")
        if len(self.sources) > 1 and self.steps is None:
            raise PipelineError("a mixture of several sources has no natural epoch: set "
                                "train.steps")
        if any(s.weight <= 0 for s in self.sources):
            raise PipelineError("source weights must be positive")
        if len({s.name for s in self.sources}) != len(self.sources):
            raise PipelineError("source names must be unique")
        if not 0 <= self.process_index < self.process_count:
            raise PipelineError(f"process {self.process_index} is not one of the "
                                f"{self.process_count} processes")
        if self.encode.max_seq_len != self.max_seq_len:
            object.__setattr__(self, "encode",
                               dataclasses.replace(self.encode, max_seq_len=self.max_seq_len))


def _shift(raw: bytes, source_id: int) -> dict[str, np.ndarray]:
    """One example as (input, target) pairs: targets are the inputs moved by one."""
    ids, mask = deserialize(raw)
    n = len(ids) - 1
    return {"inputs": ids[:-1], "targets": ids[1:], "loss_mask": mask[1:].astype(np.int32),
            "source_ids": np.full(n, source_id, np.int32)}


def _zeros_example(length: int, source_id: int) -> dict[str, np.ndarray]:
    """Stands in for an example of `length` tokens when only the batch count matters."""
    n = int(length) - 1
    zeros = np.zeros(n, np.int32)
    return {"inputs": zeros, "targets": zeros, "loss_mask": zeros,
            "source_ids": np.full(n, source_id, np.int32)}


def _pad_row(example: dict[str, np.ndarray], length: int) -> dict[str, np.ndarray]:
    """Packing off: one example per row, padded."""
    n = len(example["inputs"])
    pad = lambda x: np.pad(x, (0, length - n))
    row = {k: pad(v) for k, v in example.items()}
    row["segment_ids"] = pad(np.ones(n, np.int32))
    row["positions"] = pad(np.arange(n, dtype=np.int32))
    return row


def _from_packer(row: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {"inputs": row["inputs"], "targets": row["targets"], "loss_mask": row["loss_mask"],
            "segment_ids": row["inputs_segment_ids"], "positions": row["inputs_positions"],
            "source_ids": row["source_ids"]}


def _stack(rows: Sequence[dict[str, np.ndarray]], batch_size: int) -> dict[str, np.ndarray]:
    """Stacks rows into a batch, padding a short final batch with empty rows."""
    batch = {k: np.stack([r[k] for r in rows]).astype(np.int32) for k in BATCH_KEYS}
    missing = batch_size - len(rows)
    if missing:
        batch = {k: np.pad(v, ((0, missing), (0, 0))) for k, v in batch.items()}
    return batch


def _drop_hint(report: EncodeReport, max_seq_len: int) -> str:
    """What to change, by config key, for the reasons records were left out."""
    hints = []
    if report.counts["dropped_overlong"]:
        hints.append(f"raise data.max_seq_len (now {max_seq_len}) or set "
                     "data.truncation='truncate'")
    if any(k.startswith("skipped_") for k in report.counts if report.counts[k]):
        hints.append("fix the records (--mode=lint names each one)")
    if any(k.startswith("nothing_to_learn") for k in report.counts if report.counts[k]):
        hints.append("give every record an assistant turn to learn")
    hints.append("or raise data.max_drop_fraction")
    return "To fix: " + "; ".join(hints) + "."


class Pipeline:
    """Batches for one process, with checkpointable iterators and the data's statistics."""

    def __init__(self, config: PipelineConfig, tokenizer: Any):
        self.config = config
        self.sources: list[EncodedSource] = [
            encode_source(s.paths, tokenizer, config.encode, config.cache_dir, s.format, s.name,
                          workers=config.workers, split=s.split)
            for s in config.sources]
        self._check_drops()
        self._warn_overlap()
        self.dataset = self._build()

    def count_batches(self) -> int:
        """Batches this process gets over the whole run, without reading the data: the same
        shuffle and packing run over the cached example lengths only."""
        if self.config.steps is not None:
            return self.config.steps
        return sum(1 for _ in self._build(lengths_only=True))

    def _check_drops(self) -> None:
        for source in self.sources:
            report = source.report
            total = report.counts["encoded"] + report.dropped
            if report.dropped > self.config.max_drop_fraction * total:
                raise PipelineError(
                    f"source {source.name!r}: {report.dropped} of {total} records left out "
                    f"({report.dropped / total:.1%} > data.max_drop_fraction="
                    f"{self.config.max_drop_fraction:g}):\n{report.summary()}\n"
                    + _drop_hint(report, self.config.max_seq_len))

    def _warn_overlap(self) -> None:
        """Eval loss on examples also trained on looks better than it is: say so."""
        for source in self.sources:
            found = source.eval_split_overlap
            if found and found["count"]:
                pairs = "; ".join(f"{a} = {b}" for a, b in found["examples"])
                logging.warning(
                    "source %r (%s part of data.eval_split): %d held-out examples are exact "
                    "duplicates of training ones (e.g. %s); eval loss on them looks better "
                    "than it is. Deduplicate the source (--mode=lint lists duplicates).",
                    source.name, source.split.part, found["count"], pairs)

    def _build(self, lengths_only: bool = False) -> grain.IterDataset:
        config = self.config
        repeats = None if config.steps is not None else config.epochs
        per_source = []
        for source_id, source in enumerate(self.sources):
            records = source.lengths if lengths_only else source.data_source()
            example = _zeros_example if lengths_only else _shift
            dataset = (grain.MapDataset.source(records)
                       .seed(config.seed + 7919 * source_id)
                       .shuffle()
                       .repeat(repeats)  # a new shuffle every epoch
                       .map(functools.partial(example, source_id=source_id)))
            per_source.append(dataset)
        if len(per_source) == 1:
            mixed = per_source[0]
        else:
            weights = [s.weight for s in config.sources]
            mixed = grain.MapDataset.mix(per_source, [w / sum(weights) for w in weights])
        shard = mixed[config.process_index::config.process_count]
        stream = shard.to_iter_dataset()
        if config.workers > 0 and not lengths_only:
            # Workers read and decode; their outputs interleave back into the original
            # order, so packing (here, in this process) and the batch count do not depend
            # on the number of workers.
            stream = stream.mp_prefetch(grain.MultiprocessingOptions(
                num_workers=config.workers))
        length = config.max_seq_len
        if config.packing == "none":
            rows = stream.map(functools.partial(_pad_row, length=length))
        else:
            rows = _PACKERS[config.packing](
                stream, length_struct={k: length for k in
                                       ("inputs", "targets", "loss_mask", "source_ids")},
                num_packing_bins=config.num_packing_bins, seed=config.seed,
                meta_features=("targets", "loss_mask", "source_ids")).map(_from_packer)
        batches = rows.batch(config.batch_size, drop_remainder=False,
                             batch_fn=functools.partial(_stack, batch_size=config.batch_size))
        return batches

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        """A fresh iterator; `it.get_state()` / `it.set_state(state)` save and restore it."""
        iterator = iter(self.dataset)
        if self.config.steps is not None:
            return _Limited(iterator, self.config.steps)
        return iterator

    def stats(self) -> dict[str, Any]:
        """Per source: examples, tokens and supervised tokens per epoch, and what was left out;
        with data.eval_split, the part read and `eval_split_overlap` (held-out examples that
        duplicate train ones: their count and a few (train, eval) origin pairs)."""
        return {s.name: _source_stats(s) for s in self.sources}


def _source_stats(source: EncodedSource) -> dict[str, Any]:
    report = source.report
    stats = {"examples": source.num_examples, "tokens_per_epoch": report.tokens,
             "supervised_fraction": report.supervised_tokens /
             max(1, report.tokens - source.num_examples),
             "left_out": {k: v for k, v in report.counts.items() if k not in ("encoded",)},
             "from_cache": source.from_cache}
    if source.split is not None:
        stats["eval_split"] = {"part": source.split.part, "value": source.split.value,
                               "seed": source.split.seed}
        stats["eval_split_overlap"] = source.eval_split_overlap
    return stats


class _Limited:
    """Stops after `steps` batches; state is the wrapped iterator's plus the count."""

    def __init__(self, iterator: Any, steps: int):
        self._iterator, self._steps, self._done = iterator, steps, 0

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        if self._done >= self._steps:
            raise StopIteration
        self._done += 1
        return next(self._iterator)

    def get_state(self) -> dict[str, Any]:
        return {"batches": self._done, "iterator": self._iterator.get_state()}

    def set_state(self, state: dict[str, Any]) -> None:
        self._done = state["batches"]
        self._iterator.set_state(state["iterator"])


def packing_efficiency(batch: dict[str, np.ndarray]) -> float:
    """Share of positions holding a real token (not padding)."""
    return float((batch["segment_ids"] > 0).mean())
