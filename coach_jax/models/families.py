"""Model families as data: one `Family` entry per Hugging Face `model_type`.

An entry holds everything that differs between families outside the layer code: the HF
architecture class, which config.json keys switch the decoder's features on (and are
written back on export), which feature combinations the HF class cannot express, and where
each parameter lives in the safetensors, including tensors the checkpoint fuses (Phi-3's
`qkv_proj`). `FAMILIES`, filled by `register`, is the only place family names appear: the
decoder reads `ModelConfig` feature fields, never the model type.
"""

from __future__ import annotations

import dataclasses
import re
from typing import TYPE_CHECKING, Any, Mapping, Protocol

if TYPE_CHECKING:
    from coach_jax.models.config import ModelConfig


class UnsupportedModelError(ValueError):
    """The HF config asks for something this decoder does not compute."""


# The boolean feature fields of `ModelConfig` a family fixes or reads from its config.json.
SWITCHES = ("qk_norm", "qkv_bias", "o_bias", "mlp_bias", "qk_norm_all_heads", "post_norms",
            "norm_unit_offset", "sandwich_norms", "scale_embeddings", "attention_sinks",
            "attention_output_gate", "v_norm")
# The non-boolean feature fields a family reads from its config.json: field -> (key, the
# value transformers assumes when the key is absent). Fields a family does not name keep
# ModelConfig's default (and export refuses any other value).
VALUES = ("activation", "query_pre_attn_scalar", "attn_logit_softcapping",
          "final_logit_softcapping")
LLAMA_VALUES = {"activation": ("hidden_act", "silu")}


def _sizes(layer_windows: tuple[int, ...]) -> list[int]:
    """The distinct sliding-window sizes in use (0 = full attention is not one)."""
    return sorted(set(layer_windows) - {0})


def _several_sizes(layer_windows: tuple[int, ...]) -> list[str]:
    return [f"layer_windows={layer_windows}"] if len(_sizes(layer_windows)) > 1 else []


def _windows_of(layer_types: list[str], window: Any, num_layers: int) -> tuple[int, ...]:
    """Per-layer windows from transformers' `layer_types` (extra entries ignored)."""
    unknown = set(layer_types) - {"sliding_attention", "full_attention"}
    if unknown or len(layer_types) < num_layers:
        raise UnsupportedModelError(f"layer_types {layer_types!r} are not supported")
    layer_types = layer_types[:num_layers]
    if "sliding_attention" in layer_types and not window:
        raise UnsupportedModelError("layer_types slide but sliding_window is not set")
    return tuple(int(window) if t == "sliding_attention" else 0 for t in layer_types)


def _export_layer_types(hf: dict[str, Any], layer_windows: tuple[int, ...],
                        use_sliding_window: bool) -> None:
    """Writes `sliding_window` and `layer_types` (and `use_sliding_window` where the
    family's config.json has the switch)."""
    sizes = _sizes(layer_windows)
    hf.update(sliding_window=sizes[0] if sizes else None,
              layer_types=["sliding_attention" if w else "full_attention"
                           for w in layer_windows])
    if use_sliding_window:
        hf["use_sliding_window"] = bool(sizes)


class Windows(Protocol):
    """How a family's config.json says which layers attend through a sliding window."""

    def parse(self, hf: Mapping[str, Any], num_layers: int) -> tuple[int, ...]:
        """Per-layer window sizes, 0 for full attention."""

    def problems(self, layer_windows: tuple[int, ...]) -> list[str]:
        """What of `layer_windows` the config.json cannot express."""

    def export(self, hf: dict[str, Any], layer_windows: tuple[int, ...]) -> None:
        """Writes `layer_windows` into the config.json dict `hf`."""


class FullAttention:
    """No sliding windows: config.json has no say (Llama)."""

    def parse(self, hf: Mapping[str, Any], num_layers: int) -> tuple[int, ...]:
        return (0,) * num_layers

    def problems(self, layer_windows: tuple[int, ...]) -> list[str]:
        return [f"layer_windows={layer_windows}"] if any(layer_windows) else []

    def export(self, hf: dict[str, Any], layer_windows: tuple[int, ...]) -> None:
        pass


class EveryLayer:
    """`sliding_window` applies to every layer (Mistral)."""

    def parse(self, hf: Mapping[str, Any], num_layers: int) -> tuple[int, ...]:
        window = hf.get("sliding_window")
        return (int(window),) * num_layers if window else (0,) * num_layers

    def problems(self, layer_windows: tuple[int, ...]) -> list[str]:
        problems = _several_sizes(layer_windows)
        if any(layer_windows) and 0 in layer_windows:
            problems.append("a sliding window on only some layers")
        return problems

    def export(self, hf: dict[str, Any], layer_windows: tuple[int, ...]) -> None:
        sizes = _sizes(layer_windows)
        hf.update(sliding_window=sizes[0] if sizes else None)


class LayerTypes:
    """`use_sliding_window` with per-layer `layer_types`, or the legacy rule that layers
    from `max_window_layers` on slide (Qwen2, Qwen3)."""

    def parse(self, hf: Mapping[str, Any], num_layers: int) -> tuple[int, ...]:
        window = hf.get("sliding_window")
        if not hf.get("use_sliding_window", False) or not window:
            return (0,) * num_layers
        layer_types = hf.get("layer_types") or [
            "sliding_attention" if i >= hf.get("max_window_layers", num_layers) else
            "full_attention" for i in range(num_layers)]
        return _windows_of(layer_types, window, num_layers)

    def problems(self, layer_windows: tuple[int, ...]) -> list[str]:
        return _several_sizes(layer_windows)

    def export(self, hf: dict[str, Any], layer_windows: tuple[int, ...]) -> None:
        _export_layer_types(hf, layer_windows, use_sliding_window=True)
        hf.pop("max_window_layers", None)


