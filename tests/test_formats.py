"""Readers and format normalisation: real files, and bad input named by file and line."""

import json
import os

import pytest

from coach_jax import data
from coach_jax.data import formats

REAL_FILES = {"alpaca_en_demo.json": ("alpaca", 999),
              "sharegpt_dummy_conversation.json": ("sharegpt", 500),
              "glaive_toolcall_en_demo.json": ("sharegpt", 300),
              "openai_messages_toy.jsonl": ("openai", 5)}


@pytest.mark.parametrize("name", list(REAL_FILES))
def test_real_files_normalise(realworld, name):
    path = os.path.join(realworld, "data", name)
    expected_format, count = REAL_FILES[name]
    first = next(data.read_records(path))
    assert data.detect_format(first.data) == expected_format
    items = list(data.iter_examples(path))
    assert len(items) == count
    good = [x for x in items if isinstance(x, data.Conversation)]
    # The toy file's record without a user turn still normalises (lint flags it).
    assert len(good) == count
    assert all(m.role in ("system", "user", "assistant", "tool") for c in good
               for m in c.messages)


def test_json_array_records_are_named_by_their_index(realworld):
    path = os.path.join(realworld, "data", "glaive_toolcall_en_demo.json")
    records = list(data.read_records(path))
    assert [str(r.origin) for r in records[:3]] == [f"{path}[#0]", f"{path}[#1]", f"{path}[#2]"]
    assert str(records[-1].origin) == f"{path}[#299]"  # 0-based: 300 records
    with open(path) as f:
        assert records[7].data == json.load(f)[7]


def _chat(question, answer):
    return {"messages": [{"role": "user", "content": question},
                         {"role": "assistant", "content": answer}]}


def test_minified_json_array_names_duplicates_and_errors_by_index(tmp_path):
    """On one line every record used to be `file:1`: 'x.json:1 duplicate of x.json:1'."""
    path = tmp_path / "min.json"
    path.write_text(json.dumps([_chat("hi", "yo"), _chat("other", "answer"),
                                _chat("hi", "yo  "), {"messages": []}]))
    items = list(data.iter_examples(str(path)))
    assert [str(x.origin) for x in items[:3]] == [f"{path}[#{i}]" for i in range(3)]
    assert str(items[3]) == f"{path}[#3]: messages: expected a non-empty list of messages"
    issues = {(i.where, i.kind): i.message for i in data.lint(str(path)).issues}
    assert issues[(f"{path}[#2]", "duplicate")].endswith(f"of {path}[#0]")


def test_malformed_json_says_where_once(tmp_path):
    """json's own message can end in "at" ("Unterminated string starting at")."""
    lines = tmp_path / "a.jsonl"
    lines.write_text('{"text": "ok"}\n{"text": "never closed}')  # the file ends in it
    error = list(data.read_records(str(lines)))[1].error
    assert str(error) == (f"{lines}:2: malformed JSON: Unterminated string starting at "
                          "column 10")
    array = tmp_path / "a.json"
    array.write_text('[\n  {"text": "ok"},\n  {"text": "never closed}')
    records = list(data.read_records(str(array)))
    assert str(records[0].origin) == f"{array}[#0]"
    assert str(records[1].error) == (f"{array}[#1]: malformed JSON: Unterminated string "
                                     "starting at line 3 column 12")


def test_glaive_tool_calls_become_assistant_tool_calls(realworld):
    path = os.path.join(realworld, "data", "glaive_toolcall_en_demo.json")
    conversation = data.load_examples(path)[0]
    roles = [m.role for m in conversation.messages]
    assert roles == ["user", "assistant", "user", "assistant", "tool", "assistant", "user",
                     "assistant"]
    call = conversation.messages[3].tool_calls[0]
    assert call["function"] == {"name": "search_recipes",
                                "arguments": {"ingredients": ["chicken", "bell peppers", "rice"]}}
    assert len(call["id"]) == 9 and conversation.messages[4].tool_call_id == call["id"]
    assert conversation.tools[0]["function"]["name"] == "search_recipes"


