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
    assert shown.count(f"--- {path}:") == 2
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