def no_rope_flags(hf: Mapping[str, Any], num_layers: int) -> tuple[bool, ...]:
    """SmolLM3's `no_rope_layers` (1 = the layer uses RoPE) or, without it, its rule that
    every `no_rope_layer_interval`-th layer (3, 7, ... by default) has none."""
    flags = hf.get("no_rope_layers")
    if flags is None:
        interval = hf.get("no_rope_layer_interval", 4)
        flags = [int((i + 1) % interval != 0) for i in range(num_layers)]
    if len(flags) < num_layers:
        raise UnsupportedModelError(f"no_rope_layers has {len(flags)} entries for "
                                    f"{num_layers} layers")
    return tuple(bool(f) for f in flags[:num_layers])


class NoPeSliding:
    """`layer_types`, or SmolLM3's rule: with `use_sliding_window`, the layers without RoPE
    slide and the others attend fully."""

    def parse(self, hf: Mapping[str, Any], num_layers: int) -> tuple[int, ...]:
        window = hf.get("sliding_window")
        layer_types = hf.get("layer_types")
        if layer_types is None:
            rope = no_rope_flags(hf, num_layers)
            layer_types = ["sliding_attention" if hf.get("use_sliding_window") and window
                           and not rope[i] else "full_attention" for i in range(num_layers)]
        return _windows_of(layer_types, window, num_layers)

    def problems(self, layer_windows: tuple[int, ...]) -> list[str]:
        return _several_sizes(layer_windows)

    def export(self, hf: dict[str, Any], layer_windows: tuple[int, ...]) -> None:
        _export_layer_types(hf, layer_windows, use_sliding_window=True)


class AlternatingLayers:
    """`layer_types`, or Gemma's rule without it: every `period`-th layer attends fully
    and the others slide over `sliding_window` (Gemma 2: period 2, layers 0, 2, ... slide;
    Gemma 3: `sliding_window_pattern`, 6 by default, layers 5, 11, ... full)."""

    def __init__(self, period: int, period_key: str | None = None):
        self.period, self.period_key = period, period_key

    def parse(self, hf: Mapping[str, Any], num_layers: int) -> tuple[int, ...]:
        window = hf.get("sliding_window")
        period = hf.get(self.period_key, self.period) if self.period_key else self.period
        layer_types = hf.get("layer_types") or [
            "sliding_attention" if (i + 1) % period else "full_attention"
            for i in range(num_layers)]
        return _windows_of(layer_types, window, num_layers)

    def problems(self, layer_windows: tuple[int, ...]) -> list[str]:
        return _several_sizes(layer_windows)

    def export(self, hf: dict[str, Any], layer_windows: tuple[int, ...]) -> None:
        _export_layer_types(hf, layer_windows, use_sliding_window=False)


class SwitchedEveryLayer(EveryLayer):
    """`sliding_window` on every layer when `use_sliding_window` is set (Qwen3-MoE)."""

    def parse(self, hf: Mapping[str, Any], num_layers: int) -> tuple[int, ...]:
        if not hf.get("use_sliding_window", False):
            return (0,) * num_layers
        return super().parse(hf, num_layers)

    def export(self, hf: dict[str, Any], layer_windows: tuple[int, ...]) -> None:
        super().export(hf, layer_windows)
        hf["use_sliding_window"] = any(layer_windows)


FULL_ATTENTION = FullAttention()
EVERY_LAYER = EveryLayer()
LAYER_TYPES = LayerTypes()
NOPE_SLIDING = NoPeSliding()


