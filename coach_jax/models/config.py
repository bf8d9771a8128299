"""`ModelConfig`: the frozen description of a decoder, built from a Hugging Face config.json.

Model code never sees raw HF dictionaries: every architectural switch it needs is a typed
field here, parsed once, with a clear error for anything the decoder cannot compute exactly.
What differs between families (which keys switch which feature) is their entry in
families.py.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any

from coach_jax.models import families, projection
from coach_jax.models.lora import LoraSpec
from coach_jax.models.families import UnsupportedModelError

SUPPORTED_MODEL_TYPES = families.FAMILIES.keys()  # a live view: registered families count
SUPPORTED_ROPE_TYPES = ("default", "llama3", "linear", "longrope", "yarn", "proportional")
REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch", "save_attention")
ATTENTION = ("auto", "xla", "cudnn", "splash")
ACTIVATIONS = ("silu", "gelu_pytorch_tanh")  # transformers' names
# A layer's token mixer; "global_attention": attention with the full layers' own head
# dim and KV heads (Gemma 4's global_head_dim).
MIXERS = ("attention", "global_attention", "gated_deltanet")


@dataclasses.dataclass(frozen=True)
class Llama3RopeScaling:
    """Llama 3.1's frequency-dependent RoPE rescaling (`rope_type: llama3`)."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int


@dataclasses.dataclass(frozen=True)
class LinearRopeScaling:
    """Positions divided by `factor` (`rope_type: linear`; Gemma 3's global layers)."""

    factor: float


@dataclasses.dataclass(frozen=True)
class LongRopeScaling:
    """Phi-3's LongRoPE (`rope_type: longrope`): per-frequency divisors, `short_factor`
    for examples up to `original_max_position_embeddings` tokens and `long_factor` beyond,
    and cos/sin scaled by `attention_factor`. Which set applies is decided per example
    (rope.example_lengths), so packed examples stay independent."""

    short_factor: tuple[float, ...]
    long_factor: tuple[float, ...]
    original_max_position_embeddings: int
    factor: float  # max_position_embeddings / original unless config.json sets it
    attention_factor: float  # sqrt(1 + ln(factor) / ln(original)) unless set


@dataclasses.dataclass(frozen=True)
class MoeSpec:
    """A mixture-of-experts feed-forward (the layers `ModelConfig.feed_forward` marks "moe"):
    a router picks `top_k` of `num_experts` SwiGLU experts per token from the softmax of
    its logits, and their outputs are summed with those probabilities (renormalised to sum
    1 with `normalize_top_k`). `shared_expert_size` > 0 adds a dense expert every token
    passes, scaled by a sigmoid gate (Qwen2-MoE). `aux_loss_coef` and
    `output_router_logits` are config.json's router settings, kept for training and export."""

    num_experts: int
    top_k: int
    expert_size: int  # each expert's intermediate width
    normalize_top_k: bool
    shared_expert_size: int = 0
    aux_loss_coef: float = 0.0
    output_router_logits: bool = False
    # gpt-oss: the router's logits have a bias, the experts' gate, up and down projections
    # too, and the experts' gated activation is clamped: gate <= limit, |up| <= limit,
    # (up + 1) * gate * sigmoid(alpha * gate). (Its softmax over the chosen logits is
    # the renormalised top k of the softmax: normalize_top_k.)
    router_bias: bool = False
    expert_bias: bool = False
    swiglu_limit: float | None = None
    swiglu_alpha: float = 1.702

    def __post_init__(self):
        if not 0 < self.top_k <= self.num_experts:
            raise UnsupportedModelError(f"num_experts_per_tok={self.top_k} must be in "
                                        f"[1, {self.num_experts}] (the number of experts)")


