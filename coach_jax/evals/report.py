"""DIR/report.md: the one page to read after a run.

Everything comes from files the run wrote (config.json, metrics.jsonl, data_stats.json,
generations/step_<N>.jsonl), so a report can be rebuilt for any workdir after the fact:
`python -m coach_jax.evals.report DIR`.
"""

from __future__ import annotations

import datetime
import json
import os
import sys
from typing import Any

from absl import logging

from coach_jax.train.reporting import plot_losses

SAMPLES = 4  # generations shown before / after
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")
LINESTYLES = ("-", "--", "-.", ":")


def _read_jsonl(path: str) -> list[dict[str, Any]]:
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _read_json(path: str) -> Any:
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(value)


def _table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def _eval_keys(records: list[dict[str, Any]]) -> list[str]:
    keys = []
    for record in records:
        for key in record:
            if key not in keys and (key.startswith(("eval_loss", "behaviour/", "forgetting/"))
                                    or key == "eval_token_accuracy"):
                keys.append(key)
    return keys


def _pyplot() -> Any:
    """matplotlib's pyplot on the file-only backend; None when matplotlib is missing."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def _series(records: list[dict[str, Any]], keys: list[str]) -> dict[str, list[tuple]]:
    series = {k: [(r["step"], r[k]) for r in records if k in r] for k in keys}
    return {k: v for k, v in series.items() if v}


def _draw(axis: Any, series: dict[str, list[tuple]], labels: dict[str, str]) -> None:
    """Lines with their own marker, style and a shrinking size: lines with equal values
    nest inside one another instead of hiding the ones drawn before."""
    for i, (key, points) in enumerate(series.items()):
        axis.plot(*zip(*points), marker=MARKERS[i % len(MARKERS)],
                  linestyle=LINESTYLES[i % len(LINESTYLES)], markersize=max(10 - 3 * i, 4),
                  linewidth=max(3 - 1.2 * i, 1), label=labels[key], alpha=0.9)


def _plot(records: list[dict[str, Any]], keys: list[str], out_path: str, ylabel: str) -> bool:
    plt = _pyplot()
    series = _series(records, keys)
    if plt is None or not series:
        return False
    figure, axis = plt.subplots(figsize=(7, 4))
    _draw(axis, series, {k: k for k in series})
    axis.set_xlabel("step")
    axis.set_ylabel(ylabel)
    axis.legend(fontsize=8)
    axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(out_path, dpi=100)
    plt.close(figure)
    return True


def _by_metric(series: dict[str, list[tuple]]) -> dict[str, dict[str, list[tuple]]]:
    """{metric: {source: points}} from behaviour/<source>/<metric> series."""
    panels: dict[str, dict[str, list[tuple]]] = {}
    for key, points in series.items():
        source, _, metric = key.removeprefix("behaviour/").rpartition("/")
        panels.setdefault(metric, {})[source] = points
    return panels


def _plot_behaviour(records: list[dict[str, Any]], keys: list[str], out_path: str) -> bool:
    """One panel per behaviour metric (one line per data source), so metrics with the same
    values (json_parses and schema_valid both 1.0) never hide each other."""
    plt = _pyplot()
    series = _series(records, keys)
    if plt is None or not series:
        return False
    panels = _by_metric(series)
    columns = min(3, len(panels))
    rows = -(-len(panels) // columns)
    figure, axes = plt.subplots(rows, columns, figsize=(3.3 * columns, 2.4 * rows + 0.4),
                                sharex=True, sharey=True, squeeze=False)
    shares = all(0 <= v <= 1 for points in series.values() for _, v in points)
    for axis, (metric, by_source) in zip(axes.flat, panels.items()):
        _draw(axis, by_source, {s: s for s in by_source})
        axis.set_title(metric, fontsize=9)
        axis.grid(alpha=0.3)
        if shares:
            axis.set_ylim(-0.08, 1.08)
    for axis in axes.flat[len(panels):]:
        axis.set_visible(False)
    for axis in axes[-1]:
        axis.set_xlabel("step")
    for axis in axes[:, 0]:
        axis.set_ylabel("share" if shares else "value")
    _name_sources(figure, axes.flat[0], [s for s in panels[next(iter(panels))]])
    figure.savefig(out_path, dpi=100)
    plt.close(figure)
    return True


def _name_sources(figure: Any, first_axis: Any, sources: list[str]) -> None:
    """One source is named in the title; several get a legend below the panels."""
    title = "behaviour on held-out prompts"
    if len(sources) == 1:
        figure.suptitle(f"{title} · source: {sources[0]}", fontsize=10)
        figure.tight_layout()
        return
    figure.suptitle(title, fontsize=10)
    figure.legend(*first_axis.get_legend_handles_labels(), loc="lower center",
                  ncol=len(sources), fontsize=8)
    figure.tight_layout(rect=(0, 0.06, 1, 1))


def _before(evals: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The eval before training (step 0, eval.at_start), when there was one and training
    came after it: anything later is no "before"."""
    first = evals[0]
    return first if first["step"] == 0 and evals[-1]["step"] > 0 else None