@dataclasses.dataclass(frozen=True)
class MoeKeys:
    """How a family's config.json describes its mixture of experts. `normalize` is fixed
    (Mixtral always renormalises the top-k probabilities) or the key that says
    (absent: False); `sparse_rule`: layers listed in `mlp_only_layers`, and those not on
    every `decoder_sparse_step`-th, keep a dense MLP (Qwen-MoE); otherwise every layer is
    sparse."""

    # The expert count's keys, the first written on export (Qwen3-MoE's config.json files
    # have num_experts, transformers writes num_local_experts and reads both).
    experts: tuple[str, ...]
    expert_size: str  # each expert's width: intermediate_size, moe_intermediate_size
    normalize: bool | str
    shared_expert_size: str | None = None
    sparse_rule: bool = False
    # gpt-oss: biases on the router and the experts, and the clamped SwiGLU read from
    # swiglu_limit / swiglu_alpha.
    biases: bool = False
    clamped_swiglu: bool = False

    def parse(self, hf: Mapping[str, Any], num_layers: int) -> dict[str, Any]:
        """The `moe` and `feed_forward` fields of ModelConfig."""
        from coach_jax.models.config import MoeSpec
        experts = next((hf[key] for key in self.experts if hf.get(key)), None)
        if not experts:
            return {}
        kinds = ["moe"] * num_layers
        if self.sparse_rule:
            dense = set(hf.get("mlp_only_layers") or [])
            step = hf.get("decoder_sparse_step", 1) or 1
            kinds = ["mlp" if i in dense or (i + 1) % step else "moe"
                     for i in range(num_layers)]
        if "moe" not in kinds:
            return {}
        for key in ("num_experts_per_tok", self.expert_size):
            if key not in hf:
                raise UnsupportedModelError(f"config.json has no {key!r}")
        normalize = (self.normalize if isinstance(self.normalize, bool)
                     else bool(hf.get(self.normalize, False)))
        shared = int(hf.get(self.shared_expert_size) or 0) if self.shared_expert_size else 0
        if hf.get("router_jitter_noise"):
            raise UnsupportedModelError(
                f"router_jitter_noise={hf['router_jitter_noise']} is not supported (the "
                "router's multiplicative input noise in training); set it to 0")
        spec = MoeSpec(num_experts=int(experts), top_k=int(hf["num_experts_per_tok"]),
                       expert_size=int(hf[self.expert_size]), normalize_top_k=normalize,
                       shared_expert_size=shared,
                       aux_loss_coef=float(hf.get("router_aux_loss_coef", 0.0) or 0.0),
                       output_router_logits=bool(hf.get("output_router_logits", False)),
                       router_bias=self.biases, expert_bias=self.biases,
                       swiglu_limit=(float(hf.get("swiglu_limit", 7.0))
                                     if self.clamped_swiglu else None),
                       swiglu_alpha=float(hf.get("swiglu_alpha", 1.702)))
        return {"moe": spec, "feed_forward": tuple(kinds)}

    def problems(self, cfg: ModelConfig) -> list[str]:
        spec = cfg.moe
        problems = []
        if isinstance(self.normalize, bool) and spec.normalize_top_k != self.normalize:
            problems.append(f"normalize_top_k={spec.normalize_top_k}")
        if spec.shared_expert_size and not self.shared_expert_size:
            problems.append(f"a shared expert ({spec.shared_expert_size})")
        if not self.sparse_rule and "mlp" in cfg.feed_forward:
            problems.append("dense layers among sparse ones")
        for name, wanted in (("router_bias", self.biases), ("expert_bias", self.biases)):
            if getattr(spec, name) != wanted:
                problems.append(f"{name}={getattr(spec, name)}")
        if (spec.swiglu_limit is not None) != self.clamped_swiglu:
            problems.append(f"swiglu_limit={spec.swiglu_limit}")
        return problems

    def export(self, cfg: ModelConfig, hf: dict[str, Any]) -> None:
        spec = cfg.moe
        for key in self.experts[1:]:
            hf.pop(key, None)
        hf.update({self.experts[0]: spec.num_experts, "num_experts_per_tok": spec.top_k,
                   self.expert_size: spec.expert_size,
                   "router_aux_loss_coef": spec.aux_loss_coef,
                   "output_router_logits": spec.output_router_logits})
        if isinstance(self.normalize, str):
            hf[self.normalize] = spec.normalize_top_k
        if self.shared_expert_size:
            hf[self.shared_expert_size] = spec.shared_expert_size
        if self.clamped_swiglu:
            hf.update(swiglu_limit=spec.swiglu_limit, swiglu_alpha=spec.swiglu_alpha)
        if self.sparse_rule:
            hf["decoder_sparse_step"] = 1
            hf["mlp_only_layers"] = [i for i, k in enumerate(cfg.feed_forward) if k == "mlp"]


# Hybrid layer stacks (Qwen3.5): `layer_types` names each layer's token mixer.
MIXER_TYPES = {"linear_attention": "gated_deltanet", "full_attention": "attention"}
DELTANET_KEYS = {"num_key_heads": "linear_num_key_heads",
                 "num_value_heads": "linear_num_value_heads",
                 "key_head_dim": "linear_key_head_dim",
                 "value_head_dim": "linear_value_head_dim",
                 "conv_kernel": "linear_conv_kernel_dim"}


def hybrid_layers(hf: Mapping[str, Any], num_layers: int) -> dict[str, Any]:
    """The `mixers` and `deltanet` fields of ModelConfig: `layer_types`, or without it
    every `full_attention_interval`-th layer (4) full attention and the others linear."""
    from coach_jax.models.config import DeltaNetSpec
    interval = hf.get("full_attention_interval", 4)
    layer_types = hf.get("layer_types") or [
        "linear_attention" if (i + 1) % interval else "full_attention" for i in range(num_layers)]
    if set(layer_types) - set(MIXER_TYPES) or len(layer_types) < num_layers:
        raise UnsupportedModelError(f"layer_types {layer_types!r} are not supported (one of "
                                    f"{', '.join(MIXER_TYPES)} per layer)")
    mixers = tuple(MIXER_TYPES[t] for t in layer_types[:num_layers])
    if "gated_deltanet" not in mixers:
        return {"mixers": mixers}
    if hf.get("hidden_act", "silu") != "silu":
        raise UnsupportedModelError(f"hidden_act {hf['hidden_act']!r} with linear attention "
                                    "layers is not supported (their conv1d uses silu)")
    missing = [key for key in DELTANET_KEYS.values() if key not in hf]
    if missing:
        raise UnsupportedModelError(f"config.json has no {missing[0]!r}")
    return {"mixers": mixers, "deltanet": DeltaNetSpec(
        **{field: int(hf[key]) for field, key in DELTANET_KEYS.items()})}


def export_hybrid_layers(cfg: ModelConfig, hf: dict[str, Any]) -> None:
    names = {mixer: layer_type for layer_type, mixer in MIXER_TYPES.items()}
    hf.pop("full_attention_interval", None)
    hf["layer_types"] = [names[m] for m in cfg.mixers]
    if cfg.deltanet is not None:
        hf.update({key: getattr(cfg.deltanet, field) for field, key in DELTANET_KEYS.items()})


