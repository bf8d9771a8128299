"""Masked next-token cross-entropy as *sums*, so a step divides exactly once.

Every function returns sums over tokens (or examples), never means: gradient accumulation
adds the sums of its micro-batches and divides by the global count at the end, which makes
k micro-batches equal one big batch token for token.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Literal

import jax
import jax.numpy as jnp

from coach_jax import models
from coach_jax.models.config import ModelConfig
from coach_jax.models.decoder import Params, hidden_states_and_router

NORMALIZATIONS = ("tokens", "examples")
CHUNK_TOKENS = 256  # the default LM head + cross-entropy chunk; see LossConfig.chunk_tokens
TERMS = ("objective", "nll", "correct")  # what token_losses returns, in order
Arrays = dict[str, jax.Array]
# A caller's own per-position terms from a chunk's logits [b, t, V] and inputs [b, t, ...].
ExtraTerms = Callable[[jax.Array, Arrays], Arrays]


@dataclasses.dataclass(frozen=True)
class LossConfig:
    normalization: Literal["tokens", "examples"] = "tokens"
    z_loss: float = 0.0  # weight of logsumexp(logits)^2, keeps logits from drifting
    label_smoothing: float = 0.0
    # Tokens per chunk of the LM head + cross-entropy (0: all at once). Chunks are
    # recomputed in the backward pass, so [B, T, V] logits never exist at once; the result
    # does not depend on it.
    chunk_tokens: int = CHUNK_TOKENS
    # Mixture-of-experts routers: the load-balancing loss's weight (None: config.json's
    # router_aux_loss_coef where its output_router_logits is true, else 0, as transformers)
    # and the router z-loss's (mean logsumexp(router logits)^2).
    router_aux_loss: float | None = None
    router_z_loss: float = 0.0

    def aux_weight(self, model_cfg: ModelConfig) -> float:
        """The load-balancing loss's weight for this model (0 without MoE layers)."""
        if model_cfg.moe is None:
            return 0.0
        if self.router_aux_loss is not None:
            return self.router_aux_loss
        return model_cfg.moe.aux_loss_coef if model_cfg.moe.output_router_logits else 0.0

    def __post_init__(self):
        if self.normalization not in NORMALIZATIONS:
            raise ValueError(f"loss_normalization={self.normalization!r}; expected one of "
                             f"{', '.join(NORMALIZATIONS)}")
        if self.chunk_tokens < 0:
            raise ValueError(f"chunk_tokens={self.chunk_tokens} must be >= 0")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(f"label_smoothing={self.label_smoothing} must be in [0, 1)")


