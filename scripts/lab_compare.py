"""The lab's runs side by side: the default coach, the bad coach, the coach too hard, LoRA.

Trains each config (unless its workdir already has a report), for each seed, then writes
one table (markdown, printed and saved as DIR/compare.md) and one plot (DIR/compare.png)
of what matters: schema conformance and fact accuracy on held-out entities (learned
behaviour, and knowledge that came from pretraining) and the forgetting delta.

  python scripts/lab_compare.py --out runs/lab_compare --seeds 0 1
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

RUNS = {"default": "configs/default.py", "bad_coach": "configs/lab_bad_coach.py",
        "too_hard": "configs/lab_coach_too_hard.py", "lora": "configs/lab_lora.py",
        "lora_lr1e-3": "configs/lab_lora.py --config.optimizer.learning_rate=1e-3"}
LAB_INFO = "assets/lab/lab.json"
METRICS = {"schema_valid": "behaviour/eval/schema_valid",
           "fact_accuracy": "behaviour/eval/fact_accuracy",
           "forgetting_delta": "forgetting/reference_loss_delta",
           "kl": "forgetting/kl"}


def train(run: str, workdir: str, seed: int) -> None:
    """`run`: a config file, then any overrides."""
    if os.path.exists(os.path.join(workdir, "report.md")):
        return
    config, *overrides = run.split()
    subprocess.run([sys.executable, "-m", "coach_jax.main", "--config", config, "--workdir",
                    workdir, f"--config.train.seed={seed}", f"--config.data.seed={seed}",
                    "--config.export.hf=False", *overrides], check=True)


def evals(workdir: str) -> list[dict]:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [r for r in map(json.loads, f) if METRICS["schema_valid"] in r]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="runs/lab_compare")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    args = parser.parse_args()
    results: dict[str, dict[int, list[dict]]] = {}
    for name, config in RUNS.items():
        for seed in args.seeds:
            workdir = os.path.join(args.out, f"{name}_seed{seed}")
            train(config, workdir, seed)
            results.setdefault(name, {})[seed] = evals(workdir)
    with open(LAB_INFO) as f:
        chance = json.load(f)["fact_chance"]
    header = ["run", "seed", "schema valid before", "schema valid after",
              "fact accuracy after", "forgetting delta (nats)", "KL"]
    rows = []
    for name, by_seed in results.items():
        for seed, records in by_seed.items():
            first, last = records[0], records[-1]
            rows.append([name, seed, f"{100 * first[METRICS['schema_valid']]:.0f}%",
                         f"{100 * last[METRICS['schema_valid']]:.0f}%",
                         f"{100 * last[METRICS['fact_accuracy']]:.1f}%",
                         f"{last[METRICS['forgetting_delta']]:.3f}", f"{last[METRICS['kl']]:.3f}"])
        means = {k: statistics.mean(r[-1][v] for r in by_seed.values())
                 for k, v in METRICS.items()}
        rows.append([f"**{name}**", "mean", "", f"{100 * means['schema_valid']:.0f}%",
                     f"{100 * means['fact_accuracy']:.1f}%",
                     f"{means['forgetting_delta']:.3f}", f"{means['kl']:.3f}"])
    table = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    table += ["| " + " | ".join(str(v) for v in row) + " |" for row in rows]
    text = "\n".join(table) + (f"\n\nChance level of fact accuracy (a model that knows only "
                               f"what the SFT data shows): {100 * chance:.1f}%.\n")
    print(text)
    with open(os.path.join(args.out, "compare.md"), "w") as f:
        f.write(text)
    plot(results, os.path.join(args.out, "compare.png"), chance)


def plot(results: dict, path: str, chance: float) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    figure, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    panels = (("schema_valid", "schema conformance (held-out)"),
              ("fact_accuracy", "fact accuracy (held-out)"),
              ("forgetting_delta", "forgetting: reference loss delta (nats)"))
    for axis, (key, title) in zip(axes, panels):
        for (name, by_seed), color in zip(results.items(), ("C0", "C3", "C1", "C2", "C4")):
            for seed, records in by_seed.items():
                axis.plot([r["step"] for r in records], [r[METRICS[key]] for r in records],
                          color=color, alpha=0.9 if seed == min(by_seed) else 0.5,
                          label=name if seed == min(by_seed) else None, marker="o",
                          markersize=3)
        if key == "fact_accuracy":
            axis.axhline(chance, color="gray", linestyle="--", label="chance")
        if key == "forgetting_delta":  # 0.1 to 20 nats: the gentle runs stay readable
            axis.set_yscale("symlog", linthresh=0.1)
        axis.set_title(title, fontsize=10)
        axis.set_xlabel("step")
        axis.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    axes[1].legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


if __name__ == "__main__":
    main()