@dataclasses.dataclass(frozen=True)
class Gemma4Layers:
    """Gemma 4's per-layer structure: full layers ("global_attention") with their own
    head dim and KV heads (`per_layer_config`, or `global_head_dim` /
    `num_global_key_value_heads`), values from the keys' projection there
    (`attention_k_eq_v`), the last `num_kv_shared_layers` layers reusing the keys and
    values of the last earlier layer of their type (with `use_double_wide_mlp`, an MLP
    twice as wide), per-layer embeddings (`hidden_size_per_layer_input`) and a scalar per
    layer."""

    def parse(self, hf: Mapping[str, Any], num_layers: int,
              layer_windows: tuple[int, ...]) -> dict[str, Any]:
        if hf.get("enable_moe_block"):
            raise UnsupportedModelError("enable_moe_block=True (Gemma 4's mixture of experts) "
                                        "is not supported yet")
        full = [i for i, w in enumerate(layer_windows) if not w]
        mixers = tuple("attention" if w else "global_attention" for w in layer_windows)
        overrides = {str(k): v for k, v in (hf.get("per_layer_config") or {}).items()}
        geometry = {(overrides.get(str(i), {}).get("head_dim"),
                     overrides.get(str(i), {}).get("num_key_value_heads")) for i in full}
        if len(geometry) > 1:
            raise UnsupportedModelError(f"per_layer_config gives the full layers different "
                                        f"head dims or KV heads: {sorted(geometry)}")
        head_dim, kv_heads = geometry.pop() if geometry else (None, None)
        if not overrides:
            head_dim = hf.get("global_head_dim", 512)
            if hf.get("attention_k_eq_v"):
                kv_heads = hf.get("num_global_key_value_heads")
        shared = int(hf.get("num_kv_shared_layers") or 0)
        first = num_layers - shared
        sources = [-1] * num_layers
        for i in range(first, num_layers):
            same = [j for j in range(first) if mixers[j] == mixers[i]]
            if not same:
                raise UnsupportedModelError(f"num_kv_shared_layers={shared}: layer {i} has no "
                                            "earlier layer of its type to reuse")
            sources[i] = same[-1]
        wide = bool(hf.get("use_double_wide_mlp"))
        return dict(mixers=mixers, global_head_dim=head_dim, global_kv_heads=kv_heads,
                    attention_k_eq_v=bool(hf.get("attention_k_eq_v")),
                    kv_sources=tuple(sources),
                    feed_forward=tuple("wide_mlp" if wide and s >= 0 else "mlp"
                                       for s in sources),
                    per_layer_input_size=int(hf.get("hidden_size_per_layer_input") or 0),
                    per_layer_vocab_size=int(hf.get("vocab_size_per_layer_input")
                                             or hf["vocab_size"]),
                    layer_scalar=True)

    def export(self, cfg: ModelConfig, hf: dict[str, Any]) -> None:
        head_dim, kv_heads = cfg.attention_geometry("global_attention")
        override = {"head_dim": head_dim}
        if cfg.global_kv_heads is not None:
            override["num_key_value_heads"] = kv_heads
        for key in ("global_head_dim", "num_global_key_value_heads"):
            hf.pop(key, None)
        hf.update(
            per_layer_config={str(i): dict(override) for i, m in enumerate(cfg.mixers)
                              if m == "global_attention"},
            attention_k_eq_v=cfg.attention_k_eq_v,
            num_kv_shared_layers=sum(s >= 0 for s in cfg.kv_sources),
            use_double_wide_mlp="wide_mlp" in cfg.feed_forward,
            hidden_size_per_layer_input=cfg.per_layer_input_size,
            vocab_size_per_layer_input=cfg.per_layer_vocab_size or cfg.vocab_size,
            enable_moe_block=False)


def per_layer_problems(cfg: ModelConfig) -> list[str]:
    """What of Gemma 4's per-layer structure a family without it cannot express."""
    problems = [f"{name}={getattr(cfg, name)}" for name, off in (
        ("global_head_dim", None), ("global_kv_heads", None), ("attention_k_eq_v", False),
        ("per_layer_input_size", 0), ("layer_scalar", False)) if getattr(cfg, name) != off]
    if any(s >= 0 for s in cfg.kv_sources):
        problems.append(f"kv_sources={cfg.kv_sources}")
    if "wide_mlp" in cfg.feed_forward:
        problems.append("wide MLPs")
    return problems


@dataclasses.dataclass(frozen=True)
class Fused:
    """One checkpoint tensor holding several of our projections stacked along its output
    rows, in `parts` order (Phi-3's `qkv_proj` is q, k, v). Loading splits it and saving
    joins it. `group` names the parts for projection strategies that share parameters
    across them (PEFT puts one LoRA A on the fused module)."""

    tensor: str  # the HF module inside a layer: "self_attn.qkv_proj"
    parts: tuple[str, ...]  # our modules: ("self_attn/q_proj", "self_attn/k_proj", ...)
    group: str  # "qkv"


@dataclasses.dataclass(frozen=True)
class ExpertTensor:
    """One checkpoint tensor holding every expert of a layer, [experts, in, out] (not
    transposed), for our `parts` ("gate_proj", "up_proj": leaves of mlp/experts); with
    `interleaved`, the parts' columns alternate along the last axis (gpt-oss)."""

    tensor: str  # inside a layer: "mlp.experts.gate_up_proj"
    parts: tuple[str, ...]
    interleaved: bool = False


