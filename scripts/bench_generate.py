"""Benchmark: greedy decode tokens/s of coach_jax.sampling (KV cache, one jitted while_loop)
against transformers' `generate` (PyTorch, KV cache), same weights, same prompts, same
machine, one run. Each implementation runs in its own fresh process; the script also
reports whether the two produced the same tokens.

  python scripts/bench_generate.py --markdown
"""

from __future__ import annotations

import argparse
import datetime
import json
import subprocess
import sys
import tempfile
import time

import machine

SHAPE = dict(vocab_size=8192, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
             num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=2048,
             rms_norm_eps=1e-5, tie_word_embeddings=False)


def _prompts(batch: int, prompt_len: int) -> list[list[int]]:
    import numpy as np
    rng = np.random.default_rng(1)
    # Different lengths in one batch, as in real use: from half to the full length.
    return [rng.integers(0, SHAPE["vocab_size"], int(n)).tolist()
            for n in np.linspace(prompt_len // 2, prompt_len, batch)]


def build(folder: str) -> None:
    import torch
    import transformers
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**SHAPE))
    with torch.no_grad():
        model.model.norm.weight.mul_(8.0)  # well separated logits: greedy has no near ties
    model.save_pretrained(folder)


def run_jax(folder: str, batch: int, prompt_len: int, new_tokens: int, repeats: int) -> dict:
    import jax
    from coach_jax import models, sampling
    cfg, params = models.load_hf(folder)
    prompts = _prompts(batch, prompt_len)
    config = sampling.SamplingConfig(max_new_tokens=new_tokens)
    start = time.perf_counter()
    out = sampling.generate_tokens(cfg, params, prompts, (), config, batch_size=batch)
    compile_s = time.perf_counter() - start
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = sampling.generate_tokens(cfg, params, prompts, (), config, batch_size=batch)
        times.append(time.perf_counter() - start)
    return {"impl": "coach_jax", "version": f"jax {jax.__version__}", "seconds": min(times),
            "first_call_s": compile_s, "tokens": [c.token_ids for c in out]}


def run_torch(folder: str, batch: int, prompt_len: int, new_tokens: int, repeats: int) -> dict:
    import torch
    import transformers
    model = transformers.LlamaForCausalLM.from_pretrained(folder).eval()
    model.generation_config.eos_token_id = None
    prompts = _prompts(batch, prompt_len)
    width = max(len(p) for p in prompts)
    ids = torch.zeros((batch, width), dtype=torch.long)
    mask = torch.zeros((batch, width), dtype=torch.long)
    for row, prompt in enumerate(prompts):  # left padding, as HF recommends for decoding
        ids[row, width - len(prompt):] = torch.tensor(prompt)
        mask[row, width - len(prompt):] = 1

    def generate():
        with torch.no_grad():
            return model.generate(input_ids=ids, attention_mask=mask, do_sample=False,
                                  max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                  pad_token_id=0)
    start = time.perf_counter()
    out = generate()
    first = time.perf_counter() - start
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = generate()
        times.append(time.perf_counter() - start)
    return {"impl": "hf_torch", "version": f"torch {torch.__version__}", "seconds": min(times),
            "first_call_s": first, "tokens": out[:, width:].tolist()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--impl", choices=("jax", "torch"), help="run one implementation")
    parser.add_argument("--folder", help="the saved model (made when not given)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--prompt_len", type=int, default=64)
    parser.add_argument("--new_tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--markdown", action="store_true", help="append to docs/benchmarks.md")
    args = parser.parse_args()
    common = (args.batch, args.prompt_len, args.new_tokens, args.repeats)
    if args.impl:
        result = (run_jax if args.impl == "jax" else run_torch)(args.folder, *common)
        result["new_tokens_per_s"] = args.batch * args.new_tokens / result["seconds"]
        print(json.dumps(result))
        return
    with tempfile.TemporaryDirectory() as folder:
        build(folder)
        results = {}
        for impl in ("jax", "torch"):
            out = subprocess.run(
                [sys.executable, __file__, "--impl", impl, "--folder", folder, "--batch",
                 str(args.batch), "--prompt_len", str(args.prompt_len), "--new_tokens",
                 str(args.new_tokens), "--repeats", str(args.repeats)],
                check=True, capture_output=True, text=True).stdout
            results[impl] = json.loads(out.strip().splitlines()[-1])
    same = results["jax"].pop("tokens") == results["torch"].pop("tokens")
    for result in results.values():
        print(json.dumps(result))
    ratio = results["jax"]["new_tokens_per_s"] / results["torch"]["new_tokens_per_s"]
    print(json.dumps({"coach_jax_over_torch": ratio, "same_tokens": same}))
    if args.markdown:
        where = f"{machine.describe()}, CPU"
        command = "python scripts/bench_generate.py --markdown"
        if (args.batch, args.prompt_len, args.new_tokens) != (8, 64, 128):
            command += (f" --batch {args.batch} --prompt_len {args.prompt_len} "
                        f"--new_tokens {args.new_tokens}")
        with open("docs/benchmarks.md", "a") as f:
            f.write(f"| {datetime.date.today()} | {where} | batch {args.batch}, prompts "
                    f"{args.prompt_len // 2}-{args.prompt_len}, {args.new_tokens} new | "
                    f"{results['jax']['new_tokens_per_s']:.0f} | "
                    f"{results['torch']['new_tokens_per_s']:.0f} | {ratio:.2f}x | "
                    f"{'yes' if same else 'no'} | {results['jax']['version']}, "
                    f"{results['torch']['version']} | `{command}` |\n")


if __name__ == "__main__":
    main()
