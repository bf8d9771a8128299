"""Benchmark: tokens/s of coach_jax's full train_step against the equivalent Hugging Face
PyTorch step (LlamaForCausalLM, sdpa attention, torch.optim.AdamW), same shape, same
machine, one run. Each implementation runs in its own fresh process.

  python scripts/bench_train_step.py --markdown
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import subprocess
import sys
import time

import machine

SHAPE = dict(vocab=8192, d=256, layers=4, heads=8, kv=4, ff=688)
MOE = dict(experts=8, top_k=2, expert_ff=344)


def _timed(step, warmup: int, steps: int, sync) -> dict[str, float]:
    for _ in range(warmup):
        sync(step())
    synced = []
    for _ in range(steps):
        start = time.perf_counter()
        sync(step())
        synced.append(time.perf_counter() - start)
    start = time.perf_counter()
    for _ in range(steps):
        out = step()
    sync(out)
    return {"step_s_median": statistics.median(synced),
            "step_s_pipelined": (time.perf_counter() - start) / steps}


def run_jax(batch: int, seq: int, warmup: int, steps: int, lora_rank: int = 0,
            moe: bool = False) -> dict:
    """`lora_rank`: train a LoRA adapter (alpha 2 x rank, every projection) instead."""
    import dataclasses
    import jax
    import numpy as np
    from coach_jax import adapters, models, train
    from coach_jax.models.config import MoeSpec
    from coach_jax.models.lora import LoraSpec, is_adapter_path
    experts = dict(model_type="mixtral", intermediate_size=MOE["expert_ff"],
                   feed_forward=("moe",) * SHAPE["layers"],
                   moe=MoeSpec(MOE["experts"], MOE["top_k"], MOE["expert_ff"], True)) \
        if moe else dict(model_type="llama", intermediate_size=SHAPE["ff"])
    cfg = models.ModelConfig(vocab_size=SHAPE["vocab"], hidden_size=SHAPE["d"],
                             num_layers=SHAPE["layers"], num_heads=SHAPE["heads"],
                             num_kv_heads=SHAPE["kv"], head_dim=SHAPE["d"] // SHAPE["heads"],
                             rms_norm_eps=1e-5, max_position_embeddings=2048, **experts)
    params = models.init(cfg, seed=0)
    base = None
    if lora_rank:
        cfg = dataclasses.replace(cfg, projection="lora", lora=LoraSpec(
            lora_rank, 2.0 * lora_rank, adapters.resolve(cfg, "all-linear")[0]))
        base, params = params, models.init(cfg, 0, only=is_adapter_path)
    optimizer = train.OptimizerConfig("adamw", 1e-4, hparams=dict(weight_decay=0.01),
                                      grad_clip_norm=None,
                                      schedule=train.ScheduleConfig("constant"))
    state, step_config, parts = train.setup(cfg, params, optimizer, train.ParamGroups(), 10**6)
    step = train.compile_train_step(step_config, parts)
    rng = np.random.default_rng(1)
    tokens = rng.integers(0, SHAPE["vocab"], (batch, seq + 1)).astype(np.int32)
    loss_mask = np.zeros((batch, seq), np.int32)
    loss_mask[:, seq // 2:] = 1  # prompt half masked, as in SFT
    data = jax.device_put({"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
                           "loss_mask": loss_mask, "segment_ids": np.ones((batch, seq), np.int32),
                           "positions": np.tile(np.arange(seq, dtype=np.int32), (batch, 1)),
                           "source_ids": np.zeros((batch, seq), np.int32)})
    holder = {"state": state}

    def one():
        holder["state"], metrics = step(holder["state"], data, base)
        return metrics["loss"]
    result = _timed(one, warmup, steps, lambda x: x.block_until_ready())
    return {"impl": "coach_jax", "jax": jax.__version__, **result}


def run_torch(batch: int, seq: int, warmup: int, steps: int, lora_rank: int = 0,
              moe: bool = False) -> dict:
    """`lora_rank`: wrapped by PEFT with that LoRA (alpha 2 x rank, all-linear)."""
    import torch
    import transformers
    common = dict(vocab_size=SHAPE["vocab"], hidden_size=SHAPE["d"],
                  num_hidden_layers=SHAPE["layers"], num_attention_heads=SHAPE["heads"],
                  num_key_value_heads=SHAPE["kv"], max_position_embeddings=2048,
                  rms_norm_eps=1e-5, tie_word_embeddings=False, use_cache=False)
    config = (transformers.MixtralConfig(**common, intermediate_size=MOE["expert_ff"],
                                         num_local_experts=MOE["experts"],
                                         num_experts_per_tok=MOE["top_k"]) if moe
              else transformers.LlamaConfig(**common, intermediate_size=SHAPE["ff"]))
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    versions = {"torch": torch.__version__}
    if lora_rank:
        import peft
        model = peft.get_peft_model(model, peft.LoraConfig(
            r=lora_rank, lora_alpha=2.0 * lora_rank, target_modules="all-linear",
            lora_dropout=0.0, task_type="CAUSAL_LM"))
        versions["peft"] = peft.__version__
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
    result = _timed(one, warmup, steps, lambda x: x.item())
    return {"impl": "hf_torch", **versions, **result}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--impl", choices=("jax", "torch"), help="run one implementation")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--markdown", action="store_true", help="append to docs/benchmarks.md")
    parser.add_argument("--moe", action="store_true", help="the mixture-of-experts shape")
    args = parser.parse_args()
    common = (args.batch, args.seq, args.warmup, args.steps)
    if args.impl:
        result = (run_jax if args.impl == "jax" else run_torch)(*common, moe=args.moe)
        result["tokens_per_s"] = args.batch * args.seq / result["step_s_median"]
        print(json.dumps(result))
        return
    results = {}
    for impl in ("jax", "torch"):
        out = subprocess.run([sys.executable, __file__, "--impl", impl, "--batch",
                              str(args.batch), "--seq", str(args.seq), "--warmup",
                              str(args.warmup), "--steps", str(args.steps)]
                             + ["--moe"] * args.moe,
                             check=True, capture_output=True, text=True).stdout
        results[impl] = json.loads(out.strip().splitlines()[-1])
        print(json.dumps(results[impl]))
    ratio = results["jax"]["tokens_per_s"] / results["torch"]["tokens_per_s"]
    print(json.dumps({"coach_jax_over_torch": ratio, "machine": machine.describe()}))
    if args.markdown:
        where = f"{machine.describe()}, CPU"
        with open("docs/benchmarks.md", "a") as f:
            f.write(f"| {datetime.date.today()} | {where} | "
                    f"{results['jax']['tokens_per_s']:.0f} | "
                    f"{results['torch']['tokens_per_s']:.0f} | {ratio:.2f}x | "
                    f"jax {results['jax']['jax']}, torch {results['torch']['torch']} | "
                    f"`python scripts/bench_train_step.py --markdown` |\n")


if __name__ == "__main__":
    main()
