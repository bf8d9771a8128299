"""Benchmark the full coach_jax train step on this machine's accelerator (or CPU).

Prints one JSON line: tokens/s (all positions and real tokens only), step time, MFU
against --peak_tflops, compile time, and peak memory (the device's own counter where it
has one, else XLA's compiled-memory analysis). Random tokens, either one example per row
(unpacked) or examples of realistic lengths packed into rows (--packed: log-normal
lengths with a median of 190 tokens, like alpaca's, packed first-fit).

  python scripts/benchmark.py --preset qwen0.5b --batch 8 --seq 2048 [--packed] \
      [--set model.remat=full --set train.chunk_tokens=0 ...]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time

import jax
import numpy as np

from coach_jax import models, parallel, train
from coach_jax.config import base_config

PRESETS = {  # the shapes of ../shared/bench (Llama architecture, untied head)
    "tiny": dict(vocab_size=8192, hidden_size=256, num_hidden_layers=4,
                 num_attention_heads=8, num_key_value_heads=4, intermediate_size=688),
    "qwen0.5b": dict(vocab_size=151936, hidden_size=896, num_hidden_layers=24,
                     num_attention_heads=14, num_key_value_heads=2, intermediate_size=4864),
    "llama1b": dict(vocab_size=128256, hidden_size=2048, num_hidden_layers=16,
                    num_attention_heads=32, num_key_value_heads=8, intermediate_size=8192),
    # Gemma 3 1B: its 262k vocabulary, 5 sliding (512) layers to 1 full, tied head.
    "gemma3_1b": dict(model_type="gemma3_text", vocab_size=262144, hidden_size=1152,
                      num_hidden_layers=26, num_attention_heads=4, num_key_value_heads=1,
                      intermediate_size=6912, head_dim=256, sliding_window=512,
                      tie_word_embeddings=True, max_position_embeddings=32768),
    # Qwen3.5-0.8B's shape: three Gated DeltaNet layers to one gated attention layer,
    # 248k vocabulary, tied head.
    "qwen3_5_0_8b": dict(model_type="qwen3_5_text", vocab_size=248320, hidden_size=1024,
                         num_hidden_layers=24, num_attention_heads=8, num_key_value_heads=2,
                         head_dim=256, intermediate_size=3584, linear_num_key_heads=16,
                         linear_num_value_heads=16, linear_key_head_dim=128,
                         linear_value_head_dim=128, tie_word_embeddings=True,
                         max_position_embeddings=32768),
    # Qwen3-30B-A3B's layer: 128 experts of width 768, top 8 (cut with --layers to fit).
    "qwen3_30b_a3b": dict(model_type="qwen3_moe", vocab_size=151936, hidden_size=2048,
                          num_hidden_layers=48, num_attention_heads=32, num_key_value_heads=4,
                          head_dim=128, intermediate_size=6144, moe_intermediate_size=768,
                          num_experts=128, num_experts_per_tok=8, norm_topk_prob=True,
                          max_position_embeddings=40960),
}
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}


def step_flops(cfg: models.ModelConfig, rows: int, seq: int) -> float:
    """6 x matmul params x tokens + causal attention (as ../shared/bench counts it); a
    mixture of experts counts the experts each token passes; a Gated DeltaNet layer its
    projections and its chunked rule (per value head and token, 4 products of a chunk
    row with keys or values and 2 with the state: 6 x 2 x (2C(K + V) + 2KV))."""
    from coach_jax.models.gated_deltanet import CHUNK_SIZE
    d = cfg.hidden_size
    q_width = cfg.num_heads * cfg.head_dim * (2 if cfg.attention_output_gate else 1)
    projections = {"attention": d * q_width + d * cfg.num_heads * cfg.head_dim
                   + 2 * d * cfg.num_kv_heads * cfg.head_dim}
    mixing = {"attention": 12 * d * seq / 2}  # causal scores and values, per token
    if cfg.deltanet is not None:
        spec = cfg.deltanet
        projections["gated_deltanet"] = d * (2 * spec.key_dim + 2 * spec.value_dim
                                             + 2 * spec.num_value_heads) + spec.value_dim * d
        mixing["gated_deltanet"] = 12 * spec.num_value_heads * (
            2 * CHUNK_SIZE * (spec.key_head_dim + spec.value_head_dim)
            + 2 * spec.key_head_dim * spec.value_head_dim)
    mlps = {"mlp": 3 * d * cfg.intermediate_size}
    if cfg.moe is not None:  # the experts a token passes, its shared expert, the router
        mlps["moe"] = 3 * d * (cfg.moe.top_k * cfg.moe.expert_size
                               + cfg.moe.shared_expert_size) + d * cfg.moe.num_experts
    matmul = sum(projections[mixer] + mlps[kind] for mixer, kind in cfg.layer_kinds)
    matmul += d * cfg.vocab_size
    tokens = rows * seq
    return 6 * matmul * tokens + sum(mixing[mixer] for mixer in cfg.mixers) * tokens


def packed_rows(rows: int, seq: int, vocab: int, seed: int) -> dict[str, np.ndarray]:
    """First-fit packing of log-normal lengths (median 190) into `rows` rows of `seq`."""
    rng = np.random.default_rng(seed)
    segments = np.zeros((rows, seq), np.int32)
    positions = np.zeros((rows, seq), np.int32)
    fill = np.zeros(rows, np.int64)
    count = np.zeros(rows, np.int64)
    while True:
        length = int(min(max(rng.lognormal(np.log(190), 0.8), 8), seq))
        fits = np.flatnonzero(fill + length <= seq)
        if not len(fits):
            break
        r = fits[0]
        count[r] += 1
        segments[r, fill[r]:fill[r] + length] = count[r]
        positions[r, fill[r]:fill[r] + length] = np.arange(length)
        fill[r] += length
    tokens = rng.integers(0, vocab, (rows, seq + 1)).astype(np.int32)
    return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
            "loss_mask": (segments > 0).astype(np.int32), "segment_ids": segments,
            "positions": positions, "source_ids": np.zeros((rows, seq), np.int32)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", choices=PRESETS, default="tiny")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--packed", action="store_true")
    parser.add_argument("--vocab", type=int, default=0, help="override the preset's vocab")
    parser.add_argument("--layers", type=int, default=0, help="override the preset's depth")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--dtype", default="auto", help="compute dtype; auto: bf16 off CPU")
    parser.add_argument("--peak_tflops", type=float, default=0.0,
                        help="for MFU; default from the device kind (H100/H200/A100)")
    parser.add_argument("--lora_rank", type=int, default=0,
                        help="train a LoRA adapter of this rank (alpha 2 x rank, all-linear)")
    parser.add_argument("--quantize", default="none", choices=("none", "int8", "int4", "nf4"),
                        help="with --lora_rank: the base held quantized (QLoRA)")
    parser.add_argument("--quantize_block", type=int, default=64)
    parser.add_argument("--set", action="append", default=[],
                        help="config overrides such as model.remat=full")
    args = parser.parse_args()
    config = base_config()
    preset = PRESETS[args.preset]
    config.model.init.update(**{
        "tie_word_embeddings": False,
        "head_dim": preset["hidden_size"] // preset["num_attention_heads"], **preset})
    if args.layers:
        config.model.init.num_hidden_layers = args.layers
    on_cpu = jax.default_backend() == "cpu"
    config.model.dtype = ("float32" if on_cpu else "bfloat16") if args.dtype == "auto" \
        else args.dtype
    for item in args.set:
        key, value = item.split("=", 1)
        section, name = key.split(".")
        config[section][name] = type(config[section][name])(value) if not isinstance(
            config[section][name], bool) else value.lower() == "true"
    spec = dict(config.model.init)
    if args.vocab:
        spec["vocab_size"] = args.vocab
    cfg = models.ModelConfig.from_hf_dict(
        spec, compute_dtype=config.model.dtype, param_dtype=config.model.param_dtype,
        remat=config.model.remat, attention=config.model.attention,
        scan_layers=config.model.scan_layers)
    mesh = parallel.make_mesh((jax.device_count(), 1, 1))
    params = models.init(cfg, 0, sharding=parallel.sharding_fn(cfg, mesh))
    base = None
    if args.lora_rank:  # the base outside the state, as an adapter run holds it
        from coach_jax import adapters
        from coach_jax.models.lora import LoraSpec, is_adapter_path
        base = params
        if args.quantize != "none":
            from coach_jax.models import quantize
            base = quantize.quantize_base(base, args.quantize, args.quantize_block)
        cfg = dataclasses.replace(cfg, projection="lora", lora=LoraSpec(
            args.lora_rank, 2.0 * args.lora_rank, adapters.resolve(cfg, "all-linear")[0]))
        params = models.init(cfg, 0, sharding=parallel.sharding_fn(cfg, mesh),
                             only=is_adapter_path)
    optimizer = train.OptimizerConfig("adamw", 1e-4, hparams={"weight_decay": 0.01},
                                      grad_clip_norm=1.0,
                                      schedule=train.ScheduleConfig("constant"))
    loss = train.LossConfig(chunk_tokens=config.train.chunk_tokens)
    step_config, parts = train.prepare(cfg, params, optimizer, train.ParamGroups(), 10**6,
                                       loss=loss)
    state = jax.jit(lambda p: train.create_state(p, parts), donate_argnums=0)(params)
    host = packed_rows(args.batch, args.seq, cfg.vocab_size, 0)
    if not args.packed:
        host.update(segment_ids=np.ones_like(host["segment_ids"]),
                    positions=np.broadcast_to(np.arange(args.seq, dtype=np.int32),
                                              host["positions"].shape).copy(),
                    loss_mask=np.ones_like(host["loss_mask"]))
        host["loss_mask"][:, : args.seq // 2] = 0  # prompt half masked, as in the anchors
    batch = parallel.global_batch(host, parallel.batch_sharding(mesh))
    step = train.compile_train_step(step_config, parts)
    start = time.perf_counter()
    compiled = step.lower(state, batch, base).compile()
    compile_s = time.perf_counter() - start
    analysis = compiled.memory_analysis()
    state, metrics = step(state, batch, base)
    jax.block_until_ready(metrics)
    start = time.perf_counter()
    for _ in range(args.steps):
        state, metrics = step(state, batch, base)
    jax.block_until_ready(metrics)
    step_s = (time.perf_counter() - start) / args.steps
    device = jax.devices()[0]
    peak = (device.memory_stats() or {}).get("peak_bytes_in_use")
    if peak is None and analysis is not None:
        peak = (analysis.temp_size_in_bytes + analysis.argument_size_in_bytes
                + analysis.output_size_in_bytes - analysis.alias_size_in_bytes)
    kind = device.device_kind
    peak_tflops = args.peak_tflops or next(
        (v for k, v in PEAK_TFLOPS.items() if k in kind), 0.0)
    flops = step_flops(cfg, args.batch, args.seq)
    real = int((host["segment_ids"] > 0).sum())
    print(json.dumps({
        "impl": "coach_jax", "preset": args.preset, "packed": args.packed,
        "lora_rank": args.lora_rank, "quantize": args.quantize,
        "batch": args.batch, "seq": args.seq, "dtype": cfg.compute_dtype,
        "attention": config.model.attention, "remat": cfg.remat,
        "chunk_tokens": loss.chunk_tokens, "device": kind, "devices": jax.device_count(),
        "step_s": round(step_s, 5), "compile_s": round(compile_s, 2),
        "tokens_per_s": round(args.batch * args.seq / step_s, 1),
        "real_tokens_per_s": round(real / step_s, 1),
        "packing_efficiency": round(real / host["segment_ids"].size, 4),
        "mfu": round(flops / step_s / (peak_tflops * 1e12), 4) if peak_tflops else None,
        "peak_memory_gib": round(peak / 2**30, 3) if peak else None,
        "loss": float(metrics["loss"]), "jax": jax.__version__}))


if __name__ == "__main__":
    main()
