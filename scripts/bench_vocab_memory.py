"""Benchmark: the memory of one train step at Gemma 3's vocabulary (262,144) with and without
the chunked LM head + cross-entropy (`train.chunk_tokens`), from XLA's own accounting of
the compiled step (`memory_analysis()`: arguments, outputs and temporaries), so it needs no
accelerator and does not depend on allocator timing.

  python scripts/bench_vocab_memory.py --markdown
"""

from __future__ import annotations

import argparse
import datetime
import platform

import jax
import numpy as np

from coach_jax import models, train
from coach_jax.train.loss import CHUNK_TOKENS, LossConfig

SHAPE = dict(vocab=262144, hidden=512, layers=2, heads=4, kv=2, head_dim=128, ff=1024)
GIB = 1024 ** 3


def step_memory(chunk_tokens: int, batch: int, seq: int) -> dict[str, float]:
    """Bytes XLA plans for one compiled train step (fp32 params, AdamW)."""
    cfg = models.ModelConfig(
        model_type="gemma2", vocab_size=SHAPE["vocab"], hidden_size=SHAPE["hidden"],
        intermediate_size=SHAPE["ff"], num_layers=SHAPE["layers"], num_heads=SHAPE["heads"],
        num_kv_heads=SHAPE["kv"], head_dim=SHAPE["head_dim"], tie_word_embeddings=True,
        norm_unit_offset=True, sandwich_norms=True, scale_embeddings=True,
        activation="gelu_pytorch_tanh", query_pre_attn_scalar=SHAPE["head_dim"],
        final_logit_softcapping=30.0, layer_windows=(seq // 2, 0))
    params = models.init(cfg, seed=0)
    optimizer = train.OptimizerConfig("adamw", 1e-4, grad_clip_norm=1.0,
                                      schedule=train.ScheduleConfig("constant"))
    state, step_config, parts = train.setup(cfg, params, optimizer, train.ParamGroups(), 100,
                                            loss=LossConfig(chunk_tokens=chunk_tokens))
    step = train.compile_train_step(step_config, parts)
    tokens = np.random.default_rng(0).integers(0, SHAPE["vocab"], (batch, seq + 1))
    batch_arrays = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
                    "loss_mask": np.ones((batch, seq)), "segment_ids": np.ones((batch, seq)),
                    "positions": np.tile(np.arange(seq), (batch, 1)),
                    "source_ids": np.zeros((batch, seq))}
    batch_arrays = {k: v.astype(np.int32) for k, v in batch_arrays.items()}
    analysis = step.lower(state, batch_arrays).compile().memory_analysis()
    return {"arguments": analysis.argument_size_in_bytes,
            "outputs": analysis.output_size_in_bytes,
            "temporaries": analysis.temp_size_in_bytes,
            "peak": (analysis.argument_size_in_bytes + analysis.output_size_in_bytes
                     + analysis.temp_size_in_bytes - analysis.alias_size_in_bytes)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--markdown", action="store_true")
    args = parser.parse_args()
    rows = {chunk: step_memory(chunk, args.batch, args.seq) for chunk in (0, CHUNK_TOKENS)}
    for chunk, row in rows.items():
        print(f"chunk_tokens={chunk}: " + ", ".join(f"{k} {v / GIB:.2f} GiB"
                                                     for k, v in row.items()))
    if args.markdown:
        whole, chunked = rows[0], rows[CHUNK_TOKENS]
        shape = (f"vocab {SHAPE['vocab']:,}, hidden {SHAPE['hidden']}, {SHAPE['layers']} layers, "
                 f"{args.batch} x {args.seq} tokens, fp32, AdamW")
        print(f"| {datetime.date.today()} | {platform.machine()}, {jax.default_backend()} | "
              f"{shape} | {whole['temporaries'] / GIB:.2f} GiB temporaries, "
              f"{whole['peak'] / GIB:.2f} GiB in all | {chunked['temporaries'] / GIB:.2f} GiB "
              f"temporaries, {chunked['peak'] / GIB:.2f} GiB in all | "
              f"`python scripts/bench_vocab_memory.py --markdown` |")


if __name__ == "__main__":
    main()