@dataclasses.dataclass(frozen=True)
class DeltaNetSpec:
    """The Gated DeltaNet token mixer (the layers `ModelConfig.mixers` marks
    "gated_deltanet"; Qwen3.5's `linear_attention`): key heads each serve
    num_value_heads / num_key_heads value heads, after a causal depthwise conv1d of
    `conv_kernel` taps over the fused q, k, v channels."""

    num_key_heads: int
    num_value_heads: int
    key_head_dim: int
    value_head_dim: int
    conv_kernel: int = 4

    def __post_init__(self):
        if self.num_value_heads % self.num_key_heads:
            raise UnsupportedModelError(
                f"linear_num_value_heads={self.num_value_heads} is not a multiple of "
                f"linear_num_key_heads={self.num_key_heads}")
        if self.conv_kernel < 1:
            raise UnsupportedModelError(f"linear_conv_kernel_dim={self.conv_kernel} must be "
                                        "at least 1")

    @property
    def key_dim(self) -> int:
        return self.num_key_heads * self.key_head_dim

    @property
    def value_dim(self) -> int:
        return self.num_value_heads * self.value_head_dim


@dataclasses.dataclass(frozen=True)
class YarnRopeScaling:
    """YaRN (`rope_type: yarn`): frequencies interpolated by `factor` below the
    correction range set by `beta_fast` / `beta_slow` rotations within
    `original_max_position_embeddings`, kept above it, linearly blended inside it
    (`truncate` rounds the range outwards); cos/sin scaled by `attention_factor`
    (0.1 ln(factor) + 1 unless config.json sets it or its mscale pair)."""

    factor: float
    original_max_position_embeddings: int
    beta_fast: float
    beta_slow: float
    truncate: bool
    attention_factor: float


@dataclasses.dataclass(frozen=True)
class ProportionalRopeScaling:
    """Gemma 4's full layers (`rope_type: proportional`): the first
    `partial_rotary_factor` of each half of the head rotates, with frequencies
    theta^(-2i / head_dim) of the whole head's width, divided by `factor`; the other
    channels pass (frequency 0)."""

    partial_rotary_factor: float
    factor: float = 1.0


RopeScaling = (Llama3RopeScaling | LinearRopeScaling | LongRopeScaling | YarnRopeScaling
               | ProportionalRopeScaling)