# How transformers holds a mixture's experts in memory, and so how PEFT's
# `target_parameters` name them: gate and up in one parameter per layer, down in another.
# (A checkpoint may store them otherwise: Mixtral one tensor per expert, gpt-oss stacked
# and interleaved, TensorNames.experts.)
FUSED_EXPERTS = (ExpertTensor("mlp.experts.gate_up_proj", ("gate_proj", "up_proj")),
                 ExpertTensor("mlp.experts.down_proj", ("down_proj",)))


@dataclasses.dataclass(frozen=True)
class TensorNames:
    """Where our parameters live in a family's safetensors; the defaults are Llama's
    (`model.layers.3.self_attn.q_proj.weight`, `model.norm.weight`, `lm_head.weight`)."""

    body: str = "model"  # prefix of the embeddings, the layers and the final norm
    lm_head: str = "lm_head"
    fused: tuple[Fused, ...] = ()
    # Our module path in a layer -> the checkpoint's, as regex substitutions tried in
    # order (Mixtral: mlp/experts/3/gate_proj -> block_sparse_moe/experts/3/w1).
    renames: tuple[tuple[str, str], ...] = ()
    # Experts stored stacked per layer (gpt-oss); empty: one tensor per expert.
    experts: tuple[ExpertTensor, ...] = ()

    def experts_tensor(self, leaf: str) -> ExpertTensor | None:
        """The stacked tensor holding our experts' `leaf` ("gate_proj"), if stacked."""
        return next((t for t in self.experts if leaf in t.parts), None)

    def expert_parameters(self) -> tuple[ExpertTensor, ...]:
        """transformers' stacked expert parameters of a layer, in its order: the
        checkpoint's stacked tensors, else transformers' fused layout."""
        return self.experts or FUSED_EXPERTS

    def expert_parameter(self, leaf: str) -> ExpertTensor:
        """The transformers parameter holding our experts' `leaf` ("up_proj")."""
        return next(t for t in self.expert_parameters() if leaf in t.parts)

    def top(self, name: str) -> str:
        """The HF module of a top-level parameter or module: embed_tokens, norm, lm_head."""
        return self.lm_head if name == "lm_head" else f"{self.body}.{name}"

    def in_layer(self, layer: int, module: str) -> tuple[str, int]:
        """The HF module holding our `module` ("self_attn/q_proj") of layer `layer`, and
        which of a fused tensor's parts it is (0 when stored alone)."""
        for fused in self.fused:
            if module in fused.parts:
                return f"{self.body}.layers.{layer}.{fused.tensor}", fused.parts.index(module)
        for pattern, replacement in self.renames:
            renamed, count = re.subn(pattern, replacement, module)
            if count:
                module = renamed
                break
        return f"{self.body}.layers.{layer}.{module.replace('/', '.')}", 0

    def groups(self) -> dict[str, str]:
        """Our module -> its fused group, for every fused part."""
        return {part: fused.group for fused in self.fused for part in fused.parts}