def test_each_format_normalises():
    cases = {
        "openai": {"messages": [{"role": "developer", "content": "sys"},
                                {"role": "user", "content": [{"type": "text", "text": "hi"}]},
                                {"role": "assistant", "content": "yo"}]},
        "sharegpt": {"system": "sys", "conversations": [{"from": "human", "value": "hi"},
                                                        {"from": "gpt", "value": "yo"}]},
        "alpaca": {"instruction": "hi", "input": "more", "output": "yo",
                   "history": [["before", "earlier"]]},
        "prompt_completion": {"prompt": "hi", "completion": "yo"},
        "text": {"text": "plain words", "id": 3},
    }
    for name, record in cases.items():
        assert data.detect_format(record) == name
    assert [(m.role, m.content) for m in data.normalize(cases["openai"], "openai").messages] == [
        ("system", "sys"), ("user", "hi"), ("assistant", "yo")]
    assert [(m.role, m.content) for m in data.normalize(cases["alpaca"], "alpaca").messages] == [
        ("user", "before"), ("assistant", "earlier"), ("user", "hi\n\nmore"),
        ("assistant", "yo")]
    assert data.normalize(cases["sharegpt"], "sharegpt").messages[0].role == "system"
    assert isinstance(data.normalize(cases["text"], "text"), data.Document)
    chat = data.normalize({"prompt": [{"role": "user", "content": "hi"}],
                           "completion": [{"role": "assistant", "content": "yo"}]},
                          "prompt_completion")
    assert [m.role for m in chat.messages] == ["user", "assistant"]


def test_a_record_fitting_only_by_ignoring_content_fits_nothing():
    record = {"instruction": "hi", "output": "yo", "response": "another answer"}
    with pytest.raises(data.DataError, match=r"keys seen: instruction, output, response"):
        data.detect_format(record, data.Origin("a.jsonl", line=3))
    # Metadata and empty extras are fine.
    assert data.detect_format({"instruction": "hi", "output": "yo", "id": "x1",
                               "notes": ""}) == "alpaca"
    with pytest.raises(data.DataError, match="fits no known format"):
        data.detect_format({"question": "hi", "answer": "yo"})


def _write_jsonl(path, records):
    with open(path, "w") as f:
        for r in records:
            f.write(r if isinstance(r, str) else json.dumps(r))
            f.write("\n")


def test_bad_records_are_named_by_file_line_and_field(tmp_path):
    path = tmp_path / "chats.jsonl"
    _write_jsonl(path, [
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]},
        '{"messages": [broken',
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": ""}]},
        {"messages": [{"role": "user", "content": "hi"}, {"role": "wizard", "content": "x"}]},
        {"messages": [{"role": "user"}, {"role": "assistant", "content": "x"}]},
        {"text": "a different format in the same file"},
        {"messages": [{"role": "user", "content": "only a question"}]},
    ])
    items = list(data.iter_examples(path))
    errors = [str(x) for x in items if isinstance(x, data.DataError)]
    assert errors == [
        f"{path}:2: malformed JSON: Expecting value at column 15",
        f"{path}:3: messages[1].content: empty assistant turn",
        f"{path}:4: messages[1].role: unknown role 'wizard' (expected one of system, user, "
        "assistant, tool)",
        f"{path}:5: messages[0].content: expected a string, got missing",
        f"{path}:6: record does not fit format 'openai' (keys seen: text; required: messages; "
        "optional: parallel_tool_calls, tools)",
        f"{path}:7: no assistant turn: nothing to learn",
    ]
    with pytest.raises(data.DataError, match=r"chats\.jsonl:2: malformed JSON"):
        data.load_examples(path)


