"""The forgetting monitor: how far the coached model has drifted from the base model on a
general reference set that SFT never trains on.

Two numbers, both zero before the first step:
- `reference_loss_delta`: mean next-token NLL on the reference set's supervised tokens
  (every token of a text source) now, minus the base model's on the same tokens;
- `kl`: mean KL(base || current) of the next-token distributions over every position of
  the reference set (prompts included): how much the model's general predictions moved.

The base model's parameters are kept on device (in the compute dtype, sharded like the
trained ones) so the KL can be measured at every eval.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Iterable

import jax
import jax.numpy as jnp

from coach_jax import models
from coach_jax.data.errors import DataError
from coach_jax.models.config import ModelConfig
from coach_jax.models.decoder import Params
from coach_jax.train.loss import CHUNK_TOKENS, LossConfig, batch_sums

ON_BUDGET = ("warn", "stop")


def reference_sums(base_params: Params, params: Params, batch: dict[str, jax.Array], *,
                   cfg: ModelConfig, chunk_tokens: int) -> dict[str, jax.Array]:
    """One pass over a reference batch: the current model's loss sums (`nll` over supervised
    tokens, their count `tokens`) and KL(base || current) summed over the non-padding
    positions (their count `positions`), from the shared forward-and-loss pass."""
    base_hidden = models.hidden_states(cfg, base_params, batch["inputs"], batch["positions"],
                                       batch["segment_ids"])

    def kl(logits: jax.Array, part: dict[str, jax.Array]) -> dict[str, jax.Array]:
        log_p = jax.nn.log_softmax(models.logits_from_hidden(
            cfg, base_params, part["base_hidden"]).astype(jnp.float32))
        log_q = jax.nn.log_softmax(logits.astype(jnp.float32))
        return {"kl": jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=-1)}

    sums = batch_sums(cfg, params, batch, LossConfig(chunk_tokens=chunk_tokens), extra=kl,
                      extra_inputs={"base_hidden": base_hidden})
    return {k: sums[k] for k in ("kl", "positions", "nll", "tokens")}


def compute_dtype_copy(params: Params, dtype: str) -> Params:
    """A fresh copy (never an alias of buffers a train step may donate) in `dtype`; the
    forward pass casts to the compute dtype anyway, so results are unchanged."""
    return jax.tree.map(lambda x: jnp.copy(x).astype(dtype), params)


@dataclasses.dataclass
class ForgettingMonitor:
    """Measures the reference loss and KL against the base, one pass over the reference
    set per eval; the base's own loss is measured on the first call."""

    cfg: ModelConfig
    base_params: Params
    batches: Callable[[], Iterable[dict[str, jax.Array]]]  # the reference set, global arrays
    chunk_tokens: int = CHUNK_TOKENS
    budget: float = 0.0  # allowed rise of the reference loss (nats); 0 = no budget
    base_loss: float | None = None

    def __post_init__(self):
        self._sums = jax.jit(functools.partial(reference_sums, cfg=self.cfg,
                                               chunk_tokens=self.chunk_tokens))

    def _totals(self, params: Params) -> dict[str, float]:
        totals = None
        for batch in self.batches():
            sums = self._sums(self.base_params, params, batch)
            totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
        totals = {k: float(v) for k, v in jax.device_get(totals or {}).items()}
        if not totals.get("tokens"):
            raise DataError(None, "eval.reference has no supervised tokens to measure "
                                  "forgetting on", field="eval.reference")
        return totals

    def measure(self, params: Params) -> dict[str, float]:
        if self.base_loss is None:
            base = self._totals(self.base_params)
            self.base_loss = base["nll"] / base["tokens"]
        totals = self._totals(params)
        loss = totals["nll"] / totals["tokens"]
        return {"reference_loss": loss, "reference_loss_base": self.base_loss,
                "reference_loss_delta": loss - self.base_loss,
                "kl": totals["kl"] / max(totals["positions"], 1.0)}

    def over_budget(self, reference_loss_delta: float) -> bool:
        return bool(self.budget) and reference_loss_delta > self.budget
