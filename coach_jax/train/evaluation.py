"""Held-out loss, token-exact: sums over every eval batch, divided once."""

from __future__ import annotations

import functools
import math
from typing import Any, Iterable

import jax
import numpy as np

from coach_jax import parallel
from coach_jax.models.decoder import Params
from coach_jax.train.loss import batch_sums
from coach_jax.train.step import StepConfig


def compile_eval_step(config: StepConfig, params_sharding: Any = None,
                      batch_sharding: Any = None):
    """`batch_sums` of a batch under given parameters, jitted once."""
    fn = functools.partial(batch_sums, config.model, config=config.loss,
                           num_sources=config.num_sources)
    if params_sharding is None and batch_sharding is None:
        return jax.jit(fn)
    fn = parallel.traced_on_mesh(fn, getattr(batch_sharding, "mesh", None))
    return jax.jit(fn, in_shardings=(params_sharding, batch_sharding))


def eval_totals(eval_step, params: Params, batches: Iterable[dict[str, jax.Array]]
                ) -> dict[str, np.ndarray] | None:
    """Loss sums over all batches, added on device and read once."""
    totals = None
    for batch in batches:
        sums = eval_step(params, batch)
        totals = sums if totals is None else jax.tree.map(lambda a, b: a + b, totals, sums)
    return None if totals is None else jax.device_get(totals)


def summarize(totals_by_source: dict[str, dict[str, np.ndarray]]) -> dict[str, float]:
    """`eval_loss` over all sources together (token-exact: one division), its perplexity,
    token accuracy, and `eval_loss/<source>` per source."""
    add = lambda key: float(sum(float(np.sum(t[key])) for t in totals_by_source.values()))
    if not totals_by_source:
        return {}
    loss = add("numerator") / max(add("denominator"), 1.0)
    result = {"eval_loss": loss, "eval_perplexity": math.exp(min(loss, 50.0)),
              "eval_tokens": add("tokens"),
              "eval_token_accuracy": add("correct") / max(add("tokens"), 1.0)}
    if len(totals_by_source) > 1:
        for name, t in totals_by_source.items():
            result[f"eval_loss/{name}"] = float(t["numerator"]) / max(float(t["denominator"]), 1)
    return result