def _comparison(evals: list[dict[str, Any]], keys: list[str]) -> list[str]:
    """Before and after with the change, or, with no eval before training, the last values
    and one line saying so: a step-20-vs-step-20 "change 0" would look like an unchanged
    model."""
    first, last = _before(evals), evals[-1]
    if first is None:
        return ["## Last evaluation", "",
                f"No evaluation ran before training (eval.at_start=False), so there is no "
                f"before/after comparison; these are the values at step {last['step']}.", "",
                _table(["metric", f"step {last['step']}"], [[k, last.get(k)] for k in keys]),
                ""]
    rows = []
    for key in keys:
        a, b = first.get(key), last.get(key)
        change = b - a if isinstance(a, (int, float)) and isinstance(b, (int, float)) else None
        rows.append([key, a, b, change])
    return ["## Before and after", "",
            _table(["metric", "step 0 (before training)", f"step {last['step']}", "change"],
                   rows), ""]


def _config_rows(config: dict[str, Any]) -> list[list[Any]]:
    model = config["model"]
    size = model["hf_path"] or ", ".join(
        f"{k}={model['init'][k]}" for k in ("model_type", "hidden_size", "num_hidden_layers",
                                            "vocab_size"))
    train, data, opt = config["train"], config["data"], config["optimizer"]
    length = f"{train['steps']} steps" if train["steps"] else f"{data['epochs']} epochs"
    return [
        ["model", size],
        ["data", f"train {data['train']}; eval {data['eval'] or '-'}"],
        ["length", f"{length}, {train['global_batch_size']} rows x {data['max_seq_len']} "
                   f"tokens, packing {data['packing']}"],
        ["optimizer", f"{opt['name']}, lr {opt['learning_rate']}, "
                      f"schedule {config['schedule']['name']}"],
        ["evals", f"every {train['eval_every'] or '-'} steps; reference "
                  f"{config['eval']['reference'] or '-'}; schema "
                  f"{config['eval']['json_schema'] or '-'}"],
    ]


def _code(text: str) -> str:
    """Inline code on one line (newlines shown as \\n); a double-backtick span, so a single
    backtick in the text cannot end it."""
    return "`` " + text.replace("\n", "\\n").replace("``", "` `") + " ``"


def _samples(workdir: str, first_step: int | None, last_step: int) -> str:
    """Generations of the last eval, each beside its output before training when there was
    an eval before training (first_step 0), never beside a later step's."""
    before = [] if first_step is None else _read_jsonl(
        os.path.join(workdir, "generations", f"step_{first_step:06d}.jsonl"))
    after = _read_jsonl(os.path.join(workdir, "generations", f"step_{last_step:06d}.jsonl"))
    if not after:
        return "No generations were evaluated (set eval.generate_examples).\n"
    parts = []
    for i, late in enumerate(after[:SAMPLES]):
        early = before[i]["output"] if i < len(before) and first_step != last_step else None
        parts.append(f"**{late['source']} · {late['origin']}**\n\n"
                     f"Prompt: {_code(late['prompt'])}\n\n"
                     f"- reference: {_code(late['reference'])}\n"
                     + (f"- before (step {first_step}): {_code(early)}\n" if early is not None
                        else "")
                     + f"- after (step {last_step}): {_code(late['output'])}\n")
    return "\n".join(parts)


def _data_section(stats: dict[str, Any] | None) -> str:
    if not stats:
        return "No data statistics were written.\n"
    rows = [[name, s["examples"], s["tokens_per_epoch"], f"{100 * s['supervised_fraction']:.1f}%",
             ", ".join(f"{k}: {v}" for k, v in s["left_out"].items()) or "none"]
            for name, s in stats.get("sources", {}).items()]
    text = _table(["source", "examples", "tokens / epoch", "supervised", "left out"], rows)
    if "packing_efficiency" in stats:
        text += (f"\n\nPacking: {100 * stats['packing_efficiency']:.1f}% of the token slots "
                 f"of the {stats.get('batches', '?')} training batches held real tokens.")
    return text + "\n"


