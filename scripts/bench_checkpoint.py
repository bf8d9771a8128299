"""Benchmark: how long an async checkpoint save blocks the training loop, against the step.

Builds a Llama-shaped model with AdamW state of about --gib GiB, times one train step, then
times `Checkpointer.save` (the part the loop waits for) and the whole save until it is on
disk. Prints one JSON line; --markdown appends a row to docs/benchmarks.md.

  python scripts/bench_checkpoint.py --markdown
"""

from __future__ import annotations

import argparse
import datetime
import json
import tempfile
import time

import machine

import jax
import numpy as np

from coach_jax import models, train
from coach_jax.checkpoint import Checkpointer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--markdown", action="store_true")
    args = parser.parse_args()
    cfg = models.ModelConfig(model_type="llama", vocab_size=32000, hidden_size=1024,
                             intermediate_size=2816, num_layers=args.layers, num_heads=16,
                             num_kv_heads=4, head_dim=64)
    params = models.init(cfg, 0)
    optimizer = train.OptimizerConfig("adamw", 1e-4, schedule=train.ScheduleConfig("constant"))
    state, step_config, parts = train.setup(cfg, params, optimizer, train.ParamGroups(), 100)
    state_bytes = sum(x.nbytes for x in jax.tree.leaves(state))
    rows, seq = 1, 128
    tokens = np.random.default_rng(0).integers(0, 32000, (rows, seq + 1)).astype(np.int32)
    batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
             "loss_mask": np.ones((rows, seq), np.int32),
             "segment_ids": np.ones((rows, seq), np.int32),
             "positions": np.arange(seq, dtype=np.int32)[None], "source_ids":
             np.zeros((rows, seq), np.int32)}
    step = train.compile_train_step(step_config, parts)
    state, metrics = step(state, batch)
    jax.block_until_ready(metrics)
    start = time.perf_counter()
    state, metrics = step(state, batch)
    jax.block_until_ready(metrics)
    step_s = time.perf_counter() - start
    with tempfile.TemporaryDirectory() as directory:
        checkpoints = Checkpointer(directory, every_steps=1, keep=2)
        start = time.perf_counter()
        checkpoints.save(1, state, {"batches": 1}, {"model": {}})
        blocking_s = time.perf_counter() - start
        checkpoints.manager.wait_until_finished()
        total_s = time.perf_counter() - start
        checkpoints.close()
    result = {"state_gib": state_bytes / 2**30, "step_s": step_s, "save_blocking_s": blocking_s,
              "save_total_s": total_s}
    print(json.dumps(result))
    if args.markdown:
        with open("docs/benchmarks.md", "a") as f:
            f.write(f"| {datetime.date.today()} | {machine.describe()}, "
                    f"CPU | {result['state_gib']:.2f} GiB | {blocking_s:.2f} s | {total_s:.2f} s "
                    f"| {step_s:.2f} s | `python scripts/bench_checkpoint.py --markdown` |\n")


if __name__ == "__main__":
    main()