def token_losses(logits_BxTxV: jax.Array, targets_BxT: jax.Array, config: LossConfig
                 ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(per-token objective, per-token NLL, per-token correct) in float32, unmasked."""
    logits = logits_BxTxV.astype(jnp.float32)
    lse_BxT = jax.nn.logsumexp(logits, axis=-1)
    target_logit = jnp.take_along_axis(logits, targets_BxT[..., None], axis=-1)[..., 0]
    nll_BxT = lse_BxT - target_logit
    objective = nll_BxT
    if config.label_smoothing:
        uniform_nll = lse_BxT - logits.mean(axis=-1)
        objective = (1 - config.label_smoothing) * nll_BxT + config.label_smoothing * uniform_nll
    if config.z_loss:
        objective = objective + config.z_loss * lse_BxT ** 2
    # The target is the model's top choice: its logit is the row's maximum (a comparison
    # with the max logsumexp already takes, cheaper than argmax's value-and-index reduce;
    # an exact tie counts as correct).
    correct_BxT = target_logit >= jnp.max(logits, axis=-1)
    return objective, nll_BxT, correct_BxT


def chunked(fn: Callable[[Arrays], Arrays], inputs: Arrays, chunk_tokens: int) -> Arrays:
    """`fn` maps [b, t, ...] arrays to per-position [b, t] arrays; here it runs on
    `chunk_tokens` positions at a time (rows flattened, the last chunk padded) under
    `jax.checkpoint`, so only one chunk's logits exist in the forward or backward pass.
    0, or a chunk as large as the batch: all positions at once."""
    batch, length = next(iter(inputs.values())).shape[:2]
    total = batch * length
    if not chunk_tokens or chunk_tokens >= total:
        return fn(inputs)
    pad = -total % chunk_tokens

    def rows(x: jax.Array) -> jax.Array:
        x = x.reshape(total, *x.shape[2:])
        x = jnp.pad(x, ((0, pad),) + ((0, 0),) * (x.ndim - 1))
        return x.reshape(-1, chunk_tokens, *x.shape[1:])

    @jax.checkpoint
    def one_chunk(part: Arrays) -> Arrays:
        return {k: v[0] for k, v in fn({k: x[None] for k, x in part.items()}).items()}

    outputs = jax.lax.map(one_chunk, {k: rows(x) for k, x in inputs.items()})
    return {k: v.reshape(-1)[:total].reshape(batch, length) for k, v in outputs.items()}


def chunked_token_losses(hidden_BxTxD: jax.Array, targets_BxT: jax.Array,
                         logits_fn: Callable[[jax.Array], jax.Array], config: LossConfig
                         ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """`token_losses` of `logits_fn(hidden)`, `config.chunk_tokens` positions at a time."""
    def per_token(part: Arrays) -> Arrays:
        return dict(zip(TERMS, token_losses(logits_fn(part["hidden"]), part["targets"],
                                             config)))
    terms = chunked(per_token, {"hidden": hidden_BxTxD, "targets": targets_BxT},
                    config.chunk_tokens)
    return tuple(terms[name] for name in TERMS)


def example_weights(loss_mask_BxT: jax.Array, segment_ids_BxT: jax.Array
                    ) -> tuple[jax.Array, jax.Array]:
    """Per-token 1 / (supervised tokens of its example), and the number of examples with any
    supervised token. Examples are (row, segment id) pairs; rows never split an example."""
    length = segment_ids_BxT.shape[1]
    counts_BxS = jax.vmap(lambda m, s: jax.ops.segment_sum(m, s, num_segments=length + 1))(
        loss_mask_BxT.astype(jnp.float32), segment_ids_BxT)
    per_token = jnp.take_along_axis(counts_BxS, segment_ids_BxT, axis=1)
    weights = jnp.where(loss_mask_BxT > 0, 1.0 / jnp.maximum(per_token, 1.0), 0.0)
    examples = (counts_BxS[:, 1:] > 0).sum()
    return weights, examples.astype(jnp.float32)


def loss_sums(per_token: tuple[jax.Array, jax.Array, jax.Array], batch: dict[str, jax.Array],
              config: LossConfig, num_sources: int) -> dict[str, jax.Array]:
    """Sums for one (micro-)batch from `(objective, nll, correct)` per token (see
    `token_losses`). `numerator / denominator` is the loss; the rest are metrics.

    tokens: numerator = sum of masked per-token objective, denominator = supervised tokens.
    examples: numerator = sum over examples of their mean objective, denominator = examples.
    """
    mask = batch["loss_mask"].astype(jnp.float32)
    objective, nll, correct = per_token
    if config.normalization == "tokens":
        numerator, denominator = (objective * mask).sum(), mask.sum()
    else:
        weights, denominator = example_weights(batch["loss_mask"], batch["segment_ids"])
        numerator = (objective * weights).sum()
    source_nll = jax.ops.segment_sum((nll * mask).ravel(), batch["source_ids"].ravel(),
                                     num_segments=num_sources)
    source_tokens = jax.ops.segment_sum(mask.ravel(), batch["source_ids"].ravel(),
                                        num_segments=num_sources)
    return {"numerator": numerator, "denominator": denominator, "tokens": mask.sum(),
            "nll": (nll * mask).sum(), "correct": (correct * mask).sum(),
            "source_nll": source_nll, "source_tokens": source_tokens}


def batch_denominator(batch: Arrays, config: LossConfig) -> jax.Array:
    """The loss's denominator of a whole batch (supervised tokens or examples), from the
    batch alone: what `loss_sums` gives summed over its micro-batches."""
    if config.normalization == "tokens":
        return batch["loss_mask"].astype(jnp.float32).sum()
    return example_weights(batch["loss_mask"], batch["segment_ids"])[1]


def router_losses(stats: Arrays, num_experts: int) -> tuple[jax.Array, jax.Array]:
    """(load-balancing loss, router z-loss) of one micro-batch from its layers' router sums.

    The load-balancing loss is transformers' (`load_balancing_loss_func`, Switch
    Transformer eq. 4-6): the share of (token, expert) assignments and the mean router
    probability of each expert, each averaged over the MoE layers and the real tokens,
    then num_experts * sum of their products; padding never counts. The z-loss is the mean
    over layers and real tokens of logsumexp(router logits)^2."""
    rows = jnp.maximum(stats["tokens"].sum(), 1.0)  # layers x real tokens
    share_E = stats["counts"].sum(0) / rows
    probability_E = stats["probs"].sum(0) / rows
    return num_experts * jnp.sum(share_E * probability_E), stats["z"].sum() / rows


def batch_sums(model_cfg: ModelConfig, params: Params, batch: Arrays, config: LossConfig,
               num_sources: int = 1, extra: ExtraTerms | None = None,
               extra_inputs: Arrays | None = None,
               dropout_rng: jax.Array | None = None) -> Arrays:
    """The one forward-and-loss pass that training, held-out eval and the forgetting monitor
    share: hidden states, the LM head and cross-entropy in chunks, then `loss_sums`.

    `extra(logits, part)` adds per-position terms of a caller's own (the monitor's KL),
    given the chunk's logits and its slice of `extra_inputs` ([B, T, ...] arrays); each is
    summed over the real (non-padding) positions, whose count is `positions`.
    """
    router = {}
    if model_cfg.moe is None:
        hidden = models.hidden_states(model_cfg, params, batch["inputs"], batch["positions"],
                                      batch["segment_ids"], dropout_rng)
    else:
        hidden, router = hidden_states_and_router(model_cfg, params, batch["inputs"],
                                                  batch["positions"], batch["segment_ids"],
                                                  dropout_rng)

    def per_token(part: Arrays) -> Arrays:
        logits = models.logits_from_hidden(model_cfg, params, part["hidden"])
        terms = dict(zip(TERMS, token_losses(logits, part["targets"], config)))
        if extra is not None:
            terms.update(extra(logits, part))
        return terms

    terms = chunked(per_token, {"hidden": hidden, "targets": batch["targets"],
                                **(extra_inputs or {})}, config.chunk_tokens)
    sums = loss_sums(tuple(terms[name] for name in TERMS), batch, config, num_sources)
    if router:
        aux, z = router_losses(router, model_cfg.moe.num_experts)
        # Per micro-batch: the step averages these over its micro-batches.
        sums.update(router_aux=aux, router_z=z, router_batches=jnp.float32(1.0),
                    router_objective=config.aux_weight(model_cfg) * aux
                    + config.router_z_loss * z,
                    expert_counts=router["counts"])
    if extra is not None:
        real = batch["segment_ids"] > 0
        sums["positions"] = real.sum()
        sums.update({k: jnp.where(real, v, 0.0).sum() for k, v in terms.items()
                     if k not in TERMS})
    return sums