ROPE_TYPE_NAMES = {Llama3RopeScaling: "llama3", LinearRopeScaling: "linear",
                   LongRopeScaling: "longrope", YarnRopeScaling: "yarn",
                   ProportionalRopeScaling: "proportional"}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture plus runtime switches (dtypes, scan) of one decoder.

    Hashable, so it can be a static argument of `jax.jit`.
    `layer_windows[i]` is layer i's sliding-window size in tokens, 0 for full attention.
    """

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int = 4096
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    # Gemma 3: sliding-window layers use default RoPE at this base instead (None: one RoPE).
    local_rope_theta: float | None = None
    # The share of each head's channels RoPE rotates (the first ones; Phi-3, Phi-4-mini).
    partial_rotary_factor: float = 1.0
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    # OLMo 2: q/k RMSNorm over all heads at once (the whole projection width), not per head.
    qk_norm_all_heads: bool = False
    # OLMo 2: no pre-norms; the attention and MLP outputs are normalised before each
    # residual add (post_attention_layernorm, post_feedforward_layernorm).
    post_norms: bool = False
    # Gemma: RMSNorm scales by (1 + w) in float32; four norms per layer (input, after
    # attention, before and after the MLP); embeddings times sqrt(hidden_size).
    norm_unit_offset: bool = False
    sandwich_norms: bool = False
    scale_embeddings: bool = False
    # gpt-oss: a learned logit per head (`self_attn/sinks`) joins each query's softmax
    # over the keys and takes its share of the weight, attending to nothing.
    attention_sinks: bool = False
    # Qwen3.5: q_proj is twice as wide, each head's second half a gate; the attention
    # output is multiplied by its sigmoid before o_proj.
    attention_output_gate: bool = False
    activation: str = "silu"  # one of ACTIVATIONS: the MLP's gate activation
    query_pre_attn_scalar: float | None = None  # attention scale s**-0.5; None: head_dim
    attn_logit_softcapping: float | None = None  # scores -> cap * tanh(scores / cap)
    final_logit_softcapping: float | None = None  # logits -> cap * tanh(logits / cap)
    layer_windows: tuple[int, ...] = ()
    # rope_layers[i]: layer i rotates queries and keys (SmolLM3 has layers without RoPE).
    rope_layers: tuple[bool, ...] = ()
    # feed_forward[i]: layer i's feed-forward, a name in layers.FEED_FORWARDS ("mlp": the
    # dense gated MLP; "moe": experts as `moe` describes). Empty: "mlp" everywhere.
    feed_forward: tuple[str, ...] = ()
    moe: MoeSpec | None = None
    # mixers[i]: layer i's token mixer, "attention" (self_attn) or "gated_deltanet"
    # (linear_attn, as `deltanet` describes). Empty: attention everywhere.
    mixers: tuple[str, ...] = ()
    deltanet: DeltaNetSpec | None = None
    # Gemma 4: the "global_attention" layers' head dim and KV heads (None: head_dim and
    # num_kv_heads); with attention_k_eq_v their values are their keys' projection.
    global_head_dim: int | None = None
    global_kv_heads: int | None = None
    attention_k_eq_v: bool = False
    v_norm: bool = False  # values RMS-normalised per head, without a scale (Gemma 4)
    # kv_sources[i]: the earlier layer whose keys and values layer i attends with (Gemma
    # 4's num_kv_shared_layers; such a layer has no k/v projections), -1: its own.
    kv_sources: tuple[int, ...] = ()
    # Gemma 4's per-layer embeddings (PLE): a `per_layer_input_size`-wide input for every
    # layer from a table of `per_layer_vocab_size` rows and a projection of the
    # embeddings, gated into the residual after the MLP. 0: none.
    per_layer_input_size: int = 0
    per_layer_vocab_size: int = 0
    layer_scalar: bool = False  # Gemma 4: each layer's output times a learned scalar
    initializer_range: float = 0.02
    # Runtime switches: not part of the architecture, never written to config.json.
    compute_dtype: str = "float32"
    param_dtype: str = "float32"
    scan_layers: bool = True
    remat: str = "none"  # one of REMAT_POLICIES: what the backward pass recomputes
    attention: str = "auto"  # one of ATTENTION; auto picks the fastest for the backend
    # How projections hold and apply their weights: a name in projection.STRATEGIES.
    projection: str = "dense"
    # With projection="lora": the adapter's rank, scale and target modules.
    lora: LoraSpec | None = None
    # With a vocabulary padded (for sharding) beyond the tokenizer's, the real size: logits
    # of the padding ids are masked and export cuts them off. None: vocab_size is real.
    real_vocab_size: int | None = None
    # The source config.json as text, so export keeps fields we do not model (token ids...).
    hf_source: str | None = dataclasses.field(default=None, compare=False, repr=False)

    def __post_init__(self):
        families.family(self.model_type)
        if self.num_heads % self.num_kv_heads:
            raise UnsupportedModelError(
                f"num_attention_heads={self.num_heads} is not a multiple of "
                f"num_key_value_heads={self.num_kv_heads}")
        if self.remat not in REMAT_POLICIES:
            raise UnsupportedModelError(f"remat={self.remat!r}; expected one of "
                                        f"{', '.join(REMAT_POLICIES)}")
        if self.attention not in ATTENTION:
            raise UnsupportedModelError(f"attention={self.attention!r}; expected one of "
                                        f"{', '.join(ATTENTION)}")
        if self.activation not in ACTIVATIONS:
            raise UnsupportedModelError(f"hidden_act {self.activation!r} is not supported "
                                        f"(only {', '.join(ACTIVATIONS)})")
        if self.projection not in projection.STRATEGIES:
            raise UnsupportedModelError(f"projection={self.projection!r}; expected one of "
                                        f"{', '.join(projection.STRATEGIES)}")
        if (self.projection == "lora") != (self.lora is not None):
            raise UnsupportedModelError("projection='lora' and a LoraSpec go together "
                                        f"(projection={self.projection!r}, lora={self.lora})")
        if self.real_vocab_size is not None and not 0 < self.real_vocab_size <= self.vocab_size:
            raise UnsupportedModelError(f"real_vocab_size={self.real_vocab_size} must be in "
                                        f"(0, vocab_size={self.vocab_size}]")
        if not self.layer_windows:
            object.__setattr__(self, "layer_windows", (0,) * self.num_layers)
        if len(self.layer_windows) != self.num_layers:
            raise UnsupportedModelError(
                f"{len(self.layer_windows)} layer windows given for {self.num_layers} layers")
        if not self.feed_forward:
            object.__setattr__(self, "feed_forward", ("mlp",) * self.num_layers)
        if len(self.feed_forward) != self.num_layers:
            raise UnsupportedModelError(f"{len(self.feed_forward)} feed-forward kinds given "
                                        f"for {self.num_layers} layers")
        if ("moe" in self.feed_forward) != (self.moe is not None):
            raise UnsupportedModelError("MoE layers and a MoeSpec go together "
                                        f"(feed_forward={self.feed_forward}, moe={self.moe})")
        if not self.mixers:
            object.__setattr__(self, "mixers", ("attention",) * self.num_layers)
        if len(self.mixers) != self.num_layers or set(self.mixers) - set(MIXERS):
            raise UnsupportedModelError(f"mixers={self.mixers}: one of {', '.join(MIXERS)} "
                                        f"per layer ({self.num_layers} layers)")
        if ("gated_deltanet" in self.mixers) != (self.deltanet is not None):
            raise UnsupportedModelError("Gated DeltaNet layers and a DeltaNetSpec go together "
                                        f"(mixers={self.mixers}, deltanet={self.deltanet})")
        if not self.kv_sources:
            object.__setattr__(self, "kv_sources", (-1,) * self.num_layers)
        if len(self.kv_sources) != self.num_layers or any(
                not -1 <= s < i or (s >= 0 and (self.kv_sources[s] >= 0 or
                                                self.mixers[s] != self.mixers[i]))
                for i, s in enumerate(self.kv_sources)):
            raise UnsupportedModelError(
                f"kv_sources={self.kv_sources}: each layer reuses an earlier layer's keys "
                "and values (one of its own mixer that has its own) or none (-1)")
        if self.scan_layers and self.num_layers > 1 and self.scan_period == self.num_layers:
            # No repeating group of layers to scan over: every layer is unrolled.
            object.__setattr__(self, "scan_layers", False)
        if not self.rope_layers:
            object.__setattr__(self, "rope_layers", (True,) * self.num_layers)
        if len(self.rope_layers) != self.num_layers:
            raise UnsupportedModelError(
                f"{len(self.rope_layers)} rope flags given for {self.num_layers} layers")

    @property
    def layer_kinds(self) -> tuple[tuple[str, str], ...]:
        """Each layer's (token mixer, feed-forward)."""
        return tuple(zip(self.mixers, self.feed_forward))

    def reuses_kv(self, layer: int) -> bool:
        return self.kv_sources[layer] >= 0

    def attention_geometry(self, mixer: str) -> tuple[int, int]:
        """(head dim, KV heads) of an attention mixer's layers."""
        if mixer == "global_attention":
            return (self.global_head_dim or self.head_dim,
                    self.global_kv_heads or self.num_kv_heads)
        return self.head_dim, self.num_kv_heads

    @property
    def scan_period(self) -> int:
        """The length of the shortest group of layers whose kinds repeat through the stack
        (1: all layers alike; Qwen3.5: 4, three DeltaNet layers and one attention). A
        scan runs over the groups, each group's layers unrolled; num_layers: no group
        repeats."""
        kinds = [(*kind, self.reuses_kv(i)) for i, kind in enumerate(self.layer_kinds)]
        return next(p for p in range(1, self.num_layers + 1) if self.num_layers % p == 0
                    and all(kinds[i] == kinds[i % p] for i in range(self.num_layers)))

    def cache_slot(self, layer: int) -> int:
        """Where layer `layer`'s state lives in the decoding cache: its index among the
        layers of its token mixer that keep their own (attention layers' keys and values,
        DeltaNet layers' conv and recurrent states); a layer that reuses another's keys
        and values reads that layer's slot."""
        if self.reuses_kv(layer):
            return self.cache_slot(self.kv_sources[layer])
        return sum(1 for i in range(layer) if self.mixers[i] == self.mixers[layer]
                   and not self.reuses_kv(i))

    def cached_layers(self, mixer: str) -> int:
        """How many layers of `mixer` keep their own cache slot."""
        return sum(1 for i, m in enumerate(self.mixers) if m == mixer and not self.reuses_kv(i))

    @property
    def has_sliding_window(self) -> bool:
        return any(self.layer_windows)

    @property
    def rotary_dim(self) -> int:
        """How many leading channels of each head RoPE rotates (as transformers rounds)."""
        return int(self.head_dim * self.partial_rotary_factor)

    @property
    def rope_type(self) -> str:
        if self.rope_scaling is None:
            return "default"
        return ROPE_TYPE_NAMES[type(self.rope_scaling)]

    @property
    def rope_switch_length(self) -> int | None:
        """The length past which a sequence's RoPE changes for all its tokens (LongRoPE's
        short -> long factors), so cached keys of a growing sequence must be recomputed
        there; None when positions always rotate the same way."""
        if isinstance(self.rope_scaling, LongRopeScaling):
            return self.rope_scaling.original_max_position_embeddings
        return None

    def projection_group(self, module: str) -> str | None:
        """The group ("qkv") of a projection ("self_attn/q_proj") that the checkpoint
        stores fused with others, so strategies can share parameters across it; None when
        it is stored alone. Derived from the family's tensor layout, not a free switch."""
        return families.family(self.model_type).tensors.groups().get(module)

    @classmethod
    def from_hf_dict(cls, hf: dict[str, Any], **overrides: Any) -> "ModelConfig":
        """Parses a HF `config.json` dict; `overrides` set runtime fields (dtypes, scan). A
        multimodal config (Gemma 3 4B and up) gives its text decoder's."""
        if hf.get("model_type") in families.MULTIMODAL:
            hf = families.text_decoder_config(hf)
        family = families.family(hf.get("model_type"))
        hf = {**family.config_defaults, **hf}
        for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                    "num_attention_heads"):
            if key not in hf:
                raise UnsupportedModelError(f"config.json has no {key!r}")
        num_layers = hf["num_hidden_layers"]
        num_heads = hf["num_attention_heads"]
        local_rope_theta = None
        if family.rope_by_layer_type:
            hf, local_rope_theta = _split_rope_by_layer_type(hf, family.legacy_rope)
        rope_theta, rope_scaling, partial = _parse_rope(hf, family)
        if partial != 1.0 and not family.partial_rotary:
            raise UnsupportedModelError(f"partial_rotary_factor={partial} is not supported "
                                        f"for {family.model_type}")
        fields: dict[str, Any] = dict(
            model_type=family.model_type,
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_layers=num_layers,
            num_heads=num_heads,
            num_kv_heads=hf.get("num_key_value_heads") or num_heads,
            head_dim=hf.get("head_dim") or hf["hidden_size"] // num_heads,
            max_position_embeddings=hf.get("max_position_embeddings", 4096),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            local_rope_theta=local_rope_theta,
            partial_rotary_factor=float(partial),
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            initializer_range=hf.get("initializer_range", 0.02),
            hf_source=json.dumps(hf, sort_keys=True),
        )
        fields.update(family.features(hf, num_layers))
        fields.update(overrides)
        return cls(**fields)

    @classmethod
    def from_hf_dir(cls, path: str | os.PathLike, **overrides: Any) -> "ModelConfig":
        config_path = os.path.join(path, "config.json")
        if not os.path.isfile(config_path):
            raise FileNotFoundError(f"{path}: no config.json (expected a Hugging Face model folder)")
        try:
            with open(config_path) as f:
                hf = json.load(f)
        except json.JSONDecodeError as e:
            raise UnsupportedModelError(f"{config_path}: not valid JSON ({e})") from e
        try:
            return cls.from_hf_dict(hf, **overrides)
        except UnsupportedModelError as e:
            raise UnsupportedModelError(f"{config_path}: {e}") from e

    def to_hf_dict(self) -> dict[str, Any]:
        """The `config.json` transformers needs to rebuild this architecture."""
        family = families.family(self.model_type)
        hf = json.loads(self.hf_source) if self.hf_source else {}
        # The weights written are plain tensors, whatever the source held (MXFP4 experts).
        for legacy in ("rope_scaling", "torch_dtype", "transformers_version",
                       "quantization_config"):
            hf.pop(legacy, None)
        rope: dict[str, Any] = {"rope_type": "default", "rope_theta": self.rope_theta}
        if self.rope_scaling is not None:
            rope = {"rope_type": self.rope_type, "rope_theta": self.rope_theta,
                    **dataclasses.asdict(self.rope_scaling, dict_factory=_json_fields)}
            # transformers reads a top-level value first (Phi-3 always has one: 4096).
            if self.rope_type == "longrope" or "original_max_position_embeddings" in hf:
                hf["original_max_position_embeddings"] = rope["original_max_position_embeddings"]
        if self.partial_rotary_factor != 1.0:
            rope["partial_rotary_factor"] = self.partial_rotary_factor
            hf["partial_rotary_factor"] = self.partial_rotary_factor
        if self.real_vocab_size not in (None, self.vocab_size):
            raise UnsupportedModelError("cut the padded vocabulary back before export "
                                        "(models.unpad_vocab)")
        hf.update(
            architectures=[family.architecture],
            model_type=self.model_type,
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_layers,
            num_attention_heads=self.num_heads,
            num_key_value_heads=self.num_kv_heads,
            head_dim=self.head_dim,
            hidden_act=self.activation,
            max_position_embeddings=self.max_position_embeddings,
            rms_norm_eps=self.rms_norm_eps,
            rope_theta=self.rope_theta,
            rope_parameters=rope,
            tie_word_embeddings=self.tie_word_embeddings,
            initializer_range=self.initializer_range,
            dtype=self.param_dtype,
        )
        problems = family.problems(self)
        if problems:
            raise UnsupportedModelError(
                f"a {self.model_type} checkpoint cannot express {', '.join(problems)}")
        family.export(self, hf)
        return hf


