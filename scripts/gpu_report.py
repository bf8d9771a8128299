"""Rows for docs/benchmarks.md from a GPU check (scripts/gpu_check.sh's gpu_check.jsonl):
each coach_jax run beside the same call's plain-JAX baseline on its shape (tokens/s, the
ratio to the baseline, MFU, peak memory), and the cuDNN test's line.

  python scripts/gpu_report.py DIR   # DIR: the check's $OUT (gpu_check.jsonl, card.txt)
"""

from __future__ import annotations

import argparse
import datetime
import json
import os


def rows(records: list[dict], card: str, command: str = "bash scripts/gpu_check.sh"
         ) -> list[str]:
    """One markdown row per run that produced a result; failed runs say so."""
    baseline = {r["result"]["preset"]: r["result"]["tokens_per_s"] for r in records
                if r["result"] and r["result"].get("impl") == "jax_ref"}
    out = []
    today = datetime.date.today()
    for record in records:
        result, label = record["result"], record["run"]
        if result is None:
            out.append(f"| {today} | {card} | {label} | failed (see stderr.log) | | | | |")
            continue
        tokens = result["tokens_per_s"]
        ref = baseline.get(result.get("preset"))
        ratio = f"{tokens / ref:.2f}x" if ref and result.get("impl") != "jax_ref" else ""
        mfu = result.get("mfu", result.get("mfu_vs_989"))
        memory = result.get("peak_memory_gib", result.get("peak_mem_gb"))
        versions = result.get("jax") or (result.get("versions") or {}).get("jax", "")
        out.append(f"| {today} | {card} | {label} | {tokens:.0f} | {ratio} | "
                   f"{'' if mfu is None else f'{100 * mfu:.1f}%'} | "
                   f"{'' if memory is None else f'{memory:.1f} GiB'} | jax {versions} | "
                   f"`{command}` |")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out", help="the GPU check's output folder")
    args = parser.parse_args()
    with open(os.path.join(args.out, "gpu_check.jsonl")) as f:
        records = [json.loads(line) for line in f if line.strip()]
    card_file = os.path.join(args.out, "card.txt")
    card = open(card_file).read().strip() if os.path.exists(card_file) else "unknown card"
    print("| date | card | run | tokens/s | vs jax_ref | MFU | peak memory | versions | command |")
    print("|---|---|---|---|---|---|---|---|---|")
    print("\n".join(rows(records, card)))
    cudnn = os.path.join(args.out, "cudnn_test.txt")
    if os.path.exists(cudnn):
        print(f"\ncuDNN test: {open(cudnn).read().strip()}")


if __name__ == "__main__":
    main()
