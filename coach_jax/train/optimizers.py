"""Optimizers by name, with their hyperparameters from the config.

The researcher's swap: `name` picks an optax factory (a short name, or any factory by
dotted path such as `optax.contrib.ademamix`); `hparams` are passed to it as keyword
arguments and checked against its signature first. Around it, the same for every
optimizer: global-norm clipping, learning-rate multiplier groups, the schedule, and weight
decay masked off norms and biases.

`weight_decay` is accepted by every optimizer and means decoupled decay,
p <- p - lr(t) * wd * p with lr(t) the scheduled rate times the group's multiplier, outside
any sign or normalisation of the update: so a recipe's `weight_decay` survives swapping
`optimizer.name` on the command line. Factories whose own `weight_decay` already is that
rule and take a mask get it passed through (NATIVE_DECAY); every other factory gets it
chained after its update (`decoupled_weight_decay`). Unset, each optimizer keeps its own
default (optax's 1e-4 for adamw, none for sgd, adam, adafactor...).

Muon orthogonalises each 2-D matrix (every layer's own, when layers are stacked under
scan) and uses AdamW for embeddings, the LM head, norms and biases.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import optax

from coach_jax.models.decoder import Params, kernel_input_dims, path_str
from coach_jax.train import param_groups
from coach_jax.train.schedules import ScheduleConfig, make_schedule


def _decay(updates: Any, params: Any, rate: Any, mask: Any) -> Any:
    """updates - rate * params where `mask` (a tree of bools, a function of the params, or
    None for every leaf) is True; the update keeps its dtype."""
    keep = mask(params) if callable(mask) else mask
    if keep is None:
        keep = jax.tree.map(lambda _: True, params)
    return jax.tree.map(lambda u, p, k: (u - rate * p).astype(u.dtype) if k else u,
                        updates, params, keep)


def decoupled_weight_decay(weight_decay: float, learning_rate: optax.ScalarOrSchedule,
                           mask: Any = None) -> optax.GradientTransformation:
    """Chained after an optimizer's own (already -lr scaled) update: subtracts
    lr(t) * weight_decay * p. Not `add_decayed_weights` + a learning-rate scale, which
    would scale the optimizer's update a second time."""
    def init(params):
        del params
        return optax.ScaleByScheduleState(count=jnp.zeros([], jnp.int32))

    def update(updates, state, params=None):
        if params is None:
            raise ValueError(optax.NO_PARAMS_MSG)
        lr = learning_rate(state.count) if callable(learning_rate) else learning_rate
        updates = _decay(updates, params, weight_decay * lr, mask)
        return updates, optax.ScaleByScheduleState(optax.safe_increment(state.count))

    return optax.GradientTransformation(init, update)


def schedule_free_adamw(learning_rate: float = 0.0025, warmup_steps: int | None = None,
                        b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8,
                        weight_decay: float = 0.0, weight_lr_power: float = 2.0,
                        state_dtype: Any = None, mask: Any = None
                        ) -> optax.GradientTransformation:
    """optax.contrib.schedule_free_adamw with a weight-decay mask (optax's decays every
    parameter, norms too). Its decay is schedule-free AdamW's own: lr * wd * y on the z
    sequence; decay chained outside would be undone by the next step's interpolation.
    `warmup_steps=0` means no warmup (optax's would hold the learning rate at 0)."""
    if warmup_steps:
        learning_rate = optax.warmup_constant_schedule(0.0, learning_rate, warmup_steps)
    base = optax.chain(
        optax.scale_by_rms(decay=b2, eps=eps, eps_in_sqrt=False, bias_correction=True),
        optax.add_decayed_weights(weight_decay, mask),
        optax.scale_by_learning_rate(learning_rate))
    return optax.contrib.schedule_free(base, learning_rate, b1, weight_lr_power, state_dtype)


def prodigy(learning_rate: optax.ScalarOrSchedule = 1.0,
            betas: tuple[float, float] = (0.9, 0.999), beta3: float | None = None,
            eps: float = 1e-8, estim_lr0: float = 1e-6, estim_lr_coef: float = 1.0,
            weight_decay: float = 0.0, safeguard_warmup: bool = False, mask: Any = None
            ) -> optax.GradientTransformation:
    """optax.contrib.prodigy with a weight-decay mask (optax's has none). The decay stays
    Prodigy's: its lr(t) is the estimated step size d * learning_rate(t) * bias correction,
    since its `learning_rate` is a multiplier near 1 (lr(t) * wd * p would decay far too
    fast)."""
    inner = optax.contrib.prodigy(learning_rate, betas, beta3, eps, estim_lr0, estim_lr_coef,
                                  0.0, safeguard_warmup)
    if not weight_decay:
        return inner
    b1, b2 = betas

    def update(updates, state, params=None):
        if params is None:
            raise ValueError(optax.NO_PARAMS_MSG)
        scale = learning_rate(state.count) if callable(learning_rate) else learning_rate
        step = optax.safe_increment(state.count)
        step_size = state.estim_lr * scale * jnp.sqrt(1 - b2**step) / (1 - b1**step)
        updates, new_state = inner.update(updates, state, params)
        return _decay(updates, params, weight_decay * step_size, mask), new_state

    return optax.GradientTransformation(inner.init, update)


