"""The trainer end to end: train_and_evaluate in-process, the CLI's modes and errors."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import transformers

from coach_jax import models, modes
from coach_jax.config import base_config
from coach_jax.train.loop import Trainer, train_and_evaluate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAB = os.path.join(ROOT, "assets", "lab")


def tiny_config(tmp_path, **overrides):
    c = base_config()
    c.model.init.update(vocab_size=1024, hidden_size=32, intermediate_size=64,
                        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                        head_dim=8)
    c.tokenizer.path = os.path.join(LAB, "tokenizer")
    c.data.train = os.path.join(LAB, "train.jsonl")
    c.data.eval = os.path.join(LAB, "eval.jsonl")
    c.data.max_seq_len = 256
    c.data.cache_dir = str(tmp_path / "cache")
    c.train.steps = 24
    c.train.global_batch_size = 8
    c.train.log_every = 8
    c.train.eval_every = 12
    c.eval.max_batches = 2
    c.optimizer.learning_rate = 1e-2
    c.schedule.warmup_steps = 2
    c.checkpoint.every_steps = 12
    for key, value in overrides.items():
        section, name = key.split(".")
        c[section][name] = value
    return c


def read_metrics(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("run")
    workdir = str(tmp / "workdir")
    config = tiny_config(tmp)
    record = train_and_evaluate(config, workdir)
    return config, workdir, record


def test_a_run_writes_everything(trained):
    config, workdir, record = trained
    for name in ("config.json", "metrics.jsonl", "loss.png", "report.md", "data_stats.json",
                 "export/model.safetensors",
                 "export/tokenizer.json", "export/generation_config.json"):
        assert os.path.exists(os.path.join(workdir, name)), name
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(f"{workdir}/tb"))
    assert sorted(os.listdir(f"{workdir}/checkpoints")) == ["12", "24"]
    assert json.load(open(f"{workdir}/config.json"))["train"]["steps"] == 24
    train_records = [r for r in read_metrics(workdir) if "loss" in r]
    assert [r["step"] for r in train_records] == [1, 8, 16, 24]
    for r in train_records:
        assert {"loss", "learning_rate", "grad_norm", "tokens_per_s",
                "supervised_tokens"} <= r.keys()
    assert train_records[-1]["loss"] < 0.8 * train_records[0]["loss"]
    evals = [r for r in read_metrics(workdir) if "eval_loss" in r]
    # Before step 1 (eval.at_start), every eval_every, once at the end (not twice at 24).
    assert [r["step"] for r in evals] == [0, 12, 24]
    assert record["eval_perplexity"] == pytest.approx(np.exp(record["eval_loss"]))


def test_export_loads_in_transformers_with_the_same_logits(trained):
    config, workdir, _ = trained
    export = os.path.join(workdir, "export")
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(export).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(export)
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "Brief me on Kalo."}],
                                        add_generation_prompt=True)
    ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
    tokens = np.asarray([ids], np.int32)
    with torch.no_grad():
        hf_logits = hf_model(torch.as_tensor(tokens, dtype=torch.long)).logits.numpy()
    trainer = Trainer(config, workdir, with_data=False)
    assert trainer.restore() == 24
    ours = np.asarray(models.apply(trainer.model_cfg, trainer.state.params, tokens))
    assert np.abs(ours - hf_logits).max() < 1e-4
    generation = json.load(open(os.path.join(export, "generation_config.json")))
    eos = generation["eos_token_id"]
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") in (eos if isinstance(eos, list)
                                                             else [eos])


def test_eval_and_export_modes_use_the_latest_checkpoint(trained, capsys):
    config, workdir, record = trained
    assert modes.eval(config, workdir) == 0
    evaluated = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert evaluated["step"] == 24
    assert evaluated["eval_loss"] == pytest.approx(record["eval_loss"], rel=1e-5)
    assert modes.export(config, workdir) == 0


def test_micro_batches_give_the_same_losses(tmp_path):
    losses = []
    for micro in (1, 4):
        workdir = str(tmp_path / f"micro{micro}")
        config = tiny_config(tmp_path, **{"train.micro_batches": micro, "train.steps": 4,
                                          "train.log_every": 1, "train.global_batch_size": 32,
                                          "data.eval": "", "export.hf": False})
        train_and_evaluate(config, workdir)
        losses.append([r["loss"] for r in read_metrics(workdir) if "loss" in r])
    assert len(losses[0]) == 4
    np.testing.assert_allclose(losses[0], losses[1], rtol=2e-5)


def test_epoch_mode_counts_its_steps(tmp_path):
    config = tiny_config(tmp_path, **{"train.steps": 0, "data.epochs": 1, "data.eval": "",
                                      "export.hf": False, "train.global_batch_size": 64})
    trainer = Trainer(config, str(tmp_path / "w"))
    assert trainer.total_steps == sum(1 for _ in trainer.pipeline)


def _cli(*args, cwd=ROOT):
    return subprocess.run([sys.executable, "-m", "coach_jax.main", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("override, message", [
    ("--config.optimizer.nmae=lion", 'Did you mean "name"'),
    ("--config.optimizer.name=adamx", "unknown optimizer 'adamx'"),
    ("--config.data.train=missing.jsonl", "missing.jsonl: no such file"),
    ("--config.train.global_batch_size=7", "global_batch_size=7 is not divisible"),
    ("--config.optimizer.extra=beta1=0.9", "'adamw' does not accept beta1; it accepts: b1"),
    ("--config.tokenizer.path=assets/lab/corpus", "tokenizer.path='assets/lab/corpus' holds no "
     "tokenizer"),  # a folder without tokenizer files
])
def test_bad_input_exits_with_one_clear_line(tmp_path, override, message):
    result = _cli("--config", "configs/default.py", "--workdir", str(tmp_path), override)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("coach_jax: error:") and message in last, result.stderr


def test_lint_and_inspect_modes_on_the_default_data(tmp_path):
    lint = _cli("--config", "configs/default.py", "--mode=lint")
    assert lint.returncode == 0, lint.stderr
    assert "480 records, 0 errors" in lint.stdout
    inspect = _cli("--config", "configs/default.py", "--mode=inspect",
                   "--inspect_examples=1")
    assert inspect.returncode == 0, inspect.stderr
    assert '[[{"name": "' in inspect.stdout


@pytest.mark.parametrize("name", ["alpaca_en_demo.json", "sharegpt_dummy_conversation.json",
                                  "glaive_toolcall_en_demo.json", "openai_messages_toy.jsonl"])
def test_lint_and_inspect_modes_on_real_files(tmp_path, realworld, name, capsys):
    config = tiny_config(tmp_path, **{"data.train": os.path.join(realworld, "data", name),
                                      "data.eval": "", "data.max_seq_len": 2048})
    status = modes.lint(config, None)
    out = capsys.readouterr().out
    # The toy file has faulty records; glaive's tool calls meet the lab's template, which
    # does not render tool calls: both are errors lint must report.
    assert status == (1 if name in ("openai_messages_toy.jsonl",
                                    "glaive_toolcall_en_demo.json") else 0)
    if name == "glaive_toolcall_en_demo.json":
        assert "does the chat template support tool calls?" in out
    assert modes.inspect(config, None, inspect_examples=1) == 0
    shown = capsys.readouterr().out
    assert ("tool calls do not appear" in shown if name == "glaive_toolcall_en_demo.json"
            else "[[" in shown)


def test_vocabulary_grows_pads_and_is_cut_back(tmp_path):
    cfg = models.ModelConfig(model_type="llama", vocab_size=100, hidden_size=16,
                             intermediate_size=32, num_layers=1, num_heads=2, num_kv_heads=2,
                             head_dim=8)
    params = models.init(cfg, 0)
    grown_cfg, grown = models.fit_vocab(cfg, params, tokenizer_size=130, multiple=64)
    assert grown_cfg.vocab_size == 192 and grown_cfg.real_vocab_size == 130
    np.testing.assert_allclose(grown["embed_tokens"][150], params["embed_tokens"].mean(0),
                               rtol=1e-6)
    np.testing.assert_array_equal(grown["embed_tokens"][:100], params["embed_tokens"])
    logits = np.asarray(models.apply(grown_cfg, grown, np.zeros((1, 3), np.int32)))
    assert (logits[..., 130:] < -1e30).all() and np.isfinite(logits[..., :130]).all()
    back_cfg, back = models.unpad_vocab(grown_cfg, grown)
    assert back_cfg.vocab_size == 130 and back["lm_head"].shape == (16, 130)
    models.save_hf(back_cfg, back, tmp_path)
    assert transformers.AutoConfig.from_pretrained(tmp_path).vocab_size == 130


def test_inspect_mode_shows_the_template_layout_once(tmp_path, realworld, capsys):
    """`--mode=inspect` prints what the encoder found in the chat template once, however
    many sources there are; `data.end_of_turn` reaches it."""
    template = os.path.join(realworld, "templates-more", "vllm__template_qwen.jinja")
    config = tiny_config(tmp_path, **{"tokenizer.chat_template": template})
    assert modes.inspect(config, None, inspect_examples=1) == 0
    shown = capsys.readouterr().out
    assert shown.count("chat template: refused:") == 1 and "data.end_of_turn" in shown
    config.data.end_of_turn = "<|im_end|>"
    assert modes.inspect(config, None, inspect_examples=1) == 0
    shown = capsys.readouterr().out
    assert shown.count("chat template layout:") == 1
    assert "appended: '<|im_end|>' after any assistant turn the template leaves open" in shown
    assert "<|im_end|>]]" in shown  # the appended marker is trained
