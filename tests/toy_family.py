"""A model family that only tests register: Llama's layers in checkpoints that store fused
`qkv_proj` and `gate_up_proj` tensors (as Phi-3 does) under a `transformer.` prefix."""

from __future__ import annotations

import contextlib
from typing import Iterator

from coach_jax.models import families

TOYFUSED = families.Family(
    "toyfused", "ToyFusedForCausalLM",
    switches=dict(qkv_bias="attention_bias", o_bias="attention_bias", mlp_bias="mlp_bias"),
    tensors=families.TensorNames(body="transformer", fused=(
        families.Fused("self_attn.qkv_proj",
                       ("self_attn/q_proj", "self_attn/k_proj", "self_attn/v_proj"), "qkv"),
        families.Fused("mlp.gate_up_proj", ("mlp/gate_proj", "mlp/up_proj"), "gate_up"),
    )))


@contextlib.contextmanager
def registered(family: families.Family = TOYFUSED) -> Iterator[families.Family]:
    """`family` in the registry for the duration, and out of it afterwards."""
    families.register(family)
    try:
        yield family
    finally:
        del families.FAMILIES[family.model_type]
