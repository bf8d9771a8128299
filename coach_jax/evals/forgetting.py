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

ON_BUDGET = ("warn", "stop")


def reference_sums(base_params: Params, params: Params, batch: dict[str, jax.Array], *,
                   cfg: ModelConfig, chunk_tokens: int) -> dict[str, jax.Array]:
    """One pass over a reference batch: the current model's NLL summed over supervised
    tokens (and their count), and KL(base || current) summed over non-padding positions
    (and their count). The LM head runs `chunk_tokens` positions at a time, so [B, T, V]
    logits never exist."""
    args = (batch["inputs"], batch["positions"], batch["segment_ids"])
    hidden_base = models.hidden_states(cfg, base_params, *args)
    hidden = models.hidden_states(cfg, params, *args)
    batch_size, length, width = hidden.shape
    total = batch_size * length
    chunk = min(chunk_tokens or total, total)
    pad = -total % chunk

    def rows(x):
        x = x.reshape(total, -1)
        return jnp.pad(x, ((0, pad), (0, 0))).reshape(-1, chunk, x.shape[-1])

    def one_chunk(parts):
        h_base, h, targets = parts
        log_p = jax.nn.log_softmax(
            models.logits_from_hidden(cfg, base_params, h_base[None])[0].astype(jnp.float32))
        log_q = jax.nn.log_softmax(
            models.logits_from_hidden(cfg, params, h[None])[0].astype(jnp.float32))
        nll = -jnp.take_along_axis(log_q, targets, axis=-1)[:, 0]
        return jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=-1), nll

    kl, nll = jax.lax.map(one_chunk, (rows(hidden_base), rows(hidden),
                                      rows(batch["targets"])))
    kl, nll = kl.reshape(-1)[:total], nll.reshape(-1)[:total]
    real = (batch["segment_ids"] > 0).reshape(-1)
    supervised = batch["loss_mask"].reshape(-1) > 0
    return {"kl": jnp.sum(jnp.where(real, kl, 0.0)), "positions": jnp.sum(real),
            "nll": jnp.sum(jnp.where(supervised, nll, 0.0)), "tokens": jnp.sum(supervised)}


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
    chunk_tokens: int = 256
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
