"""Lint names faulty records by line; inspect shows exactly what is supervised."""

import json
import os

import pytest

import tokenizer_fixtures
from coach_jax import data


def _mistral(realworld):
    return data.load_tokenizer(os.path.join(realworld, "tokenizers", "mistral-7b-instruct-v0.3"))


def test_lint_names_the_faulty_toy_records(realworld):
    path = os.path.join(realworld, "data", "openai_messages_toy.jsonl")
    report = data.lint(path, _mistral(realworld), max_seq_len=2048)
    flagged = {issue.where for issue in report.issues}
    assert flagged == {f"{path}:4", f"{path}:5"}  # no user turn; a 12k-token answer
    kinds = {(i.where.rsplit(":", 1)[1], i.kind) for i in report.issues}
    assert ("4", "role_order") in kinds and ("5", "overlong") in kinds
    assert report.records == 5 and not report.ok() and report.ok(max_errors=report.errors)
    text = report.format()
    assert f"{path}:4: error: [role_order] no user turn" in text
    assert f"{path}:5: warning: [overlong] " in text and "over data.max_seq_len=2048" in text
    assert "response tokens: median" in text


def test_lint_reports_every_kind_of_problem(tmp_path, realworld):
    path = tmp_path / "mixed.jsonl"
    good = {"messages": [{"role": "user", "content": "What is the capital of France?"},
                         {"role": "assistant", "content": "Paris is the capital. " * 10}]}
    lines = [json.dumps(good), "{oops", json.dumps({"question": "q", "answer": "a"}),
             json.dumps({"messages": [{"role": "user", "content": "hi"},
                                      {"role": "assistant", "content": "  "}]}),
             json.dumps({"messages": [{"role": "user", "content": "the   capital"},
                                      {"role": "assistant", "content": "Paris."}]}),
             json.dumps({"messages": [{"role": "user", "content": "the capital"},
                                      {"role": "assistant", "content": "Paris. "}]}),
             json.dumps({"messages": [{"role": "user", "content": "\ud800 broken"},
                                      {"role": "assistant", "content": "x"}]}),
             json.dumps({"messages": [{"role": "user", "content": "a"},
                                      {"role": "user", "content": "b"},
                                      {"role": "assistant", "content": "c"}]})]
    path.write_text("\n".join(lines) + "\n")
    tokenizer = tokenizer_fixtures.bpe_tokenizer(
        os.path.join(realworld, "templates", "chatml.jinja"))
    report = data.lint(str(path), tokenizer, max_seq_len=40)
    by_line = {}
    for issue in report.issues:
        by_line.setdefault(int(issue.where.rsplit(":", 1)[1]), set()).add(issue.kind)
    assert by_line == {1: {"overlong"}, 2: {"malformed"}, 3: {"unknown_format"},
                       4: {"empty_assistant"}, 6: {"duplicate"}, 7: {"undecodable"},
                       8: {"role_order"}}


def test_inspect_marks_supervised_text(realworld):
    path = os.path.join(realworld, "data", "sharegpt_dummy_conversation.json")
    tokenizer = tokenizer_fixtures.bpe_tokenizer(
        os.path.join(realworld, "templates", "qwen2.5.jinja"))
    shown = data.inspect(path, tokenizer, n=2)
    assert shown.count(f"--- {path}") == 2  # each block names the record (file:line, file[#i])
    assert "<|im_start|>user\nWho are you?<|im_end|>\n<|im_start|>assistant\n[[I am Vicuna" in shown
    assert "[[You too!<|im_end|>]]" in shown


def test_lint_script_exit_code_follows_the_error_threshold(realworld):
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    command = [sys.executable, os.path.join(root, "scripts", "lint_dataset.py"), "--data",
               os.path.join(realworld, "data", "openai_messages_toy.jsonl"), "--tokenizer",
               os.path.join(realworld, "tokenizers", "mistral-7b-instruct-v0.3"),
               "--max_seq_len", "2048"]
    failing = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert failing.returncode == 1, failing.stderr
    assert "openai_messages_toy.jsonl:4: error" in failing.stdout
    assert "lint failed: 3 errors > --max_errors=0" in failing.stderr
    passing = subprocess.run(command + ["--max_errors", "3"], capture_output=True, text=True,
                             timeout=120)
    assert passing.returncode == 0, passing.stderr