@dataclasses.dataclass(frozen=True)
class Family:
    """One HF model type. `switches` maps a feature of SWITCHES to a fixed value or to the
    config.json key it is read from (absent key: False); switches not named are off."""

    model_type: str
    architecture: str  # the transformers class written to config.json `architectures`
    switches: Mapping[str, bool | str] = dataclasses.field(default_factory=dict)
    rope_types: tuple[str, ...] = ("default",)  # the rope types its config can express
    # Legacy rope type names its config class renames (Phi-3: su, yarn -> longrope).
    rope_aliases: Mapping[str, str] = dataclasses.field(default_factory=dict)
    windows: Windows = FULL_ATTENTION
    tensors: TensorNames = TensorNames()
    values: Mapping[str, tuple[str, Any]] = dataclasses.field(
        default_factory=lambda: dict(LLAMA_VALUES))
    partial_rotary: bool = False  # its config may rotate only part of each head
    # RoPE per layer type in config.json (Gemma 3): full layers `rope_theta` and scaling,
    # sliding layers `local_rope_theta`.
    rope_by_layer_type: bool = False
    # A config.json without per-type `rope_parameters`: the key of the sliding layers' base,
    # its default and the full layers' default (Gemma 3's `rope_local_base_freq`, 1e4, 1e6).
    legacy_rope: tuple[str, float, float] = ("rope_local_base_freq", 10000.0, 1000000.0)
    # Layers without RoPE read from `no_rope_layers` (SmolLM3); False: RoPE in every layer.
    nope_layers: bool = False
    # config.json values transformers assumes when the key is absent, where they differ
    # from Llama's (SmolLM3: rope_theta 2e6, tied embeddings).
    config_defaults: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    moe: MoeKeys | None = None  # a mixture-of-experts family's config keys
    # config.json keys whose feature the decoder does not compute: set, they are refused.
    refused: tuple[str, ...] = ()
    # Its layers mix tokens by attention or Gated DeltaNet, as `layer_types` says (Qwen3.5).
    hybrid: bool = False
    # Gemma 4's per-layer geometry, KV sharing and per-layer embeddings.
    per_layer: Gemma4Layers | None = None

    def __post_init__(self):
        unknown = set(self.switches) - set(SWITCHES)
        if unknown:
            raise ValueError(f"{self.model_type}: unknown switches {sorted(unknown)}; "
                             f"expected some of {', '.join(SWITCHES)}")
        unknown = set(self.values) - set(VALUES)
        if unknown:
            raise ValueError(f"{self.model_type}: unknown values {sorted(unknown)}; "
                             f"expected some of {', '.join(VALUES)}")

    def features(self, hf: Mapping[str, Any], num_layers: int) -> dict[str, Any]:
        """The `ModelConfig` feature fields a config.json of this family asks for."""
        if hf.get("use_bidirectional_attention"):
            raise UnsupportedModelError("use_bidirectional_attention=True is not supported "
                                        "(a causal decoder)")
        for key in self.refused:
            if hf.get(key) is not None:
                raise UnsupportedModelError(f"{key}={hf[key]!r} is not supported")
        fields: dict[str, Any] = {}
        for name in SWITCHES:
            source = self.switches.get(name, False)
            fields[name] = source if isinstance(source, bool) else bool(hf.get(source, False))
        for name, (key, default) in self.values.items():
            fields[name] = hf.get(key, default)
        fields["layer_windows"] = self.windows.parse(hf, num_layers)
        if self.moe is not None:
            fields.update(self.moe.parse(hf, num_layers))
        if self.nope_layers:
            fields["rope_layers"] = no_rope_flags(hf, num_layers)
        if self.hybrid:
            fields.update(hybrid_layers(hf, num_layers))
        if self.per_layer is not None:
            fields.update(self.per_layer.parse(hf, num_layers, fields["layer_windows"]))
        return fields

    def problems(self, cfg: ModelConfig) -> list[str]:
        """The features of `cfg` this family's config.json cannot express."""
        problems = []
        read_from: dict[str, list[str]] = {}
        for name in SWITCHES:
            source = self.switches.get(name, False)
            if isinstance(source, str):
                read_from.setdefault(source, []).append(name)
            elif getattr(cfg, name) != source:
                problems.append(f"{name}={getattr(cfg, name)}")
        for names in read_from.values():  # one key cannot hold two different values
            if len({getattr(cfg, name) for name in names}) > 1:
                problems.append(", ".join(f"{name}={getattr(cfg, name)}" for name in names))
        if cfg.rope_type not in self.rope_types:
            problems.append(f"{cfg.rope_type} rope scaling")
        defaults = {f.name: f.default for f in dataclasses.fields(cfg)}
        problems += [f"{name}={getattr(cfg, name)!r}" for name in VALUES
                     if name not in self.values and getattr(cfg, name) != defaults[name]]
        if (cfg.local_rope_theta is not None) != self.rope_by_layer_type:
            problems.append(f"local_rope_theta={cfg.local_rope_theta}")
        if not self.partial_rotary and cfg.partial_rotary_factor != 1.0:
            problems.append(f"partial_rotary_factor={cfg.partial_rotary_factor}")
        if not self.nope_layers and not all(cfg.rope_layers):
            problems.append(f"layers without RoPE ({cfg.rope_layers})")
        if cfg.moe is not None:
            problems += (self.moe.problems(cfg) if self.moe is not None
                         else ["mixture-of-experts layers"])
        elif self.moe is not None and not self.moe.sparse_rule:
            problems.append("no mixture-of-experts layers")
        allowed = {"attention", "global_attention" if self.per_layer else "attention",
                   "gated_deltanet" if self.hybrid else "attention"}
        if set(cfg.mixers) - allowed:
            problems.append(f"token mixers {cfg.mixers}")
        if self.per_layer is None:
            problems += per_layer_problems(cfg)
        return problems + self.windows.problems(cfg.layer_windows)

    def export(self, cfg: ModelConfig, hf: dict[str, Any]) -> None:
        """Writes this family's feature keys of `cfg` into the config.json dict `hf`."""
        for name, source in self.switches.items():
            if isinstance(source, str):
                hf[source] = getattr(cfg, name)
        for name, (key, _) in self.values.items():
            hf[key] = getattr(cfg, name)
        if self.rope_by_layer_type:
            hf["rope_parameters"] = {
                "full_attention": hf["rope_parameters"],
                "sliding_attention": {"rope_type": "default",
                                      "rope_theta": cfg.local_rope_theta}}
            for legacy in ("rope_theta", "rope_local_base_freq", "sliding_window_pattern"):
                hf.pop(legacy, None)
        self.windows.export(hf, cfg.layer_windows)
        if self.nope_layers:
            hf["no_rope_layers"] = [int(r) for r in cfg.rope_layers]
        if cfg.moe is not None:
            self.moe.export(cfg, hf)
        if self.hybrid:
            export_hybrid_layers(cfg, hf)
        if self.per_layer is not None:
            self.per_layer.export(cfg, hf)


FAMILIES: dict[str, Family] = {}

# Multimodal checkpoints whose text decoder is a registered family: their config.json
# model_type -> the decoder's. The decoder's config is their `text_config`; its tensors sit
# under a language-model prefix (MULTIMODAL_LAYOUTS, both ways transformers writes them)
# and the vision tensors are left alone: coach_jax loads, trains and exports the text
# decoder only.
MULTIMODAL = {"gemma3": "gemma3_text", "gemma4": "gemma4_text", "qwen3_5": "qwen3_5_text",
              "qwen3_5_moe": "qwen3_5_moe_text"}
MULTIMODAL_LAYOUTS = (
    TensorNames(body="language_model.model", lm_head="language_model.lm_head"),
    TensorNames(body="model.language_model", lm_head="lm_head"))
VISION_PREFIXES = ("vision_tower.", "multi_modal_projector.", "model.vision_tower.",
                   "model.multi_modal_projector.", "model.visual.", "visual.",
                   "mtp.",  # Qwen3.5's vision tower and multi-token-prediction head
                   "model.audio_tower.", "model.embed_vision.", "model.embed_audio.")


