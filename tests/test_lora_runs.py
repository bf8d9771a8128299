"""LoRA runs through the command line on the lab's base (adapter dropout on, so resume
also restores its masks): adapter-only checkpoints, exact resume after kill -9, the base
checked on resume, PEFT and merged exports, and an adapter folder that training continues
from."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import peft
import pytest
import torch
import transformers
from safetensors.numpy import load_file, save_file

import test_resume
from test_resume import losses, wait_for
from test_trainer import ROOT

STEPS = 8
BASE = os.path.join(ROOT, "assets", "lab", "base")


def command(workdir, *overrides):
    return [sys.executable, "-m", "coach_jax.main", "--config", "configs/default.py",
            "--workdir", str(workdir), "--config.adapter.kind=lora", "--config.adapter.rank=4",
            "--config.adapter.targets=q_proj,v_proj,down_proj", "--config.adapter.dropout=0.1",
            f"--config.train.steps={STEPS}",
            "--config.train.log_every=1", "--config.train.eval_every=0",
            "--config.eval.generate_examples=0", "--config.eval.reference=",
            "--config.eval.max_batches=2", "--config.checkpoint.every_steps=4",
            "--config.optimizer.learning_rate=5e-3", "--config.schedule.warmup_steps=2",
            "--config.data.workers=2", f"--config.data.cache_dir={workdir}/../cache",
            *overrides]


def run(workdir, *overrides, check=True):
    return test_resume.run(workdir, *overrides, check=check, make=command)


def eval_losses(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return {r["step"]: r["eval_loss"] for r in map(json.loads, f) if "eval_loss" in r}


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("lora") / "uninterrupted"
    result = run(workdir, "--config.export.merge_adapters=True")
    return workdir, result


def test_only_the_adapter_trains_and_is_checkpointed(lora_run):
    import orbax.checkpoint as ocp
    workdir, result = lora_run
    assert "trainable, 1,771,200 frozen" in result.stdout  # the lab base, all frozen
    manager = ocp.CheckpointManager(os.path.join(workdir, "checkpoints"),
                                    item_names=("state",))
    state = manager.restore(STEPS, args=ocp.args.Composite(
        state=ocp.args.StandardRestore()))["state"]
    paths = ["/".join(map(str, p)) for p in _paths(state["params"])]
    assert paths and all(p.endswith(("lora_a", "lora_b")) for p in paths)
    assert {p.split("/")[-2] for p in paths} == {"q_proj", "v_proj", "down_proj"}
    losses_ = [loss for _, loss in losses(workdir)]
    assert losses_[-1] < losses_[0]


def _paths(tree, prefix=()):
    if isinstance(tree, dict):
        for k, v in tree.items():
            yield from _paths(v, prefix + (k,))
    else:
        yield prefix


def test_exports_load_in_peft_and_transformers_alike(lora_run):
    """DIR/export is a PEFT adapter folder (with the tokenizer); DIR/export_merged, the
    base with it folded in, gives PEFT's logits in plain transformers."""
    workdir, _ = lora_run
    export = os.path.join(workdir, "export")
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json",
            "generation_config.json"} <= set(os.listdir(export))
    config = json.load(open(os.path.join(export, "adapter_config.json")))
    assert config["target_modules"] == ["down_proj", "q_proj", "v_proj"]
    assert config["base_model_name_or_path"] == os.path.abspath(BASE)
    tokens = torch.as_tensor(np.random.RandomState(0).randint(0, 200, (2, 20)))
    base = transformers.AutoModelForCausalLM.from_pretrained(BASE, attn_implementation="eager")
    with torch.no_grad():
        before = base(tokens).logits.numpy()
        with_adapter = peft.PeftModel.from_pretrained(base, export)(tokens).logits.numpy()
        merged = transformers.AutoModelForCausalLM.from_pretrained(
            os.path.join(workdir, "export_merged"), attn_implementation="eager")(tokens)
    assert np.abs(with_adapter - before).max() > 1e-3  # the adapter learned something
    assert np.abs(merged.logits.numpy() - with_adapter).max() <= 1e-4


def test_kill_9_then_resume_gives_the_uninterrupted_run(lora_run):
    reference, _ = lora_run
    workdir = reference.parent / "killed"
    process = subprocess.Popen(command(workdir, "--config.export.merge_adapters=True"),
                               cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    wait_for(process, "step 6/8")
    process.kill()
    process.wait()
    resumed = run(workdir, "--config.export.merge_adapters=True")
    assert f"resumed from step 4 in {workdir}/checkpoints" in resumed.stdout
    assert losses(workdir) == losses(reference)  # bitwise, step by step
    a = load_file(os.path.join(workdir, "export", "adapter_model.safetensors"))
    b = load_file(os.path.join(reference, "export", "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_resuming_on_another_base_is_refused(lora_run, tmp_path):
    reference, _ = lora_run
    workdir = tmp_path / "run"
    shutil.copytree(reference / "checkpoints", workdir / "checkpoints")
    other = tmp_path / "other_base"
    shutil.copytree(BASE, other)
    weights = load_file(os.path.join(other, "model.safetensors"))
    weights["model.norm.weight"] = weights["model.norm.weight"] * 1.5
    save_file(weights, os.path.join(other, "model.safetensors"), metadata={"format": "pt"})
    result = run(workdir, f"--config.model.hf_path={other}", check=False)
    assert result.returncode != 0
    assert "holds checkpoints of a different run (model.base: " in result.stderr


def test_training_continues_from_an_adapter_folder(lora_run, tmp_path):
    """adapter.init_from: the step-0 eval of the new run is the old run's last."""
    reference, _ = lora_run
    workdir = tmp_path / "continued"
    run(workdir, f"--config.adapter.init_from={reference}/export", "--config.train.steps=2")
    assert eval_losses(workdir)[0] == eval_losses(reference)[STEPS]
    result = run(tmp_path / "mismatch", f"--config.adapter.init_from={reference}/export",
                 "--config.adapter.rank=8", check=False)
    assert result.returncode != 0
    assert "adapter.rank: the folder has 4, the config 8" in result.stderr


def test_a_qlora_run_merges_into_the_full_precision_base(tmp_path):
    """An NF4 base under LoRA trains, and its merged export folds the adapter into the
    checkpoint's own float weights: plain transformers gives what PEFT gives with the
    adapter on the original base (folding into the dequantized weights would be off by
    the quantization error)."""
    workdir = tmp_path / "qlora"
    result = run(workdir, "--config.adapter.quantize_base=nf4",
                 "--config.adapter.quantize_block=32", "--config.export.merge_adapters=True",
                 "--config.train.steps=4", "--config.checkpoint.every_steps=0")
    assert "1,771,200 frozen (the base, its projections in nf4 blocks of 32" in result.stdout
    tokens = torch.as_tensor(np.random.RandomState(0).randint(0, 200, (2, 20)))
    base = transformers.AutoModelForCausalLM.from_pretrained(BASE, attn_implementation="eager")
    with torch.no_grad():
        with_adapter = peft.PeftModel.from_pretrained(
            base, os.path.join(workdir, "export"))(tokens).logits.numpy()
        merged = transformers.AutoModelForCausalLM.from_pretrained(
            os.path.join(workdir, "export_merged"), attn_implementation="eager")(tokens)
    assert np.abs(merged.logits.numpy() - with_adapter).max() <= 1e-4
