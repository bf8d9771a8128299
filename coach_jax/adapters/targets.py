"""Which projections get an adapter: Hugging Face target names resolved as PEFT does.

`adapter.targets` is a tuple of module names (a module matches when its HF path equals a
name or ends with "." + name), a string "re:<regex>" (the whole HF path must match), or
"all-linear" (every projection of the decoder layers; never the LM head). Names are the
checkpoint's: Phi-3's fused `qkv_proj` and `gate_up_proj`, so an adapter on them is one
LoRA on the fused module, as in PEFT.
"""

from __future__ import annotations

import re

from absl import logging

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


def resolve(cfg: ModelConfig, targets: str | tuple[str, ...],
            layers: tuple[int, ...] | None = None
            ) -> tuple[tuple[str, ...], tuple[int, ...] | None]:
    """Our targeted projections and the layers that have them (None: every layer), from
    the targets and an optional layer selection (PEFT's layers_to_transform). The chosen
    layers must all select the same projections (they share one parameter structure); a
    fused module is targeted whole."""
    if layers is not None:
        bad = [i for i in layers if not 0 <= i < cfg.num_layers]
        if bad or not layers:
            raise TargetError(f"adapter.layers {list(layers)}: this model has layers 0 to "
                              f"{cfg.num_layers - 1}")
    candidates = sorted(set(layers)) if layers is not None else range(cfg.num_layers)
    projections = adaptable(cfg)
    if projections != PROJECTIONS and any(
            matches(targets, hf_module(cfg, i, m)) for i in candidates
            for m in PROJECTIONS if m not in projections):
        logging.warning("adapter.targets: the MLPs of this mixture-of-experts model take no "
                        "adapter (its experts train in full fine-tuning only); adapting "
                        "the attention projections")
    per_layer = {i: tuple(m for m in projections if matches(targets, hf_module(cfg, i, m)))
                 for i in candidates}
    selected = [i for i in candidates if per_layer[i]]
    if not selected:
        names = sorted({hf_module(cfg, 0, m).rsplit(".", 1)[-1] for m in projections})
        raise TargetError(f"adapter.targets {targets!r} match no projection of this "
                          f"{cfg.model_type} model; its modules are {', '.join(names)} "
                          f"(or use {ALL_LINEAR})")
    chosen = per_layer[selected[0]]
    differing = [i for i in selected if per_layer[i] != chosen]
    if differing:
        raise TargetError(f"adapter.targets {targets!r} select other projections in "
                          f"layers {differing} than in layer {selected[0]} "
                          f"({', '.join(chosen)}); adapters go on the same projections of "
                          "every layer they are in")
    return chosen, (None if selected == list(range(cfg.num_layers)) else tuple(selected))


def adaptable(cfg: ModelConfig) -> tuple[str, ...]:
    """The projections an adapter can go on: in a model with mixture-of-experts layers the
    attention projections only (experts are stacked weights, not projections)."""
    if cfg.moe is None:
        return PROJECTIONS
    return tuple(m for m in PROJECTIONS if not m.startswith("mlp/"))


def hf_names(cfg: ModelConfig, modules: tuple[str, ...]) -> list[str]:
    """The HF module names (last component) of our targeted projections, as PEFT's
    adapter_config.json lists them."""
    return sorted({hf_module(cfg, 0, m).rsplit(".", 1)[-1] for m in modules})