def text_decoder_config(hf: Mapping[str, Any]) -> dict[str, Any]:
    """The text decoder's config.json of a multimodal one (as transformers' wrapper class
    runs it: the wrapper's tie_word_embeddings, no final logit soft-capping)."""
    text = dict(hf.get("text_config") or {})
    text["model_type"] = MULTIMODAL[hf["model_type"]]
    text["tie_word_embeddings"] = hf.get("tie_word_embeddings",
                                         text.get("tie_word_embeddings", True))
    if hf["model_type"] == "gemma3":  # Gemma 3's wrapper never caps; Gemma 4's does
        text["final_logit_softcapping"] = None
    return text


def register(family: Family) -> Family:
    """Adds a family; its model_type must be new."""
    if family.model_type in FAMILIES:
        raise ValueError(f"model_type {family.model_type!r} is already registered")
    FAMILIES[family.model_type] = family
    return family


def family(model_type: Any) -> Family:
    """The registered entry of `model_type`, or an error naming the supported ones."""
    if not isinstance(model_type, str) or model_type not in FAMILIES:
        raise UnsupportedModelError(
            f"model_type {model_type!r} is not supported; supported: {', '.join(FAMILIES)}")
    return FAMILIES[model_type]


# RoPE the llama-style families' configs compute besides the default (transformers' YaRN).
YARN = ("default", "yarn")
register(Family("llama", "LlamaForCausalLM", rope_types=("default", "llama3", "yarn"),
                switches=dict(qkv_bias="attention_bias", o_bias="attention_bias",
                              mlp_bias="mlp_bias")))
register(Family("mistral", "MistralForCausalLM", windows=EVERY_LAYER, rope_types=YARN))
register(Family("qwen2", "Qwen2ForCausalLM", switches=dict(qkv_bias=True),
                windows=LAYER_TYPES, rope_types=YARN))
register(Family("qwen3", "Qwen3ForCausalLM", windows=LAYER_TYPES, rope_types=YARN, switches=dict(
    qk_norm=True, qkv_bias="attention_bias", o_bias="attention_bias")))
register(Family("phi3", "Phi3ForCausalLM", windows=EVERY_LAYER, partial_rotary=True,
                rope_types=("default", "longrope"),
                rope_aliases={"su": "longrope", "yarn": "longrope"},
                config_defaults={"original_max_position_embeddings": 4096},
                tensors=TensorNames(fused=(
                    Fused("self_attn.qkv_proj", ("self_attn/q_proj", "self_attn/k_proj",
                                                 "self_attn/v_proj"), group="qkv"),
                    Fused("mlp.gate_up_proj", ("mlp/gate_proj", "mlp/up_proj"),
                          group="gate_up")))))
register(Family("olmo2", "Olmo2ForCausalLM", rope_types=YARN, switches=dict(
    qk_norm=True, qk_norm_all_heads=True, post_norms=True, qkv_bias="attention_bias",
    o_bias="attention_bias")))
# OLMo 3: OLMo 2 with three sliding layers to one full (`layer_types`), RoPE per layer type
# (YaRN on the full layers only); older config.json files give both the one `rope_theta`.
register(Family("olmo3", "Olmo3ForCausalLM", windows=AlternatingLayers(4), rope_types=YARN,
                rope_by_layer_type=True, legacy_rope=("rope_theta", 500000.0, 500000.0),
                switches=dict(qk_norm=True, qk_norm_all_heads=True, post_norms=True,
                              qkv_bias="attention_bias", o_bias="attention_bias"),
                config_defaults={"sliding_window": 4096}))
register(Family("gemma2", "Gemma2ForCausalLM", windows=AlternatingLayers(2),
                switches=dict(norm_unit_offset=True, sandwich_norms=True,
                              scale_embeddings=True, qkv_bias="attention_bias",
                              o_bias="attention_bias"),
                values={"activation": ("hidden_activation", "gelu_pytorch_tanh"),
                        "query_pre_attn_scalar": ("query_pre_attn_scalar", 256),
                        "attn_logit_softcapping": ("attn_logit_softcapping", 50.0),
                        "final_logit_softcapping": ("final_logit_softcapping", 30.0)},
                config_defaults={"head_dim": 256, "tie_word_embeddings": True,
                                 "sliding_window": 4096}))
register(Family("gemma3_text", "Gemma3ForCausalLM",
                windows=AlternatingLayers(6, "sliding_window_pattern"),
                rope_types=("default", "linear"), rope_by_layer_type=True,
                switches=dict(norm_unit_offset=True, sandwich_norms=True,
                              scale_embeddings=True, qk_norm=True,
                              qkv_bias="attention_bias", o_bias="attention_bias"),
                values={"activation": ("hidden_activation", "gelu_pytorch_tanh"),
                        "query_pre_attn_scalar": ("query_pre_attn_scalar", 256),
                        "attn_logit_softcapping": ("attn_logit_softcapping", None),
                        "final_logit_softcapping": ("final_logit_softcapping", None)},
                config_defaults={"head_dim": 256, "tie_word_embeddings": True,
                                 "sliding_window": 4096}))
register(Family("smollm3", "SmolLM3ForCausalLM", windows=NOPE_SLIDING, nope_layers=True,
                switches=dict(qkv_bias="attention_bias", o_bias="attention_bias",
                              mlp_bias="mlp_bias"),
                config_defaults={"rope_theta": 2000000.0, "tie_word_embeddings": True}))

# Mixtures of experts. transformers' own names for the experts' tensors on disk: one per
# expert (Mixtral's w1 / w3 / w2 are gate / up / down).
MIXTRAL_TENSORS = TensorNames(renames=(
    (r"^mlp/experts/(\d+)/gate_proj$", r"block_sparse_moe/experts/\1/w1"),
    (r"^mlp/experts/(\d+)/up_proj$", r"block_sparse_moe/experts/\1/w3"),
    (r"^mlp/experts/(\d+)/down_proj$", r"block_sparse_moe/experts/\1/w2"),
    (r"^mlp/gate$", "block_sparse_moe/gate")))