def test_chat_template_from_a_file(realworld):
    tokenizer = data.load_tokenizer(os.path.join(realworld, "tokenizers", "gpt-neox-20b"),
                                    os.path.join(realworld, "templates", "chatml.jinja"))
    assert tokenizer.chat_template.startswith("{% for message in messages %}")
    # gpt-neox has no <|im_end|> token: the template is applied but cannot teach stopping.
    with pytest.raises(data.EncodingError, match="closes assistant turns with no special"):
        data.encode_chat(tokenizer, [{"role": "user", "content": "hi"},
                                     {"role": "assistant", "content": "yo"}])


def _distinct_chats(path, n):
    path.write_text("".join(json.dumps({"messages": [
        {"role": "user", "content": f"Question {i}?"},
        {"role": "assistant", "content": f"Answer {i}."}]}) + "\n" for i in range(n)))


def test_a_template_refusal_is_one_line_with_its_fix_and_count(tmp_path, realworld, capsys):
    """gpt-neox has no `<|im_end|>` token: ChatML cannot teach it to stop. --mode=lint says
    so once for the 100 records, naming the token to add and the config key to set."""
    from coach_jax import config as config_lib, modes
    _distinct_chats(tmp_path / "chats.jsonl", 100)
    c = config_lib.base_config()
    c.tokenizer.path = os.path.join(realworld, "tokenizers", "gpt-neox-20b")
    c.tokenizer.chat_template = os.path.join(realworld, "templates", "chatml.jinja")
    c.data.train = str(tmp_path / "chats.jsonl")
    assert modes.lint(c, None) == 1
    out = capsys.readouterr().out
    refusals = [line for line in out.splitlines() if "[chat_template]" in line]
    assert len(refusals) == 1 and out.count("looks like a control token") == 1
    line = refusals[0]
    assert line.startswith(f"{tmp_path / 'chats.jsonl'}: error: [chat_template] ")
    assert "add '<|im_end|>', '<|im_start|>' to the tokenizer as special tokens" in line
    assert "data.end_of_turn='<|endoftext|>'" in line  # a special token gpt-neox has
    assert line.endswith("(100 records affected)")
    assert "100 records, 100 errors" in out


def test_a_template_refusal_counts_for_every_record_it_stops(tmp_path, realworld):
    """Reported once, it still fails every conversation for --max_errors; text records,
    which need no template, are linted as usual."""
    tokenizer = tokenizer_fixtures.bpe_tokenizer(
        os.path.join(realworld, "templates", "gemma3.jinja"), register_specials=False)
    path = tmp_path / "chats.jsonl"
    _distinct_chats(path, 30)
    report = data.lint(str(path), tokenizer)
    assert [i.kind for i in report.issues] == ["chat_template"]
    assert "'<end_of_turn>'" in report.issues[0].message and report.issues[0].records == 30
    assert report.errors == 30 and not report.ok(max_errors=29)
    assert "error:chat_template=30" in report.format()
    shown = data.inspect(str(path), tokenizer, n=3)
    assert shown.count("looks like a control token") == 1


DOCS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "docs", "data.md")


def _doc_samples():
    """(format, record line) of every ```jsonl <format> block of docs/data.md."""
    import re
    with open(DOCS) as f:
        blocks = re.findall(r"^```jsonl (\w+)\n(.*?)^```", f.read(), re.S | re.M)
    return [(name, line) for name, block in blocks for line in block.splitlines()]


def test_the_sample_records_in_the_docs_parse_and_encode(tmp_path, realworld):
    samples = _doc_samples()
    assert {name for name, _ in samples} == set(data.FORMATS)
    examples = []
    for name, line in samples:
        record = json.loads(line)
        assert data.detect_format(record) == name, line
        examples.append(data.normalize(record, name))
    messages = [m for e in examples if isinstance(e, data.Conversation) for m in e.messages]
    assert any(m.tool_calls for m in messages)
    assert any(m.role == "tool" and m.tool_call_id for m in messages)
    assert sum(m.reasoning is not None for m in messages) == 3
    tools = [json.loads(line).get("tools") for _, line in samples]
    assert {type(t) for t in tools if t} == {list, str}  # a list and a JSON string
    # They train as they are: lint (grouped by format, as a source is) finds no problem.
    tokenizer = tokenizer_fixtures.bpe_tokenizer(os.path.join(realworld, "templates",
                                                              "qwen3.jinja"))
    for name in data.FORMATS:
        path = tmp_path / f"{name}.jsonl"
        path.write_text("".join(line + "\n" for n, line in samples if n == name))
        report = data.lint(str(path), tokenizer, format=name)
        assert report.issues == [], report.format()
