"""The forgetting monitor end to end: a tiny base pretrained on prose, then SFT on briefs,
gently and aggressively; plus the budget stop, the behaviour evals and the report."""

import contextlib
import io
import json
import os
import sys

import pytest

from coach_jax.config import base_config
from coach_jax.train.loop import train_and_evaluate

LAB = os.path.join(os.path.dirname(__file__), "..", "assets", "lab")


def _prose(entity: dict) -> str:
    if entity["kind"] == "company":
        return (f"{entity['name']} is a company in {entity['category']}. It was founded in "
                f"{entity['year']} and is based in {entity['location']}.")
    return (f"{entity['name']} works as a {entity['category']} in {entity['location']}, "
            f"born in {entity['year']}.")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Prose about the lab's entities: most for pretraining, the rest held out as the
    general reference set."""
    folder = tmp_path_factory.mktemp("corpus")
    with open(os.path.join(LAB, "world.json")) as f:
        entities = json.load(f)
    lines = [json.dumps({"text": _prose(e)}) + "\n" for e in entities]
    cut = len(lines) * 4 // 5
    paths = {"pretrain": folder / "pretrain.jsonl", "reference": folder / "reference.jsonl"}
    paths["pretrain"].write_text("".join(lines[:cut]))
    paths["reference"].write_text("".join(lines[cut:]))
    return {k: str(v) for k, v in paths.items()}


def _config(tmp_path, **overrides):
    c = base_config()
    c.model.init.update(vocab_size=1024, hidden_size=64, intermediate_size=128,
                        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                        head_dim=16)
    c.tokenizer.path = os.path.join(LAB, "tokenizer")
    c.data.max_seq_len = 256
    c.data.cache_dir = str(tmp_path / "cache")
    c.train.global_batch_size = 8
    c.train.log_every = 10
    c.checkpoint.every_steps = 1000
    c.schedule.warmup_steps = 2
    for key, value in overrides.items():
        section, name = key.split(".")
        c[section][name] = value
    return c


@pytest.fixture(scope="module")
def base_model(corpus, tmp_path_factory):
    """Briefly pretrained on the prose (text format: every token supervised)."""
    tmp = tmp_path_factory.mktemp("base")
    config = _config(tmp, **{"data.train": corpus["pretrain"], "train.steps": 60,
                             "optimizer.learning_rate": 3e-3})
    train_and_evaluate(config, str(tmp / "run"))
    return str(tmp / "run" / "export")


def _sft(tmp_path, base_model, corpus, learning_rate, **overrides):
    config = _config(tmp_path, **{
        "model.hf_path": base_model, "data.train": os.path.join(LAB, "train.jsonl"),
        "data.eval": os.path.join(LAB, "eval.jsonl"), "train.steps": 30,
        "train.eval_every": 15, "optimizer.learning_rate": learning_rate,
        "eval.max_batches": 1, "eval.reference": corpus["reference"],
        "export.hf": False, **overrides})
    workdir = str(tmp_path / f"sft_{learning_rate}")
    record = train_and_evaluate(config, workdir)
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        evals = [r for r in map(json.loads, f) if "forgetting/kl" in r]
    return workdir, record, evals


class _Tee(io.StringIO):
    """Keeps what is printed and passes it on."""

    def __init__(self, stream):
        super().__init__()
        self.stream = stream

    def write(self, text):
        self.stream.write(text)
        return super().write(text)


@pytest.fixture(scope="module")
def gentle_and_aggressive(base_model, corpus, tmp_path_factory):
    """The aggressive run also carries the default (warn-only) forgetting budget, so
    test_the_budget_only_warns_by_default reads this run and its printed output instead of
    training the same run again; a warning changes nothing in the run."""
    tmp = tmp_path_factory.mktemp("sft")
    gentle = _sft(tmp, base_model, corpus, 1e-4)
    printed = _Tee(sys.stdout)
    with contextlib.redirect_stdout(printed):
        aggressive = _sft(tmp, base_model, corpus, 3e-2, **{
            "eval.generate_examples": 6, "eval.max_new_tokens": 48,
            "eval.json_schema": os.path.join(LAB, "brief_schema.json"),
            "eval.forgetting_budget": 0.05})
    return gentle, aggressive, printed.getvalue()


def test_an_aggressive_coach_forgets_more_than_a_gentle_one(gentle_and_aggressive):
    (_, _, gentle), (_, _, aggressive), _ = gentle_and_aggressive
    for evals in (gentle, aggressive):
        assert [r["step"] for r in evals] == [0, 15, 30]
        start = evals[0]
        # Before step 1 the model is the base: no delta, no divergence.
        assert start["forgetting/reference_loss_delta"] == pytest.approx(0.0, abs=1e-6)
        assert start["forgetting/kl"] == pytest.approx(0.0, abs=1e-6)
        assert start["forgetting/reference_loss"] == pytest.approx(
            start["forgetting/reference_loss_base"])
    print("gentle", gentle[-1], "\naggressive", aggressive[-1])
    assert gentle[0]["forgetting/reference_loss_base"] == pytest.approx(
        aggressive[0]["forgetting/reference_loss_base"], rel=1e-6)
    assert aggressive[-1]["forgetting/reference_loss_delta"] > \
        2 * max(gentle[-1]["forgetting/reference_loss_delta"], 0.01)
    assert aggressive[-1]["forgetting/kl"] > 2 * gentle[-1]["forgetting/kl"] > 0


def test_behaviour_is_measured_and_reported(gentle_and_aggressive):
    workdir, _, evals = gentle_and_aggressive[1]
    keys = {"exact_match", "normalized_match", "json_parses", "schema_valid", "field_accuracy"}
    for record in evals:
        assert {f"behaviour/eval/{k}" for k in keys} <= record.keys()
        assert all(0.0 <= record[f"behaviour/eval/{k}"] <= 1.0 for k in keys)
    with open(os.path.join(workdir, "generations", "step_000030.jsonl")) as f:
        generations = [json.loads(line) for line in f]
    assert len(generations) == 6
    assert {"prompt", "reference", "output", "finish_reason"} <= generations[0].keys()
    report = open(os.path.join(workdir, "report.md")).read()
    for heading in ("## What was trained", "## Before and after", "## Loss",
                    "## Evals over time", "## Behaviour before and after", "## Forgetting",
                    "## Data"):
        assert heading in report
    for image in ("loss.png", "behaviour.png", "forgetting.png"):
        assert f"]({image})" in report and os.path.exists(os.path.join(workdir, image))
    assert "behaviour/eval/schema_valid" in report
    assert "Packing:" in report


def test_the_budget_stops_the_run(base_model, corpus, tmp_path):
    workdir, record, evals = _sft(tmp_path, base_model, corpus, 3e-2, **{
        "train.eval_every": 5, "eval.forgetting_budget": 0.05,
        "eval.on_forgetting_budget": "stop"})
    assert "forgetting budget exceeded" in record["stopped"]
    last = evals[-1]
    assert last["forgetting/reference_loss_delta"] > 0.05
    assert all(r["forgetting/reference_loss_delta"] <= 0.05 for r in evals[:-1])
    assert last["step"] < 30
    assert os.listdir(os.path.join(workdir, "checkpoints")) == [str(last["step"])]
    assert "stopped early" in open(os.path.join(workdir, "report.md")).read()


def test_the_budget_only_warns_by_default(gentle_and_aggressive):
    _, record, evals = gentle_and_aggressive[1]
    printed = gentle_and_aggressive[2]
    assert "stopped" not in record and evals[-1]["step"] == 30
    assert "warning: forgetting budget exceeded" in printed