register(Family("mixtral", "MixtralForCausalLM", windows=EVERY_LAYER, tensors=MIXTRAL_TENSORS,
                rope_types=YARN,
                moe=MoeKeys(("num_local_experts",), "intermediate_size", normalize=True)))
register(Family("qwen2_moe", "Qwen2MoeForCausalLM", windows=LAYER_TYPES, rope_types=YARN,
                switches=dict(qkv_bias="qkv_bias"), config_defaults={"qkv_bias": True},
                moe=MoeKeys(("num_experts",), "moe_intermediate_size",
                            normalize="norm_topk_prob",
                            shared_expert_size="shared_expert_intermediate_size",
                            sparse_rule=True)))
register(Family("qwen3_moe", "Qwen3MoeForCausalLM", windows=SwitchedEveryLayer(),
                rope_types=YARN,
                switches=dict(qk_norm=True, qkv_bias="attention_bias",
                              o_bias="attention_bias"),
                moe=MoeKeys(("num_local_experts", "num_experts"), "moe_intermediate_size",
                            normalize="norm_topk_prob", sparse_rule=True)))
register(Family("olmoe", "OlmoeForCausalLM", rope_types=YARN, switches=dict(
    qk_norm=True, qk_norm_all_heads=True, qkv_bias="attention_bias", o_bias="attention_bias"),
                moe=MoeKeys(("num_experts",), "intermediate_size", normalize="norm_topk_prob"),
                refused=("clip_qkv",)))
GPT_OSS_TENSORS = TensorNames(renames=((r"^mlp/gate$", "mlp/router"),), experts=(
    ExpertTensor("mlp.experts.gate_up_proj", ("gate_proj", "up_proj"), interleaved=True),
    ExpertTensor("mlp.experts.gate_up_proj_bias", ("gate_bias", "up_bias"), interleaved=True),
    ExpertTensor("mlp.experts.down_proj", ("down_proj",)),
    ExpertTensor("mlp.experts.down_proj_bias", ("down_bias",))))
register(Family("gpt_oss", "GptOssForCausalLM", windows=AlternatingLayers(2),
                rope_types=YARN, tensors=GPT_OSS_TENSORS,
                switches=dict(attention_sinks=True, qkv_bias="attention_bias",
                              o_bias="attention_bias"),
                config_defaults={"attention_bias": True, "rope_theta": 150000.0},
                moe=MoeKeys(("num_local_experts", "num_experts"), "intermediate_size",
                            normalize=True, biases=True, clamped_swiglu=True)))


# Qwen3.5: three Gated DeltaNet layers to one attention layer with an output gate (the
# `layer_types`), (1 + w) RMSNorms, per-head q/k norms and partial RoPE (a quarter of each
# head). Its multimodal checkpoints' M-RoPE sections coincide for text positions.
QWEN3_5_DEFAULTS = {"head_dim": 256, "partial_rotary_factor": 0.25,
                    "linear_conv_kernel_dim": 4, "linear_key_head_dim": 128,
                    "linear_value_head_dim": 128, "linear_num_key_heads": 16,
                    "linear_num_value_heads": 32, "max_position_embeddings": 32768}
QWEN3_5_SWITCHES = dict(norm_unit_offset=True, qk_norm=True, attention_output_gate=True,
                        qkv_bias="attention_bias", o_bias="attention_bias")
register(Family("qwen3_5_text", "Qwen3_5ForCausalLM", hybrid=True, partial_rotary=True,
                switches=QWEN3_5_SWITCHES, config_defaults=QWEN3_5_DEFAULTS))
register(Family("qwen3_5_moe_text", "Qwen3_5MoeForCausalLM", hybrid=True,
                partial_rotary=True, switches=QWEN3_5_SWITCHES,
                config_defaults={**QWEN3_5_DEFAULTS, "intermediate_size": 0},
                moe=MoeKeys(("num_experts",), "moe_intermediate_size", normalize=True,
                            shared_expert_size="shared_expert_intermediate_size")))

# Gemma 4 (text): Gemma 3's sandwich norms with plain (not 1 + w) scales, q/k norms and a
# scale-free v norm, attention scale 1, sliding layers on the local base and full layers
# on proportional RoPE with their own head dim, KV sharing, per-layer embeddings.
register(Family("gemma4_text", "Gemma4ForCausalLM",
                windows=AlternatingLayers(6), rope_types=("default", "proportional"),
                rope_by_layer_type=True, per_layer=Gemma4Layers(),
                switches=dict(sandwich_norms=True, scale_embeddings=True, qk_norm=True,
                              v_norm=True, qkv_bias="attention_bias", o_bias="attention_bias"),
                values={"activation": ("hidden_activation", "gelu_pytorch_tanh"),
                        "query_pre_attn_scalar": ("query_pre_attn_scalar", 1.0),
                        "final_logit_softcapping": ("final_logit_softcapping", None)},
                config_defaults={
                    "head_dim": 256, "tie_word_embeddings": True, "sliding_window": 512,
                    "hidden_size_per_layer_input": 256, "vocab_size_per_layer_input": 262144,
                    "rope_parameters": {
                        "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                        "full_attention": {"rope_type": "proportional",
                                           "partial_rotary_factor": 0.25,
                                           "rope_theta": 1000000.0}}}))
