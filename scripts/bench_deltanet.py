"""Benchmark: the chunked gated delta rule (Qwen3.5's linear attention), forward and
backward, in coach_jax against transformers' torch path (`torch_chunk_gated_delta_rule`,
what runs without flash-linear-attention), on the same shape; and the compile time of a
48-layer Qwen3.5-shaped stack scanned in groups of four layers against unrolled.

Each rule runs in its own fresh process; they alternate for `--rounds` rounds and the
medians are compared. The compile rows build a train-step-like function (loss and
gradients of the whole stack) on a narrow 48-layer model: compile time follows the layer
count, not the widths.

  python scripts/bench_deltanet.py --markdown
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import time

import machine

IMPLS = ("jax", "torch")


def _inputs(batch, length, key_heads, value_heads, dim):
    import numpy as np
    rng = np.random.default_rng(0)
    normal = lambda *shape: rng.normal(size=shape).astype(np.float32)
    return (normal(batch, length, key_heads, dim), normal(batch, length, key_heads, dim),
            normal(batch, length, value_heads, dim),
            -0.3 * np.abs(normal(batch, length, value_heads)),
            1 / (1 + np.exp(-normal(batch, length, value_heads))))


def run_jax(shape, warmup, steps) -> float:
    """Seconds per forward + backward of the chunked rule (median of `steps`)."""
    import jax
    import jax.numpy as jnp
    from coach_jax.models import gated_deltanet as gd
    q, k, v, g, beta = _inputs(*shape)
    group = v.shape[2] // q.shape[2]

    def loss(q, k, v, g, beta):
        qn = jnp.repeat(gd.l2_normalize(q), group, axis=2) * q.shape[-1] ** -0.5
        kn = jnp.repeat(gd.l2_normalize(k), group, axis=2)
        out, _ = gd.chunked_delta_rule(qn, kn, v, g, beta, jnp.ones(g.shape[:2], jnp.int32))
        return jnp.sum(out * out)

    step = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3, 4)))
    args = [jnp.asarray(x) for x in (q, k, v, g, beta)]
    times = []
    for i in range(warmup + steps):
        start = time.perf_counter()
        jax.block_until_ready(step(*args))
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def run_torch(shape, warmup, steps) -> float:
    import torch
    from transformers.models.qwen3_5.modeling_qwen3_5 import torch_chunk_gated_delta_rule
    torch.set_num_threads(os.cpu_count())
    tensors = [torch.tensor(x, requires_grad=True) for x in _inputs(*shape)]
    times = []
    for i in range(warmup + steps):
        start = time.perf_counter()
        out, _ = torch_chunk_gated_delta_rule(*tensors[:3], g=tensors[3], beta=tensors[4],
                                              use_qk_l2norm_in_kernel=True)
        (out * out).sum().backward()
        if i >= warmup:
            times.append(time.perf_counter() - start)
        for t in tensors:
            t.grad = None
    return statistics.median(times)


def compile_seconds(scan: bool, layers: int = 48) -> float:
    """Seconds to lower and compile loss + gradients of a narrow Qwen3.5-shaped stack
    (three DeltaNet layers to one attention layer)."""
    import jax
    import jax.numpy as jnp
    from coach_jax import models
    hf = dict(model_type="qwen3_5_text", vocab_size=256, hidden_size=64,
              intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
              num_key_value_heads=2, head_dim=16, linear_key_head_dim=16,
              linear_value_head_dim=16, linear_num_key_heads=2, linear_num_value_heads=4)
    cfg = models.ModelConfig.from_hf_dict(hf, scan_layers=scan)
    params = models.param_shapes(cfg)
    tokens = jax.ShapeDtypeStruct((1, 128), jnp.int32)

    def loss(params, tokens):
        return jnp.mean(models.hidden_states(cfg, params, tokens) ** 2)

    start = time.perf_counter()
    jax.jit(jax.grad(loss)).lower(params, tokens).compile()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--impl", choices=IMPLS + ("compile_scan", "compile_unrolled"))
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--key-heads", type=int, default=4)
    parser.add_argument("--value-heads", type=int, default=8)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--markdown", action="store_true", help="append to docs/benchmarks.md")
    args = parser.parse_args()
    shape = (args.batch, args.seq, args.key_heads, args.value_heads, args.dim)
    if args.impl in IMPLS:
        run = run_jax if args.impl == "jax" else run_torch
        print(json.dumps({"seconds": run(shape, args.warmup, args.steps)}))
        return
    if args.impl:
        print(json.dumps({"seconds": compile_seconds(args.impl == "compile_scan")}))
        return

    def fresh(impl: str, *extra: str) -> float:
        out = subprocess.run([sys.executable, __file__, "--impl", impl, *extra],
                             check=True, capture_output=True, text=True).stdout
        return json.loads(out.strip().splitlines()[-1])["seconds"]

    flags = ["--batch", str(args.batch), "--seq", str(args.seq), "--key-heads",
             str(args.key_heads), "--value-heads", str(args.value_heads), "--dim",
             str(args.dim), "--warmup", str(args.warmup), "--steps", str(args.steps)]
    runs = {impl: [] for impl in IMPLS + ("compile_scan", "compile_unrolled")}
    for _ in range(args.rounds):
        for impl in IMPLS:
            runs[impl].append(fresh(impl, *flags))
    for impl in ("compile_scan", "compile_unrolled"):
        runs[impl].append(fresh(impl))
    medians = {impl: statistics.median(t) for impl, t in runs.items()}
    tokens = args.batch * args.seq
    print(json.dumps({"tokens_per_s": {i: tokens / medians[i] for i in IMPLS},
                      "compile_s": {i: medians[i] for i in ("compile_scan",
                                                            "compile_unrolled")}, "runs": runs},
                     indent=1))
    if args.markdown:
        import jax
        import torch
        import transformers
        date = datetime.date.today().isoformat()
        versions = (f"jax {jax.__version__}, torch {torch.__version__}, "
                    f"transformers {transformers.__version__}")
        jax_rate, torch_rate = tokens / medians["jax"], tokens / medians["torch"]
        rounds = ", ".join(f"{tokens / a:.0f} / {tokens / b:.0f}"
                           for a, b in zip(runs["jax"], runs["torch"]))
        row = (f"| {date} | {machine.describe()}, CPU | {jax_rate:.0f} | {torch_rate:.0f} | "
               f"{jax_rate / torch_rate:.2f}x | {medians['compile_scan']:.1f} s | "
               f"{medians['compile_unrolled']:.1f} s | {versions} | "
               f"`python scripts/bench_deltanet.py` (runs: {rounds}) |\n")
        path = os.path.join(os.path.dirname(__file__), "..", "docs", "benchmarks.md")
        with open(path, "a") as f:
            f.write(row)
        print(row)


if __name__ == "__main__":
    main()