def _json_fields(fields: list[tuple[str, Any]]) -> dict[str, Any]:
    """A dataclass as config.json writes it: tuples as lists."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in fields}


def _split_rope_by_layer_type(hf: dict[str, Any], legacy: tuple[str, float, float]
                              ) -> tuple[dict[str, Any], float]:
    """RoPE per layer type (Gemma 3, OLMo 3): the full-attention layers' settings as a flat
    config (what `_parse_rope` reads) and the sliding layers' base. transformers 5 nests
    them in `rope_parameters`; older config.json files have `rope_theta` (+ `rope_scaling`,
    applied to full layers only) and the sliding base under the key `legacy` names (Gemma
    3's `rope_local_base_freq`, OLMo 3's `rope_theta`), with the family's defaults."""
    params = hf.get("rope_parameters") or {}
    local_key, local_default, full_default = legacy
    if "full_attention" in params or "sliding_attention" in params:
        full = params.get("full_attention",
                          {"rope_type": "default", "rope_theta": full_default})
        local = params.get("sliding_attention",
                           {"rope_type": "default", "rope_theta": local_default})
    else:
        full = {"rope_type": "default", "rope_theta": hf.get("rope_theta", full_default),
                **(hf.get("rope_scaling") or {})}
        local = {"rope_type": "default", "rope_theta": hf.get(local_key, local_default)}
    local_type = local.get("rope_type", local.get("type", "default"))
    if local_type != "default":
        raise UnsupportedModelError(f"sliding layers' rope type {local_type!r} is not "
                                    "supported (only default)")
    flat = {k: v for k, v in hf.items() if k not in ("rope_scaling", "rope_theta")}
    return {**flat, "rope_parameters": full}, float(local["rope_theta"])


