"""Encoding a source under explicit policies: over-long, invalid, nothing to learn; splits."""

import json
import os

import pytest

import tokenizer_fixtures
from coach_jax import data


@pytest.fixture
def tokenizer(realworld):
    return tokenizer_fixtures.bpe_tokenizer(os.path.join(realworld, "templates", "chatml.jinja"))


def _chat(user, answer):
    return {"messages": [{"role": "user", "content": user},
                         {"role": "assistant", "content": answer}]}


def _source(tmp_path, records):
    path = tmp_path / "src.jsonl"
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n"
                            for r in records))
    return str(path)


def test_overlong_policies(tmp_path, tokenizer):
    long_answer = "The quick brown fox jumps over the lazy dog. " * 20
    path = _source(tmp_path, [_chat("hi", "Paris."), _chat("hi", long_answer)])
    lengths = [len(e.input_ids) for e in data.encode_all(
        data.iter_examples(path), tokenizer, data.EncodeOptions(max_seq_len=10_000))]
    limit = lengths[0] + 5
    report = data.EncodeReport()
    kept = list(data.encode_all(data.iter_examples(path), tokenizer,
                                data.EncodeOptions(max_seq_len=limit), report))
    assert len(kept) == 1 and report.counts == {"encoded": 1, "dropped_overlong": 1}
    assert f"{path}:2" in report.summary()
    report = data.EncodeReport()
    cut = list(data.encode_all(data.iter_examples(path), tokenizer,
                               data.EncodeOptions(max_seq_len=limit, overlong="truncate"), report))
    assert [len(e.input_ids) for e in cut] == [lengths[0], limit + 1]
    assert report.counts == {"encoded": 2, "truncated": 1}
    with pytest.raises(data.DataError, match=r"src\.jsonl:2: .*exceed data\.max_seq_len=\d+ "
                                             r"\(data\.truncation='error'\)"):
        list(data.encode_all(data.iter_examples(path), tokenizer,
                             data.EncodeOptions(max_seq_len=limit, overlong="error")))


def test_truncation_that_leaves_nothing_to_learn_is_skipped(tmp_path, tokenizer):
    path = _source(tmp_path, [_chat("What is the capital of France? " * 10, "Paris.")])
    report = data.EncodeReport()
    kept = list(data.encode_all(data.iter_examples(path), tokenizer,
                                data.EncodeOptions(max_seq_len=8, overlong="truncate"), report))
    assert kept == [] and report.counts == {"nothing_to_learn_after_truncation": 1}


def test_invalid_records_error_or_are_counted(tmp_path, tokenizer):
    path = _source(tmp_path, [_chat("hi", "Paris."), "{bad json",
                              {"messages": [{"role": "user", "content": "no answer"}]},
                              _chat("hi", "")])
    with pytest.raises(data.DataError, match=r"src\.jsonl:2: malformed JSON"):
        list(data.encode_all(data.iter_examples(path), tokenizer, data.EncodeOptions()))
    report = data.EncodeReport()
    kept = list(data.encode_all(data.iter_examples(path), tokenizer,
                                data.EncodeOptions(on_invalid="skip"), report))
    assert len(kept) == 1
    assert report.counts == {"encoded": 1, "skipped_malformed": 1, "nothing_to_learn": 1,
                             "skipped_empty_assistant": 1}


def test_bad_options_are_refused():
    with pytest.raises(ValueError, match="data.truncation='cut'; expected one of drop, truncate"):
        data.EncodeOptions(overlong="cut")
    with pytest.raises(ValueError, match="data.on_invalid='ignore'"):
        data.EncodeOptions(on_invalid="ignore")
    with pytest.raises(ValueError, match="data.max_seq_len=0 must be positive"):
        data.EncodeOptions(max_seq_len=0)


def test_json_array_records_are_named_by_index_in_drops_and_skips(tmp_path, tokenizer):
    """All on one line, every record of a JSON array used to be `src.json:1`."""
    path = tmp_path / "src.json"
    path.write_text(json.dumps([_chat("hi", "Paris."), _chat("hi", "word " * 200),
                                _chat("hi", "")]))
    report = data.EncodeReport()
    options = data.EncodeOptions(max_seq_len=64, on_invalid="skip")
    assert len(list(data.encode_all(data.iter_examples(str(path)), tokenizer, options,
                                    report))) == 1
    assert report.examples["dropped_overlong"] == [f"{path}[#1]"]
    assert report.examples["skipped_empty_assistant"][0].startswith(f"{path}[#2]: ")
    with pytest.raises(data.DataError, match=r"src\.json\[#2\]: messages\[1\]\.content"):
        list(data.encode_all(data.iter_examples(str(path)), tokenizer,
                             data.EncodeOptions(max_seq_len=64)))


def test_eval_split_is_seeded_and_overlap_is_found():
    examples = [data.Document(f"doc {i}", data.Origin("d.jsonl", line=i + 1)) for i in range(20)]
    train, held_out = data.split_eval(examples, eval_fraction=0.25, seed=3)
    assert len(held_out) == 5 and len(train) == 15
    assert set(map(id, train)).isdisjoint(map(id, held_out))
    assert data.split_eval(examples, eval_fraction=0.25, seed=3)[1] == held_out
    assert data.split_eval(examples, eval_fraction=0.25, seed=4)[1] != held_out
    assert data.overlap(train, held_out) == []
    duplicate = data.Document("doc  0", data.Origin("e.jsonl", line=1))  # whitespace differs
    assert data.overlap(examples[:1], [duplicate]) == [("d.jsonl:1", "e.jsonl:1")]
    with pytest.raises(ValueError, match="exactly one of"):
        data.split_eval(examples)
    with pytest.raises(ValueError, match="between 1 and 19"):
        data.split_eval(examples, eval_count=20)
