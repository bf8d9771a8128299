"""Benchmark: the full data pipeline (encode -> cache -> shuffle -> pack -> batch) in one
process: batches/s, tokens/s and packing efficiency, cold (encoding into an empty cache)
and warm (from the cache), packed against one example per row.

  python scripts/bench_pipeline.py --data ../shared/realworld/data/alpaca_en_demo.json \
      --tokenizer ../shared/realworld/tokenizers/mistral-7b-instruct-v0.3 --markdown
"""

from __future__ import annotations

import argparse
import datetime
import json
import tempfile
import time

import machine


from coach_jax import data
from coach_jax.data.pipeline import Pipeline, PipelineConfig, SourceConfig


def measure(config: PipelineConfig, tokenizer) -> dict[str, float]:
    start = time.perf_counter()
    pipeline = Pipeline(config, tokenizer)
    batches = real = positions = 0
    for batch in pipeline:
        batches += 1
        real += int((batch["segment_ids"] > 0).sum())
        positions += batch["segment_ids"].size
    seconds = time.perf_counter() - start
    return {"batches": batches, "seconds": seconds, "batches_per_s": batches / seconds,
            "tokens_per_s": real / seconds, "packing_efficiency": real / positions,
            "from_cache": pipeline.sources[0].from_cache}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--tokenizer", required=True)
    parser.add_argument("--max_seq_len", type=int, default=2048)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--markdown", action="store_true", help="append to docs/benchmarks.md")
    args = parser.parse_args()
    tokenizer = data.load_tokenizer(args.tokenizer)
    cache_dir = tempfile.mkdtemp(prefix="coach_jax_bench_cache-")
    base = dict(sources=(SourceConfig("bench", args.data),), max_seq_len=args.max_seq_len,
                batch_size=args.batch_size, cache_dir=cache_dir)
    results = {
        # One epoch into an empty cache: encoding included.
        "cold, packed, 1 epoch": measure(PipelineConfig(**base, epochs=1), tokenizer),
        "warm, packed": measure(PipelineConfig(**base, steps=args.steps), tokenizer),
        "warm, one example per row": measure(
            PipelineConfig(**base, steps=args.steps, packing="none"), tokenizer),
    }
    for name, result in results.items():
        print(json.dumps({"run": name, **result}))
    if args.markdown:
        where = machine.describe()
        command = (f"`python scripts/bench_pipeline.py --data {args.data} --tokenizer "
                   f"{args.tokenizer}`")
        with open("docs/benchmarks.md", "a") as f:
            for name, r in results.items():
                f.write(f"| {datetime.date.today()} | {where} | {name} | {r['batches']} | "
                        f"{r['batches_per_s']:.1f} | {r['tokens_per_s'] / 1e3:.0f}k | "
                        f"{r['packing_efficiency']:.1%} | {command} |\n")


if __name__ == "__main__":
    main()