def _parse_rope(hf: dict[str, Any], family: families.Family
                ) -> tuple[float, RopeScaling | None, float]:
    """Reads RoPE settings from transformers 5 (`rope_parameters`) or legacy keys: theta,
    scaling (of a type the family's config class computes; its legacy aliases, Phi-3's
    `su` and `yarn`, renamed as transformers does), and the partial rotary factor."""
    params = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
    rope_type = params.get("rope_type", params.get("type", "default"))
    rope_type = family.rope_aliases.get(rope_type, rope_type)
    if rope_type not in SUPPORTED_ROPE_TYPES or rope_type not in family.rope_types:
        raise UnsupportedModelError(
            f"rope scaling type {rope_type!r} is not supported for {family.model_type}; "
            f"supported: {', '.join(family.rope_types)}")
    partial = params.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
    if not 0 < partial <= 1:
        raise UnsupportedModelError(f"partial_rotary_factor={partial} must be in (0, 1]")
    if rope_type == "default":
        return float(theta), None, float(partial)
    if rope_type == "proportional":  # its partial factor is its own, not the head's
        return float(theta), ProportionalRopeScaling(
            float(partial), float(params.get("factor", 1.0))), 1.0
    if rope_type == "linear":
        if "factor" not in params:
            raise UnsupportedModelError("linear rope scaling lacks 'factor'")
        return float(theta), LinearRopeScaling(float(params["factor"])), float(partial)
    # transformers gives a top-level original_max_position_embeddings priority (Phi-3).
    original = hf.get("original_max_position_embeddings",
                      params.get("original_max_position_embeddings"))
    try:
        if rope_type == "longrope":
            return float(theta), _longrope(hf, params, original, partial), float(partial)
        if rope_type == "yarn":
            return float(theta), _yarn(hf, params, original), float(partial)
        scaling = Llama3RopeScaling(
            factor=float(params["factor"]),
            low_freq_factor=float(params["low_freq_factor"]),
            high_freq_factor=float(params["high_freq_factor"]),
            original_max_position_embeddings=int(params["original_max_position_embeddings"]
                                                 if original is None else original))
    except KeyError as e:
        raise UnsupportedModelError(f"{rope_type} rope scaling lacks {e.args[0]!r}") from e
    return float(theta), scaling, float(partial)


