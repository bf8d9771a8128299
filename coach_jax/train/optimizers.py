"""Optimizers by name, with their hyperparameters from the config.

The researcher's swap: `name` picks an optax factory (a short name, or any factory by
dotted path such as `optax.contrib.ademamix`); `hparams` are passed to it as keyword
arguments and checked against its signature first. Around it: global-norm clipping,
weight decay masked off norms and biases, learning-rate multiplier groups, and the
schedule. Muon orthogonalises each 2-D matrix (every layer's own, when layers are stacked
under scan) and uses AdamW for embeddings, the LM head, norms and biases.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
from typing import Any, Callable, Mapping

import jax
import optax

from coach_jax.models.decoder import Params, kernel_input_dims, path_str
from coach_jax.train import param_groups
from coach_jax.train.schedules import ScheduleConfig, make_schedule

FACTORIES: dict[str, Callable[..., optax.GradientTransformation]] = {
    "adamw": optax.adamw, "adam": optax.adam, "sgd": optax.sgd, "lion": optax.lion,
    "adafactor": optax.adafactor, "lamb": optax.lamb, "nadamw": optax.nadamw,
    "muon": optax.contrib.muon, "schedule_free_adamw": optax.contrib.schedule_free_adamw,
    "prodigy": optax.contrib.prodigy, "adopt": optax.contrib.adopt,
    "ademamix": optax.contrib.ademamix,
}
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
    parameters = inspect.signature(factory).parameters
    return [n for n, p in parameters.items()
            if n not in _MANAGED and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]


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


def _base(config: OptimizerConfig, learning_rate: Any, warmup: int,
          decay_norms_and_biases: bool) -> optax.GradientTransformation:
    factory = resolve_factory(config.name)
    kwargs = dict(config.hparams)
    parameters = inspect.signature(factory).parameters
    if not decay_norms_and_biases:
        for mask_name in ("mask", "weight_decay_mask"):
            if mask_name in parameters:
                kwargs[mask_name] = decay_mask
    if "muon_weight_dimension_numbers" in parameters:
        kwargs["muon_weight_dimension_numbers"] = muon_dimensions
    if config.name in SCHEDULE_FREE:
        kwargs.setdefault("warmup_steps", warmup)
    return factory(learning_rate, **kwargs)


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
