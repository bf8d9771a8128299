"""Benchmark: a LoRA train step of coach_jax against Hugging Face PyTorch + PEFT, and
against coach_jax's full fine-tuning step, at the step-4 shape (scripts/bench_train_step.py).

LoRA rank 16, alpha 32, on every projection; AdamW (weight decay 0.01) over the adapter
only; fp32; half of each row supervised. Each implementation runs in its own fresh
process; the three alternate for `--rounds` rounds, and the medians are compared.

  python scripts/bench_lora.py --markdown
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_train_step import SHAPE, _timed  # noqa: E402

RANK, ALPHA = 16, 32.0
IMPLS = ("jax_lora", "torch_peft", "jax_full")


def run_jax(batch: int, seq: int, warmup: int, steps: int, lora: bool) -> dict:
    import dataclasses
    import jax
    import numpy as np
    from coach_jax import adapters, models, train
    from coach_jax.models.lora import LoraSpec, is_adapter_path
    cfg = models.ModelConfig(model_type="llama", vocab_size=SHAPE["vocab"],
                             hidden_size=SHAPE["d"], intermediate_size=SHAPE["ff"],
                             num_layers=SHAPE["layers"], num_heads=SHAPE["heads"],
                             num_kv_heads=SHAPE["kv"], head_dim=SHAPE["d"] // SHAPE["heads"],
                             rms_norm_eps=1e-5, max_position_embeddings=2048)
    params = models.init(cfg, seed=0)
    base = None
    if lora:
        cfg = dataclasses.replace(cfg, projection="lora", lora=LoraSpec(
            RANK, ALPHA, adapters.resolve(cfg, "all-linear")[0]))
        base, params = params, models.init(cfg, 0, only=is_adapter_path)
    optimizer = train.OptimizerConfig("adamw", 1e-4, hparams=dict(weight_decay=0.01),
                                      grad_clip_norm=None,
                                      schedule=train.ScheduleConfig("constant"))
    state, step_config, parts = train.setup(cfg, params, optimizer, train.ParamGroups(), 10**6)
    step = train.compile_train_step(step_config, parts)
    rng = np.random.default_rng(1)
    tokens = rng.integers(0, SHAPE["vocab"], (batch, seq + 1)).astype(np.int32)
    loss_mask = np.zeros((batch, seq), np.int32)
    loss_mask[:, seq // 2:] = 1
    data = jax.device_put({"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
                           "loss_mask": loss_mask, "segment_ids": np.ones((batch, seq), np.int32),
                           "positions": np.tile(np.arange(seq, dtype=np.int32), (batch, 1)),
                           "source_ids": np.zeros((batch, seq), np.int32)})
    holder = {"state": state}

    def one():
        holder["state"], metrics = step(holder["state"], data, base)
        return metrics["loss"]
    return {"jax": jax.__version__, **_timed(one, warmup, steps,
                                              lambda x: x.block_until_ready())}


def run_torch_peft(batch: int, seq: int, warmup: int, steps: int) -> dict:
    import peft
    import torch
    import transformers
    config = transformers.LlamaConfig(
        vocab_size=SHAPE["vocab"], hidden_size=SHAPE["d"], intermediate_size=SHAPE["ff"],
        num_hidden_layers=SHAPE["layers"], num_attention_heads=SHAPE["heads"],
        num_key_value_heads=SHAPE["kv"], max_position_embeddings=2048, rms_norm_eps=1e-5,
        tie_word_embeddings=False, use_cache=False)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    model = peft.get_peft_model(model, peft.LoraConfig(
        r=RANK, lora_alpha=ALPHA, target_modules="all-linear", lora_dropout=0.0,
        task_type="CAUSAL_LM"))
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad],
                                  lr=1e-4, weight_decay=0.01)
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(0, SHAPE["vocab"], (batch, seq), generator=generator)
    labels = ids.clone()
    labels[:, : seq // 2] = -100

    def one():
        loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()
    return {"torch": torch.__version__, "peft": peft.__version__,
            **_timed(one, warmup, steps, lambda x: x.item())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--impl", choices=IMPLS, help="run one implementation")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--markdown", action="store_true", help="append to docs/benchmarks.md")
    args = parser.parse_args()
    common = (args.batch, args.seq, args.warmup, args.steps)
    if args.impl:
        result = (run_torch_peft(*common) if args.impl == "torch_peft"
                  else run_jax(*common, lora=args.impl == "jax_lora"))
        result.update(impl=args.impl, tokens_per_s=args.batch * args.seq
                      / result["step_s_median"])
        print(json.dumps(result))
        return
    runs: dict[str, list[dict]] = {impl: [] for impl in IMPLS}
    for _ in range(args.rounds):
        for impl in IMPLS:
            out = subprocess.run([sys.executable, __file__, "--impl", impl, "--batch",
                                  str(args.batch), "--seq", str(args.seq), "--warmup",
                                  str(args.warmup), "--steps", str(args.steps)],
                                 check=True, capture_output=True, text=True).stdout
            runs[impl].append(json.loads(out.strip().splitlines()[-1]))
            print(json.dumps(runs[impl][-1]), flush=True)
    median = {impl: statistics.median(r["tokens_per_s"] for r in rs) for impl, rs in runs.items()}
    summary = {"lora_over_peft": median["jax_lora"] / median["torch_peft"],
               "lora_over_full": median["jax_lora"] / median["jax_full"], **median}
    print(json.dumps(summary))
    if args.markdown:
        machine = f"{platform.machine()}, {os.cpu_count()} cores, CPU"
        versions = (f"jax {runs['jax_lora'][0]['jax']}, torch {runs['torch_peft'][0]['torch']}, "
                    f"peft {runs['torch_peft'][0]['peft']}")
        with open("docs/benchmarks.md", "a") as f:
            f.write(f"| {datetime.date.today()} | {machine} | {median['jax_lora']:.0f} | "
                    f"{median['torch_peft']:.0f} | {summary['lora_over_peft']:.2f}x | "
                    f"{median['jax_full']:.0f} | {summary['lora_over_full']:.2f}x | {versions} | "
                    f"`python scripts/bench_lora.py --markdown` |\n")


if __name__ == "__main__":
    main()