def _longrope(hf: dict[str, Any], params: dict[str, Any], original: Any,
              partial: float) -> LongRopeScaling:
    """LongRoPE's factors, checked against the rotated width, and the attention factor
    transformers derives when config.json does not set it."""
    original = int(original if original is not None else hf.get("max_position_embeddings", 4096))
    head_dim = hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"]
    pairs = int(head_dim * partial) // 2
    factors = {}
    for key in ("short_factor", "long_factor"):
        values = params[key]
        if (not isinstance(values, (list, tuple)) or len(values) != pairs
                or not all(isinstance(v, (int, float)) and v > 0 for v in values)):
            raise UnsupportedModelError(
                f"longrope {key} must be {pairs} positive numbers (one per rotated channel "
                f"pair), got {values!r}")
        factors[key] = tuple(float(v) for v in values)
    factor = params.get("factor")
    if factor is None:
        factor = hf.get("max_position_embeddings", 4096) / original
    attention_factor = params.get("attention_factor")
    if attention_factor is None:
        attention_factor = (1.0 if factor <= 1.0 else
                            math.sqrt(1 + math.log(factor) / math.log(original)))
    return LongRopeScaling(original_max_position_embeddings=original, factor=float(factor),
                           attention_factor=float(attention_factor), **factors)


def _yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def _yarn(hf: dict[str, Any], params: dict[str, Any], original: Any) -> YarnRopeScaling:
    """YaRN's settings with transformers' defaults: factor from max_position_embeddings /
    original when absent, beta_fast 32, beta_slow 1, truncate on, and the attention factor
    from factor (or the mscale / mscale_all_dim pair)."""
    original = int(params["original_max_position_embeddings"] if original is None
                   else original)
    factor = params.get("factor")
    if factor is None:
        factor = hf.get("max_position_embeddings", original) / original
    attention_factor = params.get("attention_factor")
    if attention_factor is None:
        mscale, mscale_all_dim = params.get("mscale"), params.get("mscale_all_dim")
        attention_factor = (_yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all_dim)
                            if mscale and mscale_all_dim else _yarn_mscale(factor))
    return YarnRopeScaling(
        factor=float(factor), original_max_position_embeddings=original,
        beta_fast=float(params.get("beta_fast") or 32),
        beta_slow=float(params.get("beta_slow") or 1),
        truncate=bool(params.get("truncate", True)), attention_factor=float(attention_factor))
