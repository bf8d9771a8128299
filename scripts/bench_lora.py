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
import statistics
import subprocess
import sys

import machine

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_train_step import run_jax, run_torch  # noqa: E402

RANK = 16  # alpha 2 x rank = 32
IMPLS = ("jax_lora", "torch_peft", "jax_full")


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
        result = (run_torch(*common, lora_rank=RANK) if args.impl == "torch_peft"
                  else run_jax(*common, lora_rank=RANK if args.impl == "jax_lora" else 0))
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
        where = f"{machine.describe()}, CPU"
        versions = (f"jax {runs['jax_lora'][0]['jax']}, torch {runs['torch_peft'][0]['torch']}, "
                    f"peft {runs['torch_peft'][0]['peft']}")
        with open("docs/benchmarks.md", "a") as f:
            f.write(f"| {datetime.date.today()} | {where} | {median['jax_lora']:.0f} | "
                    f"{median['torch_peft']:.0f} | {summary['lora_over_peft']:.2f}x | "
                    f"{median['jax_full']:.0f} | {summary['lora_over_full']:.2f}x | {versions} | "
                    f"`python scripts/bench_lora.py --markdown` |\n")


if __name__ == "__main__":
    main()
