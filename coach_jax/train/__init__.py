"""Training: loss, optimizers and schedules, parameter groups, the train step."""

from coach_jax.train.loss import LossConfig
from coach_jax.train.optimizers import (FACTORIES, OptimizerConfig, OptimizerConfigError,
                                        eval_params, make_optimizer)
from coach_jax.train.param_groups import FROZEN, ParamGroups
from coach_jax.train.schedules import SCHEDULES, ScheduleConfig, make_schedule
from coach_jax.train.state import TrainState
from coach_jax.train.step import (NonFiniteError, StepConfig, StepParts, check_finite,
                                  compile_train_step, create_state, prepare, setup, train_step)

__all__ = [
    "FACTORIES", "FROZEN", "LossConfig", "NonFiniteError", "OptimizerConfig",
    "OptimizerConfigError", "ParamGroups", "SCHEDULES", "ScheduleConfig", "StepConfig",
    "StepParts", "TrainState", "check_finite", "compile_train_step", "create_state", "eval_params",
    "make_optimizer", "make_schedule", "prepare", "setup", "train_step",
]
