"""LoRA as a projection strategy: y = x W + scale * (x A) B on the targeted projections.

A is [in..., r] and starts Kaiming-uniform as PEFT starts it (bound 1/sqrt(fan_in)); B is
[r, out...] and starts at zero, so an adapter at init computes the base model exactly.
Both carry the logical axes of the base kernel's input and output dims (A's input is
sharded like the kernel's, B's output like the kernel's) and a replicated `lora_rank`.
Projections the checkpoint fuses (Phi-3's qkv_proj) share one A on their parent module,
as PEFT's single LoRA on the fused module does, and each keeps its rows of B.

A mixture's stacked experts are parameters, not projections: `ExpertLora` gives each
expert its own A [experts, in, r] and B [experts, r, out] and folds scale * A_e B_e into
the expert's weight before the grouped matmul, as PEFT's `target_parameters` wrapper does.
"""

from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING

import flax.linen as nn
import jax
import jax.numpy as jnp

from coach_jax.models import families, projection

if TYPE_CHECKING:
    from coach_jax.models.config import ModelConfig
    from coach_jax.models.layers import Projection

LEAVES = ("lora_a", "lora_b")  # the parameter names an adapter adds
# Our names of a mixture's stacked expert weights, adaptable as the projections are.
EXPERT_MODULES = ("mlp/experts/gate_proj", "mlp/experts/up_proj", "mlp/experts/down_proj")


@dataclasses.dataclass(frozen=True)
class LoraSpec:
    """Which projections get an adapter and its size. `modules` are ours
    ("self_attn/q_proj"), resolved from Hugging Face target names by adapters.targets."""

    rank: int
    alpha: float
    modules: tuple[str, ...]
    use_rslora: bool = False
    # Dropout on the adapter's input, in training only (when the forward pass is given a
    # "dropout" rng): inverted, so evaluation needs no rescaling.
    dropout: float = 0.0
    # The decoder layers that have the adapter (PEFT's layers_to_transform); None: all.
    # Under scan every layer holds A and B, and the others' B stays zero (their rows of
    # the gradient and update are masked: train.param_groups).
    layers: tuple[int, ...] | None = None

    def __post_init__(self):
        if self.rank < 1:
            raise ValueError(f"adapter.rank={self.rank} must be at least 1")
        if not self.modules:
            raise ValueError("an adapter needs at least one target module")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"adapter.dropout={self.dropout} must be in [0, 1)")
        if self.dropout and set(self.modules) & set(EXPERT_MODULES):
            raise ValueError(f"adapter.dropout={self.dropout} cannot act on the experts (their "
                             "update is folded into the weight, as in PEFT, which refuses it "
                             "too): set adapter.dropout=0 or leave the experts out of "
                             "adapter.targets")

    @property
    def scale(self) -> float:
        """alpha / r, or alpha / sqrt(r) with rsLoRA (PEFT's `scaling`)."""
        return self.alpha / (math.sqrt(self.rank) if self.use_rslora else self.rank)


def kaiming_uniform(key: jax.Array, shape: tuple[int, ...], dtype=jnp.float32) -> jax.Array:
    """PEFT's A init (torch's kaiming_uniform_ with a=sqrt(5)): U(-b, b), b = 1/sqrt(fan_in),
    fan_in being every dim but the last (the rank)."""
    bound = 1.0 / math.sqrt(math.prod(shape[:-1]))
    return jax.random.uniform(key, shape, dtype, -bound, bound)


def expert_kaiming_uniform(key: jax.Array, shape: tuple[int, ...], dtype=jnp.float32
                           ) -> jax.Array:
    """An expert's A [experts, in, r] as PEFT starts it: bound 1/sqrt(in) per expert."""
    bound = 1.0 / math.sqrt(shape[-2])
    return jax.random.uniform(key, shape, dtype, -bound, bound)


def adapter_module(module: str) -> str:
    """Where the A and B of our projection `module` live: in the projection's module, or
    for an expert weight (a parameter, not a module) beside it: "mlp/experts/up_proj_lora"."""
    return f"{module}_lora" if module in EXPERT_MODULES else module


class ExpertLora(nn.Module):
    """W_e + scale * A_e B_e for every expert e of one stacked weight [experts, in, out]:
    folded into the weight, so the ragged, blocked and expert-parallel paths run it as
    they run the base. `axes`: the weight's logical axes (A and B shard as it does)."""

    cfg: ModelConfig
    axes: tuple[str, str, str]

    @nn.compact
    def __call__(self, weight_ExIxO: jax.Array) -> jax.Array:
        spec, dtype = self.cfg.lora, jnp.dtype(self.cfg.param_dtype)
        experts, width_in, width_out = weight_ExIxO.shape
        expert, in_axis, out_axis = self.axes
        a = self.param("lora_a", nn.with_logical_partitioning(
            expert_kaiming_uniform, (expert, in_axis, "lora_rank")),
            (experts, width_in, spec.rank), dtype)
        b = self.param("lora_b", nn.with_logical_partitioning(
            nn.initializers.zeros, (expert, "lora_rank", out_axis)),
            (experts, spec.rank, width_out), dtype)
        compute = weight_ExIxO.dtype
        delta = jnp.einsum("eir,ero->eio", a.astype(compute), b.astype(compute))
        return weight_ExIxO + jnp.asarray(spec.scale, compute) * delta


