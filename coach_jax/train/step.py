"""`train_step(state, batch) -> (state, metrics)`: the coach's critique and the adjustment.

Pure and jitted once. The loss is token-exact: masked NLL summed over the whole batch (all
micro-batches) and divided once by the global count of supervised tokens (or examples), so
accumulating k micro-batches equals one big batch. Frozen parameters are closed over, not
differentiated. No host sync: metrics come back as device scalars for the loop to read.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from coach_jax import parallel
from coach_jax.models.config import ModelConfig
from coach_jax.models.decoder import Params
from coach_jax.models.lora import join_base
from coach_jax.train import param_groups
from coach_jax.train.loss import LossConfig, batch_denominator, batch_sums
from coach_jax.train.optimizers import OptimizerConfig, make_optimizer
from coach_jax.train.state import TrainState

Batch = dict[str, jax.Array]
Metrics = dict[str, jax.Array]


@dataclasses.dataclass(frozen=True)
class StepConfig:
    model: ModelConfig
    loss: LossConfig = LossConfig()
    micro_batches: int = 1
    num_sources: int = 1


@dataclasses.dataclass(frozen=True)
class StepParts:
    """What the step closes over besides its config: the optimizer and the parameter groups."""

    tx: optax.GradientTransformation
    schedule: optax.Schedule
    label_tree: Params
    layer_mask: Params | None = None


def _micro_batches(batch: Batch, k: int) -> Batch:
    """[B, T] -> [k, B / k, T]: whole rows per micro-batch, so examples are never split."""
    rows = next(iter(batch.values())).shape[0]
    if rows % k:
        raise ValueError(f"batch of {rows} rows does not split into {k} micro-batches")
    return {name: x.reshape(k, rows // k, *x.shape[1:]) for name, x in batch.items()}


def train_step(state: TrainState, batch: Batch, base: Params | None = None, *,
               config: StepConfig, parts: StepParts) -> tuple[TrainState, Metrics]:
    """`base`: an adapter run's frozen base weights, kept outside the state (never copied,
    donated or checkpointed); the model applies them joined with `state.params`."""
    trainable, frozen = param_groups.split(state.params, parts.label_tree)

    def model_params(p: Params) -> Params:
        params = param_groups.merge(p, frozen)
        return params if base is None else join_base(base, params)

    # Dropout (LoRA's): a mask per step and micro-batch, from the state's key.
    lora = config.model.lora
    step_rng = (jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
                if lora is not None and lora.dropout > 0 else None)

    # MoE routers' losses are means per micro-batch, averaged over the micro-batches: they
    # join the numerator scaled by the batch's denominator, which the gradient sum is
    # divided by below.
    router_scale = (jnp.maximum(batch_denominator(batch, config.loss), 1.0)
                    / config.micro_batches if config.model.moe is not None else None)

    def sums_and_grads(trainable_params: Params, micro: Batch, index: jax.Array
                       ) -> tuple[dict, Params]:
        rng = None if step_rng is None else jax.random.fold_in(step_rng, index)

        def numerator(p):
            sums = batch_sums(config.model, model_params(p), micro, config.loss,
                              config.num_sources, dropout_rng=rng)
            objective = sums["numerator"]
            if router_scale is not None:
                objective = objective + sums["router_objective"] * router_scale
            return objective, sums
        (_, sums), grads = jax.value_and_grad(numerator, has_aux=True)(trainable_params)
        return sums, grads

    if config.micro_batches == 1:
        sums, grad_sum = sums_and_grads(trainable, batch, jnp.int32(0))
    else:
        def accumulate(carry, indexed):
            micro, index = indexed
            sums, grads = sums_and_grads(trainable, micro, index)
            return jax.tree.map(jnp.add, carry, (sums, grads)), None
        zeros = jax.eval_shape(sums_and_grads, trainable,
                               jax.tree.map(lambda x: x[0], _micro_batches(batch, 1)),
                               jnp.int32(0))
        zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), zeros)
        (sums, grad_sum), _ = jax.lax.scan(
            accumulate, zeros, (_micro_batches(batch, config.micro_batches),
                                jnp.arange(config.micro_batches, dtype=jnp.int32)))

    denominator = jnp.maximum(sums["denominator"], 1.0)
    grads = jax.tree.map(lambda g: g / denominator, grad_sum)
    grads = param_groups.apply_mask(grads, parts.layer_mask)
    updates, opt_state = parts.tx.update(grads, state.opt_state, trainable)
    updates = param_groups.apply_mask(updates, parts.layer_mask)
    new_trainable = optax.apply_updates(trainable, updates)
    params = param_groups.merge(new_trainable, frozen)

    tokens = jnp.maximum(sums["tokens"], 1.0)
    loss = sums["numerator"] / denominator
    grad_norm = optax.tree.norm(grads)
    metrics = {
        "loss": loss,
        "nll": sums["nll"] / tokens,
        "supervised_tokens": sums["tokens"],
        "token_accuracy": sums["correct"] / tokens,
        "grad_norm": grad_norm,
        "update_norm": optax.tree.norm(updates),
        "param_norm": optax.tree.norm(params),
        "learning_rate": jnp.asarray(parts.schedule(state.step), jnp.float32),
        "source_loss": sums["source_nll"] / jnp.maximum(sums["source_tokens"], 1.0),
        "source_tokens": sums["source_tokens"],
        "finite": jnp.isfinite(loss) & jnp.isfinite(grad_norm),
    }
    if "router_aux" in sums:
        metrics.update(router_metrics(sums))
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
    return new_state, metrics


def router_metrics(sums: dict[str, jax.Array]) -> Metrics:
    """MoE metrics: the router losses (means over micro-batches), `router_loss`, their
    weighted sum that the step adds to `loss`, and per MoE layer the busiest and the
    idlest expert's share of the (token, expert) assignments (1 / experts each when
    balanced)."""
    batches = sums["router_batches"]
    counts_LxE = sums["expert_counts"]
    share_LxE = counts_LxE / jnp.maximum(counts_LxE.sum(-1, keepdims=True), 1.0)
    return {"router_aux_loss": sums["router_aux"] / batches,
            "router_z_loss": sums["router_z"] / batches,
            "router_loss": sums["router_objective"] / batches,
            "expert_share_max": share_LxE.max(-1), "expert_share_min": share_LxE.min(-1)}


def compile_train_step(config: StepConfig, parts: StepParts, state_sharding: Any = None,
                       batch_sharding: Any = None, base_sharding: Any = None):
    """`train_step` jitted once: the state is donated, shardings explicit when given (an
    adapter run's base, the third argument, keeps `base_sharding`)."""
    step = functools.partial(train_step, config=config, parts=parts)
    if state_sharding is None and batch_sharding is None:
        return jax.jit(step, donate_argnums=0)
    step = parallel.traced_on_mesh(step, getattr(batch_sharding, "mesh", None))
    return jax.jit(step, in_shardings=(state_sharding, batch_sharding, base_sharding),
                   out_shardings=(state_sharding, None), donate_argnums=0)



def prepare(model_cfg: ModelConfig, params: Params, optimizer: OptimizerConfig,
            groups: param_groups.ParamGroups, total_steps: int, *,
            loss: LossConfig = LossConfig(), micro_batches: int = 1, num_sources: int = 1
            ) -> tuple[StepConfig, StepParts]:
    """What `compile_train_step` and `create_state` need, from the run's choices."""
    param_groups.check_rules_match(params, groups)
    label_tree = param_groups.labels(params, groups, model_cfg.num_layers)
    tx, schedule = make_optimizer(optimizer, label_tree, total_steps)
    trainable, _ = param_groups.split(params, label_tree)
    parts = StepParts(tx, schedule, label_tree,
                      param_groups.layer_update_mask(trainable, groups, model_cfg.num_layers))
    return StepConfig(model_cfg, loss, micro_batches, num_sources), parts


def create_state(params: Params, parts: StepParts, seed: int = 0) -> TrainState:
    """The initial state; jit it with out_shardings to create it directly sharded."""
    return TrainState.create(params, parts.tx, parts.label_tree, seed)


def setup(model_cfg: ModelConfig, params: Params, optimizer: OptimizerConfig,
          groups: param_groups.ParamGroups, total_steps: int, *, loss: LossConfig = LossConfig(),
          micro_batches: int = 1, num_sources: int = 1, seed: int = 0
          ) -> tuple[TrainState, StepConfig, StepParts]:
    """`prepare` and `create_state` in one, on the default device."""
    step_config, parts = prepare(model_cfg, params, optimizer, groups, total_steps, loss=loss,
                                 micro_batches=micro_batches, num_sources=num_sources)
    return create_state(params, parts, seed), step_config, parts


class NonFiniteError(FloatingPointError):
    """A NaN or inf loss or gradient: the run stops and this state is never saved."""


def check_finite(metrics: dict[str, Any], step: int) -> None:
    if not bool(np.asarray(metrics["finite"])):
        raise NonFiniteError(
            f"step {step}: non-finite loss ({float(metrics['loss'])}) or gradient norm "
            f"({float(metrics['grad_norm'])}); stopping without saving this state. Try a "
            "lower learning rate, grad clipping, or fp32 compute to find the cause.")
