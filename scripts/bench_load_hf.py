"""Benchmark: `load_hf` time and peak host memory against the checkpoint's size on disk.

Builds a Llama-shaped checkpoint of a few hundred MB with transformers (once, cached in
--cache_dir), then loads it in a fresh process and reports wall time and peak RSS above
the process's RSS just before loading. Prints one JSON line per run; --markdown appends a
row to docs/benchmarks.md.

  python scripts/bench_load_hf.py --dtype float32
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys

import machine

_LOADER = r"""
import json, resource, sys, time
import jax, psutil
from coach_jax import models
folder, dtype = sys.argv[1], sys.argv[2]
jax.numpy.zeros(1).block_until_ready()  # backend up before the baseline
before = psutil.Process().memory_info().rss
start = time.perf_counter()
cfg, params = models.load_hf(folder, dtype=dtype)
jax.block_until_ready(params)
seconds = time.perf_counter() - start
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
param_bytes = sum(x.nbytes for x in jax.tree_util.tree_leaves(params))
print(json.dumps({"seconds": seconds, "rss_before": before, "peak_rss": peak,
                  "param_bytes": param_bytes}))
"""


def build_checkpoint(folder: str, layers: int) -> None:
    import torch
    import transformers
    config = transformers.LlamaConfig(
        vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=layers,
        num_attention_heads=16, num_key_value_heads=4, tie_word_embeddings=False)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(folder)


def disk_bytes(folder: str) -> int:
    return sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder)
               if f.endswith(".safetensors"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cache_dir", default=".bench/llama_load")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--markdown", action="store_true", help="append to docs/benchmarks.md")
    args = parser.parse_args()
    if not os.path.isfile(os.path.join(args.cache_dir, "model.safetensors")):
        build_checkpoint(args.cache_dir, args.layers)
    out = subprocess.run([sys.executable, "-c", _LOADER, args.cache_dir, args.dtype],
                         check=True, capture_output=True, text=True).stdout
    result = json.loads(out.strip().splitlines()[-1])
    on_disk = disk_bytes(args.cache_dir)
    result.update(
        on_disk=on_disk, load_dtype=args.dtype,
        peak_over_before=result["peak_rss"] - result["rss_before"],
        ratio_to_disk=(result["peak_rss"] - result["rss_before"]) / on_disk,
        mb_per_s=on_disk / result["seconds"] / 1e6)
    print(json.dumps(result))
    if args.markdown:
        mb = 1e6
        row = (f"| {datetime.date.today()} | {machine.describe()}, CPU | "
               f"{on_disk / mb:.0f} MB fp32 on disk -> {args.dtype} | {result['seconds']:.2f} s "
               f"({result['mb_per_s']:.0f} MB/s) | {result['peak_over_before'] / mb:.0f} MB "
               f"({result['ratio_to_disk']:.2f}x disk) | `python scripts/bench_load_hf.py "
               f"--dtype {args.dtype} --markdown` |\n")
        with open("docs/benchmarks.md", "a") as f:
            f.write(row)


if __name__ == "__main__":
    main()