def is_adapter_path(path: str) -> bool:
    return path.rsplit("/", 1)[-1] in LEAVES


def join_base(base: dict, adapter: dict) -> dict:
    """One parameter tree of a frozen base and an adapter's leaves (shares the arrays)."""
    out = dict(base)
    for key, value in adapter.items():
        out[key] = join_base(out.get(key, {}), value) if isinstance(value, dict) else value
    return out


def _module(proj: Projection) -> str:
    """Our name of the projection: "self_attn/q_proj"."""
    return "/".join(proj.scope.path[-2:])


class SharedA(nn.Module):
    """One A for the projections of a fused group: x A computed from their shared input."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, rows_NxI: jax.Array, in_shape: tuple[int, ...],
                 in_axes: tuple[str, ...]) -> jax.Array:
        a = _a(self, self.cfg, in_shape, in_axes)
        rows_NxI = _dropout(self, self.cfg.lora, rows_NxI)
        return rows_NxI @ a.reshape(rows_NxI.shape[-1], -1).astype(rows_NxI.dtype)


def _dropout(module: nn.Module, spec: LoraSpec, rows_NxI: jax.Array) -> jax.Array:
    """The adapter's input dropout, where training gave the forward pass a dropout rng."""
    if not spec.dropout or not module.has_rng("dropout"):
        return rows_NxI
    keep = jax.random.bernoulli(module.make_rng("dropout"), 1.0 - spec.dropout,
                                rows_NxI.shape)
    return jnp.where(keep, rows_NxI / (1.0 - spec.dropout), 0).astype(rows_NxI.dtype)


def _a(module: nn.Module, cfg: ModelConfig, in_shape: tuple[int, ...],
       in_axes: tuple[str, ...]) -> jax.Array:
    return module.param("lora_a", nn.with_logical_partitioning(kaiming_uniform,
                                                               (*in_axes, "lora_rank")),
                        (*in_shape, cfg.lora.rank), jnp.dtype(cfg.param_dtype))


class Lora(projection.Strategy):
    """The dense kernel plus a low-rank update on the modules `cfg.lora` names. A kernel
    held quantized (QLoRA's base, models/quantize.py) is dequantized here, when the
    projection runs."""

    def kernel(self, proj: Projection, in_shape: tuple[int, ...]) -> jax.Array:
        kernel = super().kernel(proj, in_shape)
        if isinstance(kernel, jax.Array):
            return kernel
        from coach_jax.models import quantize  # qwix is needed only for QLoRA
        return quantize.dequantize(kernel, proj.cfg.compute_dtype)

    def adapt(self, proj: Projection, rows_NxI: jax.Array, y_NxO: jax.Array) -> jax.Array:
        spec = proj.cfg.lora
        if _module(proj) not in spec.modules:
            return y_NxO
        in_shape = _in_shape(proj, rows_NxI)
        if proj.shared is not None:
            xa_NxR = proj.shared(rows_NxI, in_shape, proj.in_axes)
        else:
            a = _a(proj, proj.cfg, in_shape, proj.in_axes)
            xa_NxR = (_dropout(proj, spec, rows_NxI)
                      @ a.reshape(rows_NxI.shape[-1], -1).astype(rows_NxI.dtype))
        b = proj.declare("lora_b", nn.initializers.zeros, (spec.rank, *proj.out_shape),
                         ("lora_rank", *proj.out_axes))
        delta = xa_NxR @ b.reshape(spec.rank, -1).astype(y_NxO.dtype)
        return y_NxO + jnp.asarray(spec.scale, y_NxO.dtype) * delta

    def shared(self, cfg: ModelConfig, group: str) -> nn.Module | None:
        members = [m for m, g in families.family(cfg.model_type).tensors.groups().items()
                   if g == group]
        if not any(m in cfg.lora.modules for m in members):
            return None
        return SharedA(cfg, name=group)


def _in_shape(proj: Projection, rows_NxI: jax.Array) -> tuple[int, ...]:
    """The kernel's input dims: o_proj contracts (heads, head_dim), the others one dim."""
    if len(proj.in_axes) == 1:
        return (rows_NxI.shape[-1],)
    heads = proj.cfg.num_heads  # head_dim from the rows: Gemma 4's full layers have their own
    return (heads, rows_NxI.shape[-1] // heads)


projection.register("lora", Lora())
