"""Which projections get an adapter: Hugging Face target names resolved as PEFT does.

`adapter.targets` is a tuple of module names (a module matches when its HF path equals a
name or ends with "." + name), a string "re:<regex>" (the whole HF path must match), or
"all-linear" (every projection of the decoder layers, a mixture's experts included; never
the LM head or a router). Names are the checkpoint's: Phi-3's fused `qkv_proj` and
`gate_up_proj`, so an adapter on them is one LoRA on the fused module, as in PEFT.

A mixture's experts answer to both of PEFT's names for them: transformers' stacked
parameters (`mlp.experts.gate_up_proj`, `mlp.experts.down_proj`: PEFT's
`target_parameters`) and, where the checkpoint keeps one module per expert, those modules
(Mixtral's `block_sparse_moe.experts.3.w1`, Qwen-MoE's `mlp.experts.3.gate_proj`). Gate
and up are one parameter in transformers, so they are targeted together.
"""

from __future__ import annotations

import re

from absl import logging

from coach_jax.models import families
from coach_jax.models.config import ModelConfig
from coach_jax.models.lora import EXPERT_MODULES

# Our projections inside a decoder layer, in the order adapters list them.
PROJECTIONS = ("self_attn/q_proj", "self_attn/k_proj", "self_attn/v_proj", "self_attn/o_proj",
               "mlp/gate_proj", "mlp/up_proj", "mlp/down_proj")
# A Gated DeltaNet layer's projections (Qwen3.5's linear_attn), in place of attention's.
DELTANET_PROJECTIONS = ("linear_attn/in_proj_qkv", "linear_attn/in_proj_z",
                        "linear_attn/in_proj_b", "linear_attn/in_proj_a",
                        "linear_attn/out_proj")
ALL_LINEAR = "all-linear"


class TargetError(ValueError):
    """adapter.targets that select nothing, or something an adapter cannot be put on."""


def hf_module(cfg: ModelConfig, layer: int, module: str) -> str:
    """The HF module path holding our projection `module` of `layer`
    ("model.layers.3.self_attn.qkv_proj" for Phi-3's q_proj); for an expert weight, the
    transformers parameter holding it ("model.layers.3.mlp.experts.gate_up_proj")."""
    tensors = families.family(cfg.model_type).tensors
    if module in EXPERT_MODULES:
        parameter = tensors.expert_parameter(module.rsplit("/", 1)[-1])
        return f"{tensors.body}.layers.{layer}.{parameter.tensor}"
    return tensors.in_layer(layer, module)[0]


def per_expert_modules(cfg: ModelConfig, layer: int, module: str) -> list[str]:
    """The per-expert HF modules of our expert weight `module` where the checkpoint stores
    one tensor per expert (PEFT adapters made before transformers stacked them), else []."""
    tensors = families.family(cfg.model_type).tensors
    leaf = module.rsplit("/", 1)[-1]
    if tensors.experts_tensor(leaf) is not None:
        return []
    return [tensors.in_layer(layer, f"mlp/experts/{e}/{leaf}")[0]
            for e in range(cfg.moe.num_experts)]


def layer_projections(cfg: ModelConfig, layer: int) -> tuple[str, ...]:
    """The projections an adapter can go on in `layer`: its token mixer's (attention or
    Gated DeltaNet) and its dense MLP's, or its experts' weights."""
    if cfg.mixers[layer] == "gated_deltanet":
        mixer = DELTANET_PROJECTIONS
    else:  # a layer reusing another's keys and values has no k/v projections (Gemma 4),
        # a full layer whose values are its keys has no v_proj
        absent = set()
        if cfg.reuses_kv(layer):
            absent = {"self_attn/k_proj", "self_attn/v_proj"}
        elif cfg.attention_k_eq_v and cfg.mixers[layer] == "global_attention":
            absent = {"self_attn/v_proj"}
        mixer = tuple(m for m in PROJECTIONS[:4] if m not in absent)
    return mixer + (EXPERT_MODULES if cfg.feed_forward[layer] == "moe" else PROJECTIONS[4:])


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


def _selected(cfg: ModelConfig, targets: str | tuple[str, ...], layer: int,
              module: str) -> bool:
    """Whether the targets select our projection `module` of `layer`; an expert weight
    by its stacked parameter or by every one of its per-expert modules."""
    if matches(targets, hf_module(cfg, layer, module)):
        return True
    if module not in EXPERT_MODULES:
        return False
    hits = [matches(targets, name) for name in per_expert_modules(cfg, layer, module)]
    if any(hits) and not all(hits):
        raise TargetError(f"adapter.targets {targets!r} select some experts of layer {layer} "
                          f"and not others; an adapter goes on every expert of a layer")
    return any(hits)