FACTORIES: dict[str, Callable[..., optax.GradientTransformation]] = {
    "adamw": optax.adamw, "adam": optax.adam, "sgd": optax.sgd, "lion": optax.lion,
    "adafactor": optax.adafactor, "lamb": optax.lamb, "nadamw": optax.nadamw,
    "muon": optax.contrib.muon, "schedule_free_adamw": schedule_free_adamw,
    "prodigy": prodigy, "adopt": optax.contrib.adopt, "ademamix": optax.contrib.ademamix,
}
# Factories whose own `weight_decay` (with their `mask`) is decoupled decay scaled by their
# learning rate: passed through. LAMB's sits inside its trust ratio, as LAMB defines it;
# schedule-free's and Prodigy's are described on their wrappers above. Every other factory
# (sgd, adam, adafactor, muon, adopt, any dotted path) gets `decoupled_weight_decay`.
NATIVE_DECAY = (optax.adamw, optax.nadamw, optax.lion, optax.lamb, optax.contrib.ademamix,
                schedule_free_adamw, prodigy)
SCHEDULE_FREE = ("schedule_free_adamw",)
# Arguments the trainer sets itself; not hyperparameters.
_MANAGED = {"learning_rate", "mask", "weight_decay_mask", "muon_weight_dimension_numbers"}


class OptimizerConfigError(ValueError):
    """An optimizer, schedule or hyperparameter the config names that does not exist."""


class UnknownHparamsError(OptimizerConfigError):
    """Hyperparameters the optimizer's factory does not take; `unknown` and `accepted` let
    the config layer name them in its own words."""

    def __init__(self, name: str, unknown: list[str], accepted: list[str]):
        self.name, self.unknown, self.accepted = name, unknown, accepted
        super().__init__(f"optimizer {name!r} does not accept "
                         f"{', '.join(map(repr, unknown))}; it accepts: {', '.join(accepted)}")


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """Checked once, when built: the factory exists, takes every hyperparameter, and a
    schedule-free optimizer is given the constant schedule it needs."""

    name: str = "adamw"
    learning_rate: float = 1e-5  # the peak, shaped by the schedule
    hparams: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    grad_clip_norm: float | None = 1.0  # None or 0: no clipping
    schedule: ScheduleConfig = ScheduleConfig()
    decay_norms_and_biases: bool = False

    def __post_init__(self):
        accepted = accepted_hparams(resolve_factory(self.name))
        unknown = sorted(set(self.hparams) - set(accepted))
        if unknown:
            raise UnknownHparamsError(self.name, unknown, accepted)
        if self.name in SCHEDULE_FREE and self.schedule.name != "constant":
            raise OptimizerConfigError(
                f"{self.name} replaces the schedule (it warms up by itself): set "
                f"schedule.name='constant', got {self.schedule.name!r}")


def resolve_factory(name: str) -> Callable[..., optax.GradientTransformation]:
    if name in FACTORIES:
        return FACTORIES[name]
    if name.startswith("optax."):
        module_name, _, attribute = name.rpartition(".")
        try:
            factory = getattr(importlib.import_module(module_name), attribute)
        except (ImportError, AttributeError) as e:
            raise OptimizerConfigError(f"optimizer {name!r} not found in optax") from e
        if callable(factory):
            return factory
    raise OptimizerConfigError(f"unknown optimizer {name!r}; expected one of "
                               f"{', '.join(FACTORIES)}, or an optax factory by dotted path "
                               "such as optax.contrib.ademamix")