def _router_section(records: list[dict[str, Any]]) -> list[str]:
    """A mixture of experts' load per MoE layer, at the first and the last logged step:
    the busiest and the idlest expert's share of the (token, expert) assignments."""
    logged = [r for r in records if "expert_share_max" in r]
    if not logged:
        return []
    first, last = logged[0], logged[-1]
    rows = [[layer, f"{first['expert_share_max'][layer]:.1%} -> {busiest:.1%}",
             f"{first['expert_share_min'][layer]:.1%} -> {last['expert_share_min'][layer]:.1%}"]
            for layer, busiest in enumerate(last["expert_share_max"])]
    return ["## Experts", "",
            f"Load-balancing loss {_fmt(first.get('router_aux_loss'))} at step "
            f"{first['step']} -> {_fmt(last.get('router_aux_loss'))} at step {last['step']} "
            "(the number of experts per token when perfectly balanced). Share of the "
            "assignments per MoE layer (1 / experts each when balanced):", "",
            _table(["MoE layer", "busiest expert", "idlest expert"], rows), ""]


def write_report(workdir: str) -> str:
    """Writes DIR/report.md (and its PNGs, when matplotlib is installed); returns its path."""
    config = _read_json(os.path.join(workdir, "config.json"))
    records = _read_jsonl(os.path.join(workdir, "metrics.jsonl"))
    stats = _read_json(os.path.join(workdir, "data_stats.json"))
    evals = [r for r in records if any(k.startswith(("eval_", "behaviour/", "forgetting/"))
                                       for k in r)]
    keys = _eval_keys(evals)
    last_step = max((r["step"] for r in records), default=0)
    stopped = (stats or {}).get("stopped")
    lines = ["# Run report", "",
             f"`{os.path.abspath(workdir)}` · written "
             f"{datetime.datetime.now().strftime('%Y-%m-%d %H:%M')} · {last_step} steps"
             + (f" · **stopped early: {stopped}**" if stopped else ""), ""]
    if config:
        lines += ["## What was trained", "", _table(["", ""], _config_rows(config)), ""]
    if evals:
        lines += _comparison(evals, keys)
        chance = (config or {}).get("eval", {}).get("fact_chance")
        if chance:
            lines += [f"Chance level of `fact_accuracy` (a model that knows only what the "
                      f"SFT data shows): {chance:.4g}.", ""]
    if plot_losses(os.path.join(workdir, "metrics.jsonl"), os.path.join(workdir, "loss.png")):
        lines += ["## Loss", "", "![loss curves](loss.png)", ""]
    lines += _router_section(records)
    if evals:
        lines += ["## Evals over time", "",
                  _table(["step"] + keys, [[r["step"]] + [r.get(k) for k in keys] for r in evals]),
                  ""]
        behaviour_keys = [k for k in keys if k.startswith("behaviour/")]
        if _plot_behaviour(evals, behaviour_keys, os.path.join(workdir, "behaviour.png")):
            lines += ["![behaviour over time](behaviour.png)", ""]
        before = _before(evals)
        lines += ["## Behaviour before and after" if before else "## Behaviour after training",
                  "", _samples(workdir, 0 if before else None, evals[-1]["step"])]
        forgetting_keys = ["forgetting/reference_loss_delta", "forgetting/kl"]
        if any(k in keys for k in forgetting_keys):
            last = evals[-1]
            lines += ["## Forgetting", "",
                      f"Reference loss of the base model: "
                      f"{_fmt(last.get('forgetting/reference_loss_base'))} nats; now "
                      f"{_fmt(last.get('forgetting/reference_loss'))} (delta "
                      f"{_fmt(last.get('forgetting/reference_loss_delta'))}); mean "
                      f"KL(base || current) {_fmt(last.get('forgetting/kl'))}."
                      + (f" Budget: {config['eval']['forgetting_budget']} nats."
                         if config and config["eval"]["forgetting_budget"] else ""), ""]
            if _plot(evals, forgetting_keys, os.path.join(workdir, "forgetting.png"),
                     "nats"):
                lines += ["![forgetting over time](forgetting.png)", ""]
    lines += ["## Data", "", _data_section(stats)]
    path = os.path.join(workdir, "report.md")
    with open(path, "w") as f:
        f.write("\n".join(lines))
    logging.info("wrote %s", path)
    return path


if __name__ == "__main__":
    print(write_report(sys.argv[1]))