def test_undecodable_bytes_are_reported(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    items = list(data.iter_examples(path))
    assert isinstance(items[0], data.Document)
    assert items[1].kind == "undecodable" and f"{path}:2" in str(items[1])


def test_paths_globs_and_missing_files(tmp_path):
    for i in range(2):
        _write_jsonl(tmp_path / f"part{i}.jsonl", [{"text": f"doc {i}"}])
    docs = data.load_examples(str(tmp_path / "part*.jsonl"))
    assert [d.text for d in docs] == ["doc 0", "doc 1"]
    assert docs[1].origin == data.Origin(str(tmp_path / "part1.jsonl"), line=1)
    with pytest.raises(FileNotFoundError, match="nope.jsonl: no such file"):
        data.load_examples(str(tmp_path / "nope.jsonl"))
    with pytest.raises(FileNotFoundError, match=r"\*\.parquet: no such file"):
        data.load_examples(str(tmp_path / "*.parquet"))
    with pytest.raises(data.DataError, match="unknown format 'chatml'"):
        data.load_examples(str(tmp_path / "part0.jsonl"), format="chatml")
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(data.DataError, match="unknown file type"):
        data.load_examples(str(tmp_path / "notes.txt"))


def test_json_that_is_not_an_array(tmp_path):
    (tmp_path / "one.json").write_text('{"text": "x"}')
    with pytest.raises(data.DataError, match=r"one\.json: malformed JSON: expected a top-level"):
        data.load_examples(str(tmp_path / "one.json"))


def test_parquet_rows(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq
    pq.write_table(pa.table({"prompt": ["p1", "p2"], "completion": ["c1", ""]}),
                   tmp_path / "d.parquet")
    items = list(data.iter_examples(str(tmp_path / "d.parquet")))
    assert items[0].messages[1].content == "c1"
    assert str(items[1]) == f"{tmp_path / 'd.parquet'} row 2: completion: empty"


def test_role_order_problems():
    bad = data.normalize({"messages": [{"role": "system", "content": "s"},
                                       {"role": "assistant", "content": "a"}]}, "openai")
    assert formats.role_order_problems(bad) == [
        "conversation starts with 'assistant', not 'user'", "no user turn"]


def test_saved_hf_dataset_rows(tmp_path):
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_dict({"instruction": ["a", "b"], "output": ["x", "y"]}).save_to_disk(
        str(tmp_path / "saved"))
    examples = data.load_examples(str(tmp_path / "saved"))
    assert [e.messages[-1].content for e in examples] == ["x", "y"]
    assert examples[1].origin == data.Origin(str(tmp_path / "saved"), row=2)


def test_hub_dataset_offline_is_a_clear_error(monkeypatch):
    datasets = pytest.importorskip("datasets")

    def offline(name, split):
        assert (name, split) == ("nobody/nothing", "train")
        raise ConnectionError("no network")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(data.DataError, match=r"hf://nobody/nothing: cannot load from the hub"):
        data.load_examples("hf://nobody/nothing")


def test_record_source_gives_random_access_to_the_same_records(tmp_path, realworld):
    from coach_jax.data.record_source import RecordSource
    path = tmp_path / "mixed.jsonl"
    path.write_bytes(b'{"text": "a"}\n\n{"text": "b"\n{"text": "c\xe9"}\n{"text": "d"}\n')
    alpaca = os.path.join(realworld, "data", "alpaca_en_demo.json")
    source = RecordSource([str(path), alpaca])
    sequential = list(data.read_records([str(path), alpaca]))
    assert len(source) == len(sequential) == 4 + 999
    for i in [3, 0, 2, 1, 1002, 4, 500]:  # any order
        got, want = source[i], sequential[i]
        assert got.origin == want.origin and got.data == want.data
        assert str(got.error) == str(want.error)
    assert source[1].error.kind == "malformed" and source[2].error.kind == "undecodable"
    assert source[3].origin.line == 5
    assert str(source[1002].origin) == f"{alpaca}[#998]"