def resolve(cfg: ModelConfig, targets: str | tuple[str, ...],
            layers: tuple[int, ...] | None = None
            ) -> tuple[tuple[str, ...], tuple[int, ...] | None]:
    """Our targeted projections and the layers that have them (None: every layer), from
    the targets and an optional layer selection (PEFT's layers_to_transform). The chosen
    layers must all select the same projections of those they have (they share one
    parameter structure); a fused module is targeted whole."""
    if layers is not None:
        bad = [i for i in layers if not 0 <= i < cfg.num_layers]
        if bad or not layers:
            raise TargetError(f"adapter.layers {list(layers)}: this model has layers 0 to "
                              f"{cfg.num_layers - 1}")
    candidates = sorted(set(layers)) if layers is not None else range(cfg.num_layers)
    per_layer = {i: tuple(m for m in layer_projections(cfg, i) if _selected(cfg, targets, i, m))
                 for i in candidates}
    if cfg.moe is not None and cfg.moe.shared_expert_size and any(
            matches(targets, f"{hf_module(cfg, i, 'mlp/gate_proj').rsplit('.', 1)[0]}."
                             f"shared_expert.{leaf}")
            for i in candidates for leaf in ("gate_proj", "up_proj", "down_proj")):
        logging.warning("adapter.targets: the shared expert of this mixture-of-experts model "
                        "takes no adapter (it trains in full fine-tuning only)")
    for i, chosen in per_layer.items():
        gate_up = {"mlp/experts/gate_proj", "mlp/experts/up_proj"} & set(chosen)
        if len(gate_up) == 1:
            raise TargetError(f"adapter.targets {targets!r} select the experts' "
                              f"{gate_up.pop().rsplit('/', 1)[-1]} without the other half of "
                              f"{hf_module(cfg, i, 'mlp/experts/gate_proj')} (gate and up "
                              "are one parameter in transformers): target both")
    selected = [i for i in candidates if per_layer[i]]
    if not selected:
        names = sorted({hf_module(cfg, 0, m).rsplit(".", 1)[-1]
                        for m in layer_projections(cfg, 0)})
        raise TargetError(f"adapter.targets {targets!r} match no projection of this "
                          f"{cfg.model_type} model; its modules are {', '.join(names)} "
                          f"(or use {ALL_LINEAR})")
    # One module list serves every layer (under scan, one parameter structure), each layer
    # adapting those of them it has.
    modules = tuple(dict.fromkeys(m for i in selected for m in per_layer[i]))
    differing = [i for i in selected if per_layer[i] != tuple(
        m for m in layer_projections(cfg, i) if m in modules)]
    if differing:
        first = selected[0]
        raise TargetError(f"adapter.targets {targets!r} select other projections in "
                          f"layers {[i for i in differing if i != first] or differing} than "
                          f"in layer {first} ({', '.join(per_layer[first])}); adapters go on "
                          "the same projections of every layer they are in")
    return modules, (None if selected == list(range(cfg.num_layers)) else tuple(selected))


def hf_names(cfg: ModelConfig, modules: tuple[str, ...]) -> list[str]:
    """The HF module names (last component) of our targeted projections, as PEFT's
    adapter_config.json lists them in `target_modules` (the experts are parameters)."""
    return sorted({hf_module(cfg, 0, m).rsplit(".", 1)[-1] for m in modules
                   if m not in EXPERT_MODULES})


def hf_parameters(cfg: ModelConfig, modules: tuple[str, ...],
                  layers: tuple[int, ...] | None = None) -> list[str]:
    """PEFT's `target_parameters` for our targeted expert weights: "mlp.experts.down_proj",
    or with a layer selection each layer's parameter by its full name (PEFT applies
    `layers_to_transform` to modules only)."""
    if layers is None:
        tensors = families.family(cfg.model_type).tensors
        return sorted({tensors.expert_parameter(m.rsplit("/", 1)[-1]).tensor
                       for m in modules if m in EXPERT_MODULES})
    return sorted({hf_module(cfg, i, m) for i in layers if cfg.feed_forward[i] == "moe"
                   for m in modules if m in EXPERT_MODULES})
