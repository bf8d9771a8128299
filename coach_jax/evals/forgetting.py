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


def kl_sums(base_params: Params, params: Params, batch: dict[str, jax.Array], *,
            cfg: ModelConfig, chunk_tokens: int) -> dict[str, jax.Array]:
    """Sum over non-padding positions of KL(base || current), and their count. The LM
    head runs `chunk_tokens` positions at a time, so [B, T, V] logits never exist."""
    args = (batch["inputs"], batch["positions"], batch["segment_ids"])
    hidden_base = models.hidden_states(cfg, base_params, *args)
    hidden = models.hidden_states(cfg, params, *args)
    batch_size, length, width = hidden.shape
    total = batch_size * length
    chunk = min(chunk_tokens or total, total)
    pad = -total % chunk

    def rows(h):
        return jnp.pad(h.reshape(total, width), ((0, pad), (0, 0))).reshape(-1, chunk, width)

    def one_chunk(pair):
        h_base, h = pair
        log_p = jax.nn.log_softmax(
            models.logits_from_hidden(cfg, base_params, h_base[None])[0].astype(jnp.float32))
        log_q = jax.nn.log_softmax(
            models.logits_from_hidden(cfg, params, h[None])[0].astype(jnp.float32))
        return jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=-1)

    kl = jax.lax.map(one_chunk, (rows(hidden_base), rows(hidden))).reshape(-1)[:total]
    real = (batch["segment_ids"] > 0).reshape(-1)
    return {"kl": jnp.sum(jnp.where(real, kl, 0.0)), "positions": jnp.sum(real)}


def compute_dtype_copy(params: Params, dtype: str) -> Params:
    """A fresh copy (never an alias of buffers a train step may donate) in `dtype`; the
    forward pass casts to the compute dtype anyway, so results are unchanged."""
    return jax.tree.map(lambda x: jnp.copy(x).astype(dtype), params)


@dataclasses.dataclass
class ForgettingMonitor:
    """Measures the reference loss and KL against the base; `start()` once before use."""

    cfg: ModelConfig
    base_params: Params
    batches: Callable[[], Iterable[dict[str, jax.Array]]]  # the reference set, global arrays
    eval_step: Callable[[Params, dict[str, jax.Array]], dict[str, jax.Array]]
    chunk_tokens: int = 256
    budget: float = 0.0  # allowed rise of the reference loss (nats); 0 = no budget
    on_budget: str = "warn"
    base_loss: float | None = None

    def __post_init__(self):
        if self.on_budget not in ON_BUDGET:
            raise ValueError(f"eval.on_forgetting_budget={self.on_budget!r}; expected one of "
                             f"{', '.join(ON_BUDGET)}")
        self._kl = jax.jit(functools.partial(kl_sums, cfg=self.cfg,
                                             chunk_tokens=self.chunk_tokens))

    def _loss(self, params: Params) -> float:
        nll = tokens = 0.0
        for batch in self.batches():
            sums = jax.device_get(self.eval_step(params, batch))
            nll, tokens = nll + float(sums["nll"]), tokens + float(sums["tokens"])
        if not tokens:
            raise DataError(None, "eval.reference has no supervised tokens to measure "
                                  "forgetting on", field="eval.reference")
        return nll / tokens

    def start(self) -> dict[str, float]:
        self.base_loss = self._loss(self.base_params)
        return {"reference_loss_base": self.base_loss}

    def measure(self, params: Params) -> dict[str, float]:
        if self.base_loss is None:
            self.start()
        loss = self._loss(params)
        totals = None
        for batch in self.batches():
            sums = self._kl(self.base_params, params, batch)
            totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
        totals = jax.device_get(totals)
        return {"reference_loss": loss, "reference_loss_base": self.base_loss,
                "reference_loss_delta": loss - self.base_loss,
                "kl": float(totals["kl"]) / max(float(totals["positions"]), 1.0)}

    def over_budget(self, measured: dict[str, float]) -> bool:
        return bool(self.budget) and measured["reference_loss_delta"] > self.budget
