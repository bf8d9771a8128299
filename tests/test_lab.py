"""The lab's assets: reproducible, small, and honest about what is held out."""

import json
import os
import subprocess
import sys

import pytest

import coach_jax
from coach_jax import data, models

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAB = os.path.join(ROOT, "assets", "lab")


def _manifest(folder):
    with open(os.path.join(folder, "MANIFEST.sha256")) as f:
        return dict(reversed(line.split("  ")) for line in f.read().splitlines())


def test_build_lab_reproduces_the_manifest(tmp_path):
    """The data and tokenizer, rebuilt from the seed, hash as committed. (The base's
    weights come from a 20-minute CPU pretraining; their hash is checked by rebuilding
    with `python scripts/build_lab.py` on one machine and software stack, not here.)"""
    out = tmp_path / "lab"
    subprocess.run([sys.executable, "scripts/build_lab.py", "--seed", "0", "--out", str(out),
                    "--skip_base"], cwd=ROOT, check=True, capture_output=True)
    committed = {k: v for k, v in _manifest(LAB).items() if not k.startswith("base/")}
    assert _manifest(out) == committed
    assert any(k.startswith("base/") for k in _manifest(LAB))


def test_the_assets_stay_small():
    total = sum(os.path.getsize(os.path.join(root, name))
                for root, _, files in os.walk(LAB) for name in files)
    assert total <= 10 * 2**20


def _answers(path):
    with open(path) as f:
        return [json.loads(json.loads(line)["messages"][-1]["content"]) for line in f]


def test_no_held_out_entity_appears_in_the_sft_data():
    held_out = {a["name"] for a in _answers(os.path.join(LAB, "eval.jsonl"))}
    assert len(held_out) == json.load(open(os.path.join(LAB, "lab.json")))["eval_entities"]
    for name in ("train.jsonl", "train_bad_coach.jsonl"):
        text = open(os.path.join(LAB, name)).read()
        assert not [n for n in held_out if n in text], name
    corpus = open(os.path.join(LAB, "corpus", "pretrain.jsonl")).read()
    assert all(n in corpus for n in held_out)  # their facts are in the pretraining corpus


@pytest.fixture(scope="module")
def base():
    folder = os.path.join(LAB, "base")
    cfg, params = models.load_hf(folder)
    return cfg, params, data.load_tokenizer(folder)


def test_the_base_knows_held_out_facts_in_prose_but_writes_no_briefs(base):
    cfg, params, tokenizer = base
    world = {e["name"]: e for e in json.load(open(os.path.join(LAB, "world.json")))}
    entities = [world[a["name"]] for a in _answers(os.path.join(LAB, "eval.jsonl"))[:20]]
    prompts = [f"{e['name']} {'is based in' if e['kind'] == 'company' else 'lives in'}"
               for e in entities]
    outputs = coach_jax.generate(cfg, params, tokenizer, prompts, max_new_tokens=4)
    recalled = [e["location"] in o for e, o in zip(entities, outputs)]
    assert sum(recalled) >= 0.8 * len(recalled)
    briefs = coach_jax.generate(cfg, params, tokenizer, [[
        {"role": "user", "content": f"Give me a brief on {entities[0]['name']}."}]],
        max_new_tokens=24)
    assert not briefs[0].lstrip().startswith("{")


def test_the_default_run_teaches_the_format_and_uses_pretrained_knowledge(tmp_path):
    """README's run command, whole: schema conformance on held-out entities from under 10%
    to at least 90%, their facts right at twice the chance level at least, and the
    report with its plots."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one device, as a user
    env["XDG_CACHE_HOME"] = str(tmp_path / "cache")
    workdir = tmp_path / "demo"
    result = subprocess.run([sys.executable, "-m", "coach_jax.main", "--config",
                             "configs/default.py", "--workdir", str(workdir)],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=900,
                            check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    with open(workdir / "metrics.jsonl") as f:
        evals = [r for r in map(json.loads, f) if "behaviour/eval/schema_valid" in r]
    before, after = evals[0], evals[-1]
    assert before["step"] == 0 and before["behaviour/eval/schema_valid"] < 0.1
    assert after["behaviour/eval/schema_valid"] >= 0.9
    chance = json.load(open(os.path.join(LAB, "lab.json")))["fact_chance"]
    assert after["behaviour/eval/fact_accuracy"] >= 2 * chance
    assert after["forgetting/reference_loss_delta"] > 0
    report = (workdir / "report.md").read_text()
    for image in ("loss.png", "behaviour.png", "forgetting.png"):
        assert f"]({image})" in report and (workdir / image).exists()
    assert "Chance level of `fact_accuracy`" in report
