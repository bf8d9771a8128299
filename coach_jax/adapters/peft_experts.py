"""PEFT's two layouts of a LoRA on a mixture's experts, to and from ours.

Ours, per expert weight (gate_proj, up_proj, down_proj of models/lora.py's EXPERT_MODULES):
A [experts, in, r] and B [experts, r, out], each expert its own rank-r update.

PEFT on transformers' stacked parameters (`target_parameters`): one LoRA per parameter,
`lora_A.weight` [R*E, in] with rows expert-major (e*R + k) and `lora_B.weight` [out, R*E]
with columns rank-major (k*E + e); the update of expert e is B_e A_e in the parameter's
own layout. Several parameters of one experts module nest, the first in transformers'
order innermost, so its tensors sit under `experts.base_layer.`. Gate and up are one
parameter: written with rank 2r as A = [A_gate | A_up] and B block diagonal, the scale
kept by `rank_pattern` / `alpha_pattern` (PEFT converts per-expert adapters the same way);
read back from any rank, each half keeping the rank columns its rows of B use (at most r).

PEFT on per-expert modules, as adapters were made while transformers kept one module per
expert (Mixtral's `block_sparse_moe.experts.3.w1`): `lora_A.weight` [r, in] and
`lora_B.weight` [out, r] per expert.
"""

from __future__ import annotations

import dataclasses
import re

import numpy as np

from coach_jax.adapters import targets as adapter_targets
from coach_jax.models import families
from coach_jax.models.config import ModelConfig
from coach_jax.models.families import ExpertTensor

PREFIX = "base_model.model."


class ExpertAdapterError(ValueError):
    """Expert tensors that our per-expert rank-r adapter cannot hold."""


@dataclasses.dataclass(frozen=True)
class FusedSlot:
    """One PEFT LoRA on a stacked expert parameter of one layer."""

    layer: int
    parameter: ExpertTensor  # parts: our leaves ("gate_proj", "up_proj")
    key: str  # the parameter as PEFT matches it: "model.layers.0.mlp.experts.gate_up_proj"
    a_name: str
    b_name: str

    @property
    def modules(self) -> tuple[str, ...]:
        return tuple(f"mlp/experts/{part}" for part in self.parameter.parts)


def fused_slots(cfg: ModelConfig, layer: int) -> list[FusedSlot]:
    """The targeted stacked parameters of `layer`, named as PEFT saves them."""
    if cfg.feed_forward[layer] != "moe":
        return []
    tensors = families.family(cfg.model_type).tensors
    targeted = [t for t in tensors.expert_parameters() if any(f"mlp/experts/{p}" in cfg.lora.modules
                                        for p in t.parts)]
    slots = []
    for depth, parameter in enumerate(targeted):
        owner = parameter.tensor.rsplit(".", 1)[0]  # "mlp.experts"
        wrapper = f"{PREFIX}{tensors.body}.layers.{layer}.{owner}." + \
            "base_layer." * (len(targeted) - 1 - depth)
        slots.append(FusedSlot(layer, parameter,
                               f"{tensors.body}.layers.{layer}.{parameter.tensor}",
                               f"{wrapper}lora_A.weight", f"{wrapper}lora_B.weight"))
    return slots


def per_expert_names(cfg: ModelConfig, layer: int, module: str) -> list[tuple[str, str]]:
    """(lora_A, lora_B) tensor names of every expert of our `module` in the per-expert
    layout; [] where the checkpoint stacks the experts (no such modules ever existed)."""
    return [(f"{PREFIX}{name}.lora_A.weight", f"{PREFIX}{name}.lora_B.weight")
            for name in adapter_targets.per_expert_modules(cfg, layer, module)]


def _columns(parameter: ExpertTensor, part: int, width: int) -> slice:
    """The output columns of part `part` in the fused parameter (each part `width` wide)."""
    count = len(parameter.parts)
    return slice(part, None, count) if parameter.interleaved else \
        slice(part * width, (part + 1) * width)


def to_fused(parameter: ExpertTensor, parts: list[tuple[np.ndarray, np.ndarray]]
             ) -> tuple[np.ndarray, np.ndarray]:
    """PEFT's (lora_A, lora_B) of one stacked parameter from our (A, B) of its parts."""
    experts, width_in, rank = parts[0][0].shape
    width = parts[0][1].shape[-1]
    a_ExIxR = np.concatenate([a for a, _ in parts], axis=-1)
    b_ExRxO = np.zeros((experts, rank * len(parts), width * len(parts)), a_ExIxR.dtype)
    for j, (_, b) in enumerate(parts):
        b_ExRxO[:, j * rank:(j + 1) * rank, _columns(parameter, j, width)] = b
    total = rank * len(parts)
    lora_a = a_ExIxR.transpose(0, 2, 1).reshape(experts * total, width_in)
    lora_b = b_ExRxO.transpose(2, 1, 0).reshape(width * len(parts), total * experts)
    return np.ascontiguousarray(lora_a), np.ascontiguousarray(lora_b)


def from_fused(parameter: ExpertTensor, lora_a: np.ndarray, lora_b: np.ndarray,
               experts: int, rank: int, ratio: float, name: str
               ) -> list[tuple[np.ndarray, np.ndarray]]:
    """Our (A, B) per part from PEFT's tensors of one stacked parameter (any rank R): each
    part keeps the rank columns its rows of B use, padded to `rank`; `ratio`: the
    parameter's PEFT scale over ours, folded into B."""
    total = lora_a.shape[0] // experts
    a_ExIxR = lora_a.reshape(experts, total, -1).transpose(0, 2, 1)
    b_ExRxO = lora_b.reshape(lora_b.shape[0], total, experts).transpose(2, 1, 0) * ratio
    width = b_ExRxO.shape[-1] // len(parameter.parts)
    out = []
    for j, part in enumerate(parameter.parts):
        b_part = b_ExRxO[..., _columns(parameter, j, width)]
        used = [k for k in range(total) if np.any(b_part[:, k])]
        if len(used) > rank:
            raise ExpertAdapterError(
                f"{name}: the experts' {part} uses {len(used)} rank columns of this rank-"
                f"{total} LoRA; coach_jax adapts each expert weight with rank {rank} "
                "(adapter.rank, the adapter's r)")
        # Unused columns (B zero there) fill up to the rank: exact, and A stays trainable.
        used += [k for k in range(total) if k not in used][:rank - len(used)]
        a = np.zeros(a_ExIxR.shape[:2] + (rank,), a_ExIxR.dtype)
        b = np.zeros((experts, rank, width), b_ExRxO.dtype)
        a[..., :len(used)] = a_ExIxR[..., used]
        b[:, :len(used)] = b_part[:, used]
        out.append((a, b))
    return out


def pattern_value(patterns: dict, key: str, default):
    """PEFT's rank_pattern / alpha_pattern lookup for one module or parameter key."""
    for pattern, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", key):
            return value
    return default


def written_patterns(cfg: ModelConfig, scale: float, use_rslora: bool
                     ) -> tuple[dict[str, int], dict[str, float]]:
    """rank_pattern and alpha_pattern for the fused parameters `fused_slots` writes at a
    multiple of the rank, with alpha keeping the scale."""
    ranks, alphas = {}, {}
    for layer in range(cfg.num_layers):
        for slot in fused_slots(cfg, layer):
            if len(slot.parameter.parts) > 1:
                rank = cfg.lora.rank * len(slot.parameter.parts)
                key = re.escape(slot.parameter.tensor)
                ranks[key] = rank
                alphas[key] = scale * (rank ** 0.5 if use_rslora else rank)
    return ranks, alphas