def accepted_hparams(factory: Callable[..., Any]) -> list[str]:
    """The factory's keyword arguments, plus `weight_decay`, which every optimizer takes."""
    parameters = inspect.signature(factory).parameters
    names = [n for n, p in parameters.items()
             if n not in _MANAGED and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    return names if "weight_decay" in names else names + ["weight_decay"]


def _param_path(key_path: tuple[Any, ...]) -> str:
    """The parameter's path, also inside logical-axis boxes (parallel.state_shardings
    traces the optimizer's init on boxed parameters)."""
    return path_str(tuple(k for k in key_path if not isinstance(k, jax.tree_util.GetAttrKey)))


def decay_mask(params: Params) -> Params:
    """True where weight decay applies: everything but norm scales and biases."""
    return jax.tree_util.tree_map_with_path(
        lambda p, _: _param_path(p).rsplit("/", 1)[-1] not in ("scale", "bias"), params)


def muon_dimensions(params: Params) -> Params:
    """Muon's view of each parameter: projection kernels are matrices (inputs x outputs,
    leading `layers` axis batched); embeddings, LM head, norms and biases are not (None)."""
    def spec(path, x):
        name = _param_path(path)
        if not name.endswith("/kernel"):
            return None
        first = 1 if name.startswith("layers/") else 0
        n_in = kernel_input_dims(name)
        inputs = tuple(range(first, first + n_in))
        return optax.contrib.MuonDimensionNumbers(inputs, tuple(range(first + n_in, x.ndim)))
    return jax.tree_util.tree_map_with_path(spec, params)


def _factory_kwargs(config: OptimizerConfig, parameters: Mapping[str, Any], warmup: int,
                    mask: Any) -> dict[str, Any]:
    """The config's hyperparameters plus what the trainer sets: the decay mask, Muon's
    matrix dimensions, the warmup of optimizers that warm up themselves."""
    kwargs = dict(config.hparams)
    for mask_name in ("mask", "weight_decay_mask"):
        if mask_name in parameters and mask is not None:
            kwargs[mask_name] = mask
    if "muon_weight_dimension_numbers" in parameters:
        kwargs["muon_weight_dimension_numbers"] = muon_dimensions
    if config.name in SCHEDULE_FREE:
        kwargs.setdefault("warmup_steps", warmup)
    if "safeguard_warmup" in parameters and warmup:
        # Prodigy: a first step at learning rate 0 makes its step-size estimate 0 / 0 = NaN.
        kwargs.setdefault("safeguard_warmup", True)
    return kwargs


def _base(config: OptimizerConfig, learning_rate: Any, warmup: int,
          decay_norms_and_biases: bool) -> optax.GradientTransformation:
    factory = resolve_factory(config.name)
    parameters = inspect.signature(factory).parameters
    mask = None if decay_norms_and_biases else decay_mask
    kwargs = _factory_kwargs(config, parameters, warmup, mask)
    chained_decay = 0.0
    if factory not in NATIVE_DECAY and "weight_decay" in kwargs:
        chained_decay = kwargs.pop("weight_decay")
        if "weight_decay" in parameters:
            kwargs["weight_decay"] = 0.0  # the factory's own (muon's): ours replaces it
    tx = factory(learning_rate, **kwargs)
    if not chained_decay:
        return tx
    return optax.chain(tx, decoupled_weight_decay(chained_decay, learning_rate, mask))


def make_optimizer(config: OptimizerConfig, label_tree: Params, total_steps: int
                   ) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """The transformation over the *trainable* tree, and the learning-rate schedule.

    `label_tree` (from param_groups.labels) gives each trainable leaf its multiplier group.
    """
    schedule = make_schedule(config.schedule, config.learning_rate, total_steps)
    warmup = config.schedule.warmup(total_steps)
    groups = sorted({l for l in jax.tree.leaves(label_tree) if l != param_groups.FROZEN})
    if not groups:
        raise OptimizerConfigError("every parameter is frozen: nothing to train")
    if config.name in SCHEDULE_FREE:
        if len(groups) > 1:
            raise OptimizerConfigError(f"{config.name} does not support learning-rate "
                                       "multiplier groups")
        schedule = make_schedule(ScheduleConfig("constant", warmup_steps=warmup),
                                 config.learning_rate, total_steps)

    def for_group(label: str) -> optax.GradientTransformation:
        scale = param_groups.multiplier(label)
        lr = config.learning_rate * scale if config.name in SCHEDULE_FREE else (
            lambda step: schedule(step) * scale)
        return _base(config, lr, warmup, config.decay_norms_and_biases)

    if len(groups) == 1:
        inner = for_group(groups[0])
    else:
        trainable_labels = jax.tree.map(
            lambda l: None if l == param_groups.FROZEN else l, label_tree)
        inner = optax.multi_transform({g: for_group(g) for g in groups}, trainable_labels)
    parts = [inner]
    if config.grad_clip_norm:
        parts.insert(0, optax.clip_by_global_norm(config.grad_clip_norm))
    return optax.chain(*parts), schedule


def eval_params(config: OptimizerConfig, opt_state: Any, trainable: Params) -> Params:
    """The parameters to evaluate and export: schedule-free optimizers keep an average."""
    if config.name not in SCHEDULE_FREE:
        return trainable
    is_state = lambda x: isinstance(x, optax.contrib.ScheduleFreeState)
    states = [s for s in jax.tree.leaves(opt_state, is_leaf=is_state) if is_state(s)]
    return optax.contrib.schedule_free_eval_params(states[0], trainable)
