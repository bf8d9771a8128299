"""Runs the data pipeline in a fresh process for resume tests.

  python pipeline_process.py CONFIG.json OUT.npz [--skip K --save STATE.json]
                                                  [--restore STATE.json] --take M

Writes the M batches it produced to OUT.npz.
"""

import argparse
import json

import numpy as np
from absl import flags

from coach_jax import data
from coach_jax.data.pipeline import Pipeline, PipelineConfig, SourceConfig


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("config")
    parser.add_argument("out")
    parser.add_argument("--skip", type=int, default=0)
    parser.add_argument("--save")
    parser.add_argument("--restore")
    parser.add_argument("--take", type=int, required=True)
    args = parser.parse_args()
    flags.FLAGS.mark_as_parsed()  # grain's worker processes read absl flags
    with open(args.config) as f:
        spec = json.load(f)
    tokenizer = data.load_tokenizer(spec.pop("tokenizer"))
    sources = tuple(SourceConfig(**s) for s in spec.pop("sources"))
    iterator = iter(Pipeline(PipelineConfig(sources=sources, **spec), tokenizer))
    if args.restore:
        with open(args.restore) as f:
            iterator.set_state(json.load(f))
    for _ in range(args.skip):
        next(iterator)
    if args.save:
        with open(args.save, "w") as f:
            json.dump(iterator.get_state(), f)
    batches = [next(iterator) for _ in range(args.take)]
    np.savez(args.out, **{f"{i}/{k}": v for i, b in enumerate(batches) for k, v in b.items()})


if __name__ == "__main__":
    main()
