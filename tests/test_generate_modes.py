"""--mode=generate and --mode=chat through the command line, against coach_jax.generate."""

import json
import os
import subprocess
import sys

import pytest

import coach_jax
from coach_jax import data, models, modes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAB = os.path.join(ROOT, "assets", "lab")
CONFIG = os.path.join(ROOT, "configs", "default.py")
BASE = os.path.join(LAB, "base")  # a small HF folder: config, safetensors, tokenizer
SAMPLING = dict(max_new_tokens=6, temperature=0.0, top_k=0, top_p=1.0, seed=0)


def _cli(*args, stdin=None):
    return subprocess.run([sys.executable, "-m", "coach_jax.main", *args], cwd=ROOT,
                          input=stdin, capture_output=True, text=True, timeout=300, check=False)


@pytest.fixture(scope="module")
def trained(short_default_run):
    """A few steps of the default config: a checkpoint and its HF export (conftest's run,
    shared with test_main)."""
    workdir, overrides, result = short_default_run
    assert result.returncode == 0, result.stderr
    return str(workdir), overrides, os.path.join(workdir, "export")


def _expected(export, conversations, **sampling):
    cfg, params = models.load_hf(export)
    return coach_jax.generate(cfg, params, data.load_tokenizer(export), conversations,
                              **sampling)


def test_generate_writes_one_output_per_input_line(trained, tmp_path):
    workdir, overrides, export = trained
    with open(os.path.join(LAB, "eval.jsonl")) as f:
        lines = f.readlines()[:5]
    lines.append(json.dumps({"messages": [{"role": "user", "content": "Hi"}]}) + "\n")
    (tmp_path / "in.jsonl").write_text("".join(lines))
    out = tmp_path / "out.jsonl"
    result = _cli("--mode=generate", "--model", export, "--input", str(tmp_path / "in.jsonl"),
                  "--output", str(out), "--max_new_tokens=12")
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 6
    records = [json.loads(line) for line in lines]
    assert [r["reference"] for r in rows[:5]] == [r["messages"][-1]["content"]
                                                  for r in records[:5]]
    assert "reference" not in rows[5]
    prompts = [r["messages"] for r in rows]
    assert prompts[0] == records[0]["messages"][:-1]
    assert [r["output"] for r in rows] == _expected(export, prompts, max_new_tokens=12)
    assert {r["finish_reason"] for r in rows} <= {"stop", "length"}
    # The same through the run's own checkpoint instead of the export.
    from_checkpoint = tmp_path / "from_checkpoint.jsonl"
    result = _cli("--mode=generate", "--config", CONFIG, "--workdir", workdir, *overrides,
                  "--input", str(tmp_path / "in.jsonl"), "--output", str(from_checkpoint),
                  "--max_new_tokens=12")
    assert result.returncode == 0, result.stderr
    assert from_checkpoint.read_text() == out.read_text()


def test_generate_names_a_bad_input_line(trained, tmp_path):
    _, _, export = trained
    (tmp_path / "in.jsonl").write_text('{"messages": [{"role": "user", "content": "Hi"}]}\n'
                                       '{"messages": [{"role": "user"}]}\n')
    result = _cli("--mode=generate", "--model", export, "--input", str(tmp_path / "in.jsonl"),
                  "--output", str(tmp_path / "out.jsonl"))
    assert result.returncode == 2
    assert "in.jsonl:2" in result.stderr and "content" in result.stderr
    assert not (tmp_path / "out.jsonl").exists()


def test_chat_keeps_the_conversation_and_resets(trained):
    _, _, export = trained
    result = _cli("--mode=chat", "--model", export, "--max_new_tokens=10",
                  "--system=You write briefs.",
                  stdin="Brief on Kalolo Labs.\nAnd Tortorlo Works?\n/reset\nHello\n/exit\n"
                        "never read\n")
    assert result.returncode == 0, result.stderr
    answers = [line.removeprefix("assistant> ").removesuffix(" [max_new_tokens reached]")
               for line in result.stdout.splitlines() if line.startswith("assistant> ")]
    assert len(answers) == 3 and "(new conversation)" in result.stdout
    system = {"role": "system", "content": "You write briefs."}
    first = [system, {"role": "user", "content": "Brief on Kalolo Labs."}]
    assert answers[0] == _expected(export, [first], max_new_tokens=10)[0]
    second = first + [{"role": "assistant", "content": answers[0]},
                      {"role": "user", "content": "And Tortorlo Works?"}]
    # Each turn samples with seed + turn; greedy does not depend on it.
    assert answers[1] == _expected(export, [second], max_new_tokens=10)[0]
    assert answers[2] == _expected(export, [[system, {"role": "user", "content": "Hello"}]],
                                   max_new_tokens=10)[0]


def test_chat_without_a_model_says_what_is_missing():
    result = _cli("--mode=chat")
    assert result.returncode == 2
    assert "--model" in result.stderr


def test_generate_reads_each_record_by_its_own_kind(tmp_path):
    """A file mixing text records (raw prompts, continued as is) with conversations of
    different formats gets one output row per line, in order."""
    text = {"text": "Kalolo Labs is a company"}
    chat = {"messages": [{"role": "user", "content": "Give me a brief on Kalolo Labs."},
                         {"role": "assistant", "content": "a reference"}]}
    alpaca = {"instruction": "Give me a brief on Tortorlo Works.", "output": "another"}
    records = [text, chat, {"text": "Tortorlo Works was founded in"}, alpaca]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    out = tmp_path / "out.jsonl"
    assert modes.generate(None, None, input=str(tmp_path / "in.jsonl"), output=str(out),
                          model=BASE, generate_batch_size=32, **SAMPLING) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["origin"].rsplit(":", 1)[1] for r in rows] == ["1", "2", "3", "4"]
    assert rows[0]["prompt"] == text["text"] and "messages" not in rows[0]
    assert rows[1]["messages"] == chat["messages"][:1] and rows[1]["reference"] == "a reference"
    assert rows[3]["messages"] == [{"role": "user", "content": alpaca["instruction"]}]
    prompts = [text["text"], rows[1]["messages"], records[2]["text"], rows[3]["messages"]]
    cfg, params = models.load_hf(BASE)
    assert [r["output"] for r in rows] == coach_jax.generate(
        cfg, params, data.load_tokenizer(BASE), prompts, **SAMPLING)
