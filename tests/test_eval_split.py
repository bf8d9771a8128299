"""data.eval_split: a seeded held-out part carved from each training source, its own cache
entry, and the train/eval overlap report."""

import collections
import json
import logging
import os
import re

import numpy as np
import pytest

import tokenizer_fixtures
from coach_jax import data
from coach_jax.data.pipeline import (Pipeline, PipelineConfig, PipelineError, SourceConfig,
                                     with_eval_split)
from coach_jax.data.splits import EvalSplit


@pytest.fixture(scope="module")
def tokenizer(realworld):
    return tokenizer_fixtures.bpe_tokenizer(os.path.join(realworld, "templates",
                                                         "qwen2.5.jinja"))


def chat(i, answer="yes it is"):
    return {"messages": [{"role": "user", "content": f"question {i}: is it so"},
                         {"role": "assistant", "content": answer}]}


def write(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def pipeline(tmp_path, sources, tokenizer, cache="cache"):
    """One unpacked epoch: every example once, one per row."""
    return Pipeline(PipelineConfig(sources=tuple(sources), max_seq_len=128, batch_size=4,
                                   cache_dir=str(tmp_path / cache), packing="none"), tokenizer)


def questions(built, tokenizer):
    """How often each record (by its question number) is in the pipeline's epoch."""
    found = collections.Counter()
    for batch in built:
        for row in range(batch["inputs"].shape[0]):
            if batch["segment_ids"][row].any():
                text = tokenizer.decode(batch["inputs"][row][batch["segment_ids"][row] > 0])
                found[int(re.search(r"question (\d+):", text).group(1))] += 1
    return found


def test_train_and_eval_parts_are_the_source_split_in_two(tmp_path, tokenizer):
    path = write(tmp_path / "a.jsonl", [chat(i) for i in range(40)])
    whole = questions(pipeline(tmp_path, [SourceConfig("a", path)], tokenizer), tokenizer)
    train_sources, eval_sources = with_eval_split([SourceConfig("a", path)], 0.25, seed=3)
    assert [s.name for s in eval_sources] == ["a"]
    train = questions(pipeline(tmp_path, train_sources, tokenizer), tokenizer)
    held_out = questions(pipeline(tmp_path, eval_sources, tokenizer), tokenizer)
    assert sum(held_out.values()) == 10 and sum(train.values()) == 30
    assert not set(train) & set(held_out)
    assert train + held_out == whole == collections.Counter(range(40))
    assert sorted(held_out) == EvalSplit(0.25, 3, "eval").indices(40)


def test_the_choice_is_the_same_in_fresh_builds_and_follows_the_seed(tmp_path, tokenizer):
    path = write(tmp_path / "a.jsonl", [chat(i) for i in range(40)])
    held_out = lambda seed, cache: set(questions(pipeline(
        tmp_path, with_eval_split([SourceConfig("a", path)], 0.25, seed)[1], tokenizer,
        cache), tokenizer))
    first = held_out(1, "cache1")
    assert held_out(1, "cache2") == first  # rebuilt from the records, not from a cache
    assert held_out(2, "cache3") != first


def test_a_count_holds_out_that_many_and_must_leave_some_to_train(tmp_path, tokenizer):
    path = write(tmp_path / "a.jsonl", [chat(i) for i in range(12)])
    train_sources, eval_sources = with_eval_split([SourceConfig("a", path)], 5, seed=0)
    held_out = questions(pipeline(tmp_path, eval_sources, tokenizer), tokenizer)
    train = questions(pipeline(tmp_path, train_sources, tokenizer), tokenizer)
    assert len(held_out) == 5 and len(train) == 7
    for value in (12, 0.99):  # a fraction that rounds up to the whole source, too
        for part in with_eval_split([SourceConfig("a", path)], value, seed=0):
            with pytest.raises(data.DataError, match=rf"a\.jsonl: data\.eval_split={value:g} "
                                                     r"holds out 12 of the source's 12 records"):
                pipeline(tmp_path, part, tokenizer)


@pytest.mark.parametrize("value, problem", [
    (-0.1, r"data\.eval_split=-0\.1: expected a fraction in \(0, 1\) or a count >= 1"),
    (1.5, r"data\.eval_split=1\.5: a count must be a whole number"),
    (float("nan"), r"data\.eval_split=nan: expected a fraction")])
def test_bad_values_are_refused_naming_the_key(value, problem):
    with pytest.raises(PipelineError, match=problem):
        with_eval_split([SourceConfig("a", "a.jsonl")], value, seed=0)


def test_zero_keeps_the_sources_whole():
    sources = (SourceConfig("a", "a.jsonl"), SourceConfig("b", "b.jsonl", weight=2.0))
    assert with_eval_split(sources, 0, seed=0) == (sources, ())
    train, held_out = with_eval_split(sources, 0.1, seed=5)
    assert [s.split for s in train] == [EvalSplit(0.1, 5, "train")] * 2
    assert [(s.name, s.weight, s.split.part) for s in held_out] == [("a", 1.0, "eval"),
                                                                   ("b", 2.0, "eval")]


def test_duplicates_across_the_split_are_counted_and_warned(tmp_path, tokenizer, caplog):
    split = EvalSplit(5, 0, "eval")
    held_out, train = split.indices(30), EvalSplit(5, 0, "train").indices(30)
    records = [chat(i, f"answer {i}") for i in range(30)]
    records[held_out[0]] = chat(train[0], f"answer  {train[0]} ")  # whitespace differs
    records[train[2]] = chat(train[1], f"answer {train[1]}")  # within train: harmless
    path = write(tmp_path / "a.jsonl", records)
    expected = {"count": 1, "examples": [[f"{path}:{train[0] + 1}", f"{path}:{held_out[0] + 1}"]]}
    sources = with_eval_split([SourceConfig("a", path)], 5, seed=0)
    with caplog.at_level(logging.WARNING):
        for part in sources:
            stats = pipeline(tmp_path, part, tokenizer).stats()["a"]
            assert stats["eval_split_overlap"] == expected
            assert stats["eval_split"]["part"] == part[0].split.part
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("1 held-out examples are exact duplicates" in w and expected["examples"][0][1]
               in w for w in warnings)
    assert "eval_split_overlap" not in pipeline(
        tmp_path, [SourceConfig("a", path)], tokenizer).stats()["a"]


def test_a_split_part_has_its_own_cache_entry(tmp_path, tokenizer, encode_calls):
    path = write(tmp_path / "a.jsonl", [chat(i) for i in range(20)])
    calls = encode_calls
    whole = pipeline(tmp_path, [SourceConfig("a", path)], tokenizer).sources[0]
    train_sources, eval_sources = with_eval_split([SourceConfig("a", path)], 4, seed=0)
    train = pipeline(tmp_path, train_sources, tokenizer).sources[0]
    held_out = pipeline(tmp_path, eval_sources, tokenizer).sources[0]
    assert calls["encode"] == 20 + 16 + 4  # each part encodes only its own records
    assert not train.from_cache and not held_out.from_cache
    assert len({whole.fingerprint, train.fingerprint, held_out.fingerprint}) == 3
    assert len({whole.directory, train.directory, held_out.directory}) == 3
    again = pipeline(tmp_path, train_sources, tokenizer).sources[0]
    assert again.from_cache and again.fingerprint == train.fingerprint
    assert np.array_equal(again.lengths, train.lengths)
    # Another split is another identity: a checkpoint of this run will not resume under it.
    other = pipeline(tmp_path, with_eval_split([SourceConfig("a", path)], 4, seed=1)[0],
                     tokenizer).sources[0]
    assert other.fingerprint != train.fingerprint


def test_the_config_carves_eval_from_train_and_refuses_both(tmp_path):
    """resolve: data.eval_split gives the train part to training and the held-out part to
    eval and to the behaviour prompts; naming data.eval as well is a one-line error."""
    from coach_jax.config import ConfigError, resolve
    from coach_jax.evals.behaviour import load_cases
    from test_trainer import tiny_config
    records = [chat(i, answer=f"answer {i}") for i in range(40)]
    path = write(tmp_path / "all.jsonl", records)
    config = tiny_config(tmp_path, **{"data.train": path, "data.eval": "",
                                      "data.eval_split": 0.25})
    settings = resolve(config, 1)
    (train,), (held_out,) = settings.data.train_sources, settings.data.eval_sources
    assert (train.split.part, held_out.split.part) == ("train", "eval")
    cases = load_cases(held_out.paths, held_out.format, 100, held_out.split)
    answers = {c.reference for c in cases}
    expected = {f"answer {i}" for i in held_out.split.indices(40)}
    assert len(answers) == 10 and answers == expected
    config.data.eval = path
    with pytest.raises(ConfigError, match="data.eval_split and data.eval both"):
        resolve(config, 1)
