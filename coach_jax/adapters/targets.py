"""Which projections get an adapter: Hugging Face target names resolved as PEFT does.

`adapter.targets` is a tuple of module names (a module matches when its HF path equals a
name or ends with "." + name), a string "re:<regex>" (the whole HF path must match), or
"all-linear" (every projection of the decoder layers; never the LM head). Names are the
checkpoint's: Phi-3's fused `qkv_proj` and `gate_up_proj`, so an adapter on them is one
LoRA on the fused module, as in PEFT.
"""

from __future__ import annotations

import re

from coach_jax.models import families
from coach_jax.models.config import ModelConfig

# Our projections inside a decoder layer, in the order adapters list them.
PROJECTIONS = ("self_attn/q_proj", "self_attn/k_proj", "self_attn/v_proj", "self_attn/o_proj",
               "mlp/gate_proj", "mlp/up_proj", "mlp/down_proj")
ALL_LINEAR = "all-linear"


class TargetError(ValueError):
    """adapter.targets that select nothing, or something an adapter cannot be put on."""


def hf_module(cfg: ModelConfig, layer: int, module: str) -> str:
    """The HF module path holding our projection `module` of `layer`
    ("model.layers.3.self_attn.qkv_proj" for Phi-3's q_proj)."""
    return families.family(cfg.model_type).tensors.in_layer(layer, module)[0]


def matches(target: str | tuple[str, ...], name: str) -> bool:
    """PEFT's rule for one HF module path."""
    if target == ALL_LINEAR:
        return True
    if isinstance(target, str):
        return re.fullmatch(target.removeprefix("re:"), name) is not None
    return any(name == t or name.endswith("." + t) for t in target)


def parse(value: str | tuple[str, ...] | list[str]) -> str | tuple[str, ...]:
    """The config value as `matches` takes it: "all-linear", "re:<regex>" (checked), or a
    tuple of names (a comma-separated string from the command line is split)."""
    if isinstance(value, str) and value != ALL_LINEAR and not value.startswith("re:"):
        value = tuple(v.strip() for v in value.split(",") if v.strip())
    if isinstance(value, str):
        if value.startswith("re:"):
            try:
                re.compile(value[3:])
            except re.error as e:
                raise TargetError(f"adapter.targets: {value!r} is not a valid regular "
                                  f"expression ({e})") from None
        return value
    names = tuple(value)
    if not names:
        raise TargetError("adapter.targets is empty; name modules such as q_proj,v_proj, "
                          "or use all-linear")
    return names


def resolve(cfg: ModelConfig, targets: str | tuple[str, ...]) -> tuple[str, ...]:
    """Our targeted projections. Every layer must select the same ones (the layers share
    one parameter structure); a fused module is targeted whole."""
    per_layer = [tuple(m for m in PROJECTIONS if matches(targets, hf_module(cfg, i, m)))
                 for i in range(cfg.num_layers)]
    chosen = per_layer[0]
    if any(layer != chosen for layer in per_layer):
        differing = [i for i, layer in enumerate(per_layer) if layer != chosen]
        raise TargetError(f"adapter.targets {targets!r} select different projections in "
                          f"layers {differing} than in layer 0 ({', '.join(chosen) or 'none'}); "
                          "adapters go on the same projections of every layer")
    if not chosen:
        names = sorted({hf_module(cfg, 0, m).rsplit(".", 1)[-1] for m in PROJECTIONS})
        raise TargetError(f"adapter.targets {targets!r} match no projection of this "
                          f"{cfg.model_type} model; its modules are {', '.join(names)} "
                          f"(or use {ALL_LINEAR})")
    return chosen


def hf_names(cfg: ModelConfig, modules: tuple[str, ...]) -> list[str]:
    """The HF module names (last component) of our targeted projections, as PEFT's
    adapter_config.json lists them."""
    return sorted({hf_module(cfg, 0, m).rsplit(".", 1)[-1] for m in modules})
