"""The train state: everything a step reads and writes, as one pytree."""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp
import optax

from coach_jax.models.decoder import Params
from coach_jax.train import param_groups


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: optimizer updates done
    params: Params  # the full tree, frozen leaves included
    opt_state: optax.OptState  # over the trainable tree only
    rng: jax.Array  # a key, folded with the step for anything stochastic

    @classmethod
    def create(cls, params: Params, tx: optax.GradientTransformation, label_tree: Params,
               seed: int = 0) -> "TrainState":
        trainable, _ = param_groups.split(params, label_tree)
        return cls(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(trainable),
                   rng=jax.random.key_data(jax.random.key(seed)))

