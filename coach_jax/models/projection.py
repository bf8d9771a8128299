"""The projection seam: how a `layers.Projection` holds and applies its weight.

Every linear map of the decoder (q/k/v/o, gate/up/down) reads its weight through the
`Strategy` that `ModelConfig.projection` names. A strategy may declare the weight in
another representation (quantized base weights), add parameters that change the output
(LoRA), and give the projections of one fused group ("qkv", "gate_up", see
`families.Fused`) parameters they share. Attention, MLP and decoder never change for it.
The base `Strategy` is the dense projection: one `kernel`, nothing added.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import flax.linen as nn
import jax

if TYPE_CHECKING:
    from coach_jax.models.config import ModelConfig
    from coach_jax.models.layers import Projection


class Strategy:
    """Dense projections; subclass and override what differs."""

    def kernel(self, proj: Projection, in_shape: tuple[int, ...]) -> jax.Array:
        """Declares the weight's parameters on `proj` and returns the kernel
        [*in_shape, *proj.out_shape] (cast to the compute dtype by the caller)."""
        return proj.declare("kernel", nn.initializers.normal(proj.cfg.initializer_range),
                            (*in_shape, *proj.out_shape), (*proj.in_axes, *proj.out_axes))

    def adapt(self, proj: Projection, rows_NxI: jax.Array, y_NxO: jax.Array) -> jax.Array:
        """The output given the flattened input rows [N, in] and the kernel's output
        [N, out], before the bias: where extra parameters (declared on `proj`, or on
        `proj.shared` for the group) add their term."""
        return y_NxO

    def shared(self, cfg: ModelConfig, group: str) -> nn.Module | None:
        """A module of parameters shared by the projections of `group`, or None. It is
        built inside their parent module, so it is named `group` there (for example
        `layers/self_attn/qkv/...`), and each member reaches it as `proj.shared`."""
        return None


STRATEGIES: dict[str, Strategy] = {"dense": Strategy()}


def register(name: str, strategy: Strategy) -> Strategy:
    """Makes `strategy` selectable as `ModelConfig(projection=name)`."""
    if name in STRATEGIES:
        raise ValueError(f"projection strategy {name!r} is already registered")
    STRATEGIES[name] = strategy
    return strategy
