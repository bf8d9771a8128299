"""Benchmark: chat encoding throughput (read + normalise + render + tokenize + mask) in one
process, in tokens per second.

  python scripts/bench_encoding.py \
      --data ../shared/realworld/data/alpaca_en_demo.json \
      --tokenizer ../shared/realworld/tokenizers/mistral-7b-instruct-v0.3 --markdown
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time

import machine

from coach_jax import data


def run_once(path: str, tokenizer) -> tuple[int, int, float]:
    start = time.perf_counter()
    tokens = examples = 0
    options = data.EncodeOptions(max_seq_len=1 << 20)
    for example in data.encode_all(data.iter_examples(path), tokenizer, options):
        tokens += len(example.input_ids)
        examples += 1
    return tokens, examples, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--tokenizer", required=True)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--markdown", action="store_true", help="append to docs/benchmarks.md")
    args = parser.parse_args()
    tokenizer = data.load_tokenizer(args.tokenizer)
    run_once(args.data, tokenizer)  # warm-up: template compile, layout probe
    runs = [run_once(args.data, tokenizer) for _ in range(args.repeats)]
    tokens, examples, seconds = min(runs, key=lambda r: r[2])
    result = {"tokens": tokens, "examples": examples, "seconds": seconds,
              "tokens_per_s": tokens / seconds, "examples_per_s": examples / seconds}
    print(json.dumps(result))
    if args.markdown:
        row = (f"| {datetime.date.today()} | {machine.describe()}, "
               f"Python {sys.version.split()[0]} | {os.path.basename(args.data)}, "
               f"{os.path.basename(args.tokenizer.rstrip('/'))} | {examples} examples, "
               f"{tokens} tokens | {result['tokens_per_s'] / 1e3:.0f}k tokens/s "
               f"({result['examples_per_s']:.0f} examples/s) | `python "
               f"scripts/bench_encoding.py --data {args.data} --tokenizer {args.tokenizer}` |\n")
        with open("docs/benchmarks.md", "a") as f:
            f.write(row)


if __name__ == "__main__":
    main()
