"""Tiny Hugging Face PyTorch models: the independent reference the decoder is tested against.

Weights are re-drawn with larger spread than HF's init (biases and norm scales included),
so that every feature under test moves the logits far beyond the parity tolerance.
"""

from __future__ import annotations

import numpy as np
import torch
import transformers

_COMMON = dict(vocab_size=160, hidden_size=64, intermediate_size=112, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5,
               max_position_embeddings=256)

# SmolLM3's defaults name token ids of its 128k vocabulary.
_SMOLLM3 = dict(_COMMON, num_hidden_layers=4, no_rope_layer_interval=2, pad_token_id=0,
                bos_token_id=1, eos_token_id=2)

_QWEN3_5 = dict(head_dim=16, linear_conv_kernel_dim=3, linear_key_head_dim=16,
                linear_value_head_dim=8, linear_num_key_heads=2, linear_num_value_heads=4,
                layer_types=["linear_attention", "full_attention"] * 2, pad_token_id=0,
                bos_token_id=1, eos_token_id=2,
                rope_parameters={"rope_type": "default", "rope_theta": 20000.0,
                                 "partial_rotary_factor": 0.5})

# One config per family, each with non-default rope_theta / eps and GQA ratio 2.
FAMILIES = {
    "llama3": lambda: transformers.LlamaConfig(
        **_COMMON, rope_parameters={"rope_type": "llama3", "rope_theta": 50000.0, "factor": 8.0,
                                    "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                    "original_max_position_embeddings": 16}),
    "llama_biases": lambda: transformers.LlamaConfig(
        **_COMMON, rope_parameters={"rope_type": "default", "rope_theta": 20000.0},
        attention_bias=True, mlp_bias=True),
    "mistral": lambda: transformers.MistralConfig(
        **_COMMON, sliding_window=8, head_dim=None,
        rope_parameters={"rope_type": "default", "rope_theta": 100000.0}),
    "qwen2": lambda: transformers.Qwen2Config(
        **_COMMON, tie_word_embeddings=True,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}),
    "qwen3": lambda: transformers.Qwen3Config(
        **_COMMON, head_dim=32, rope_parameters={"rope_type": "default", "rope_theta": 30000.0}),
    # YaRN past an original context of 16 tokens, its ramp not rounded outwards.
    "qwen3_yarn": lambda: transformers.Qwen3Config(
        **_COMMON, head_dim=32, rope_parameters={
            "rope_type": "yarn", "rope_theta": 30000.0, "factor": 4.0, "beta_fast": 16.0,
            "beta_slow": 2.0, "truncate": False, "original_max_position_embeddings": 16}),
    # Layers 1 and 3 without RoPE; in the second, those layers also slide (window 8).
    "smollm3": lambda: transformers.SmolLM3Config(
        **_SMOLLM3, rope_parameters={"rope_type": "default", "rope_theta": 30000.0}),
    "smollm3_window": lambda: transformers.SmolLM3Config(
        **_SMOLLM3, use_sliding_window=True, sliding_window=8,
        rope_parameters={"rope_type": "default", "rope_theta": 30000.0}),
    # Fused qkv and gate_up tensors, half of each head rotated, a window of 8.
    "phi3": lambda: transformers.Phi3Config(
        **_COMMON, partial_rotary_factor=0.5, sliding_window=8, pad_token_id=0,
        bos_token_id=1, eos_token_id=2,
        rope_parameters={"rope_type": "default", "rope_theta": 20000.0}),
    # Gemma 2: (1 + w) norms, four per layer, GeGLU, scaled embeddings, a query scale that
    # is not head_dim's, soft-capped scores and logits (small caps, so they bend), window 8
    # on layer 0 only.
    "gemma2": lambda: transformers.Gemma2Config(
        **_COMMON, head_dim=32, query_pre_attn_scalar=24, sliding_window=8,
        attn_logit_softcapping=1.0, final_logit_softcapping=4.0, pad_token_id=0,
        bos_token_id=1, eos_token_id=2,
        rope_parameters={"rope_type": "default", "rope_theta": 20000.0}),
    # Gemma 3: Gemma 2 without caps, plus q/k norms, and RoPE per layer type: the sliding
    # layer's own base, the full layer's linear scaling.
    "gemma3_text": lambda: transformers.Gemma3TextConfig(
        **_COMMON, head_dim=32, query_pre_attn_scalar=24, sliding_window=8,
        layer_types=["sliding_attention", "full_attention"], pad_token_id=0, bos_token_id=1,
        eos_token_id=2,
        rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                         "full_attention": {"rope_type": "linear", "factor": 4.0,
                                            "rope_theta": 1000000.0}}),
    # Phi-4-mini's shape of Phi-3: LongRoPE, 3/4 of each head rotated, tied embeddings. The
    # switch to the long factors comes after 32 tokens (max_position_embeddings / 32 = 8
    # gives the attention factor sqrt(1 + ln 8 / ln 32)).
    "phi4_mini": lambda: transformers.Phi3Config(
        **_COMMON, partial_rotary_factor=0.75, tie_word_embeddings=True, pad_token_id=0,
        bos_token_id=1, eos_token_id=2, original_max_position_embeddings=32,
        rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0,
                         "short_factor": [1.0, 1.2, 1.5, 1.9, 2.4, 3.0],
                         "long_factor": [1.5, 3.0, 6.0, 12.0, 24.0, 48.0]}),
    # Mixtures of experts: top-2 of 4 experts renormalised, a window of 8 (Mixtral); a
    # shared expert with its sigmoid gate, unnormalised top-2 and a dense layer between
    # sparse ones (Qwen2-MoE, mlp_only_layers); top-3 of 6 renormalised with q/k norms
    # (Qwen3-MoE); q/k norms over all heads (OLMoE).
    "mixtral": lambda: transformers.MixtralConfig(
        **_COMMON, num_local_experts=4, num_experts_per_tok=2, sliding_window=8,
        rope_parameters={"rope_type": "default", "rope_theta": 30000.0}),
    "qwen2_moe": lambda: transformers.Qwen2MoeConfig(
        **dict(_COMMON, num_hidden_layers=3), num_experts=4, num_experts_per_tok=2,
        moe_intermediate_size=48, shared_expert_intermediate_size=80, mlp_only_layers=[1],
        norm_topk_prob=False, rope_parameters={"rope_type": "default", "rope_theta": 20000.0}),
    "qwen3_moe": lambda: transformers.Qwen3MoeConfig(
        **_COMMON, head_dim=32, num_experts=6, num_experts_per_tok=3,
        moe_intermediate_size=40, norm_topk_prob=True,
        rope_parameters={"rope_type": "default", "rope_theta": 30000.0}),
    "olmoe": lambda: transformers.OlmoeConfig(
        **_COMMON, num_experts=4, num_experts_per_tok=2, norm_topk_prob=False,
        pad_token_id=0, bos_token_id=1, eos_token_id=2,
        rope_parameters={"rope_type": "default", "rope_theta": 40000.0}),
    # Norms after attention and MLP, q/k norms over all heads, biases, untied embeddings.
    # Sinks, biases everywhere, interleaved gate/up through a clamp that bites (0.6),
    # alternating sliding (8) and full layers, YaRN past an original context of 16.
    "gpt_oss": lambda: transformers.GptOssConfig(
        **dict(_COMMON, intermediate_size=48), head_dim=16, num_local_experts=4,
        num_experts_per_tok=2, sliding_window=8, swiglu_limit=0.6, swiglu_alpha=1.5,
        rope_parameters={"rope_type": "yarn", "rope_theta": 150000.0, "factor": 4.0,
                         "beta_fast": 32.0, "beta_slow": 1.0, "truncate": False,
                         "original_max_position_embeddings": 16}),
    # OLMo 3: a full layer after a sliding one (window 8), YaRN with an explicit attention
    # factor (as OLMo-3-7B's config.json has) on the full layers only, another base on the
    # sliding ones.
    "olmo3": lambda: transformers.Olmo3Config(
        **_COMMON, attention_bias=True, pad_token_id=0, bos_token_id=1, eos_token_id=2,
        sliding_window=8, layer_types=["sliding_attention", "full_attention"],
        rope_parameters={"full_attention": {"rope_type": "yarn", "rope_theta": 40000.0,
                                            "factor": 8.0, "beta_fast": 16.0,
                                            "beta_slow": 2.0, "attention_factor": 1.5,
                                            "original_max_position_embeddings": 16},
                         "sliding_attention": {"rope_type": "default",
                                               "rope_theta": 8000.0}}),
    # Qwen3.5: Gated DeltaNet and gated attention layers alternating (not the stock 3:1),
    # a conv of 3 taps, two value heads per key head of another width than the keys',
    # half of each attention head rotated.
    "qwen3_5": lambda: transformers.Qwen3_5TextConfig(
        **dict(_COMMON, num_hidden_layers=4), **_QWEN3_5),
    "qwen3_5_moe": lambda: transformers.Qwen3_5MoeTextConfig(
        **{k: v for k, v in dict(_COMMON, num_hidden_layers=4).items()
           if k != "intermediate_size"}, **_QWEN3_5, num_experts=4, num_experts_per_tok=2,
        moe_intermediate_size=32, shared_expert_intermediate_size=48),
    # Gemma 4: sliding (window 8) and full layers alternating, the full ones with their own
    # head dim (32) and one KV head whose values are the keys' projection, proportional
    # RoPE on a quarter of their pairs; the last two layers reuse the keys and values of
    # the last earlier layer of their type, with MLPs twice as wide; per-layer embeddings
    # of width 8; a final soft-cap.
    "gemma4_text": lambda: transformers.Gemma4TextConfig(
        **dict(_COMMON, num_hidden_layers=6), head_dim=16, global_head_dim=32,
        num_global_key_value_heads=1, attention_k_eq_v=True, num_kv_shared_layers=2,
        use_double_wide_mlp=True, hidden_size_per_layer_input=8,
        vocab_size_per_layer_input=160, sliding_window=8,
        layer_types=["sliding_attention", "full_attention"] * 3,
        final_logit_softcapping=20.0, pad_token_id=0, bos_token_id=2, eos_token_id=1,
        rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 20000.0},
                         "full_attention": {"rope_type": "proportional",
                                            "partial_rotary_factor": 0.25,
                                            "rope_theta": 500000.0}}),
    "olmo2": lambda: transformers.Olmo2Config(
        **_COMMON, attention_bias=True, pad_token_id=0, bos_token_id=1, eos_token_id=2,
        rope_parameters={"rope_type": "default", "rope_theta": 40000.0}),
}


def build(family: str, seed: int = 0, dtype: torch.dtype = torch.float32, **config_changes
          ) -> transformers.PreTrainedModel:
    """A randomly weighted model of `family` in eval mode (eager attention, no dropout);
    `config_changes` set config attributes first."""
    torch.manual_seed(seed)
    config = FAMILIES[family]()
    for key, value in config_changes.items():
        setattr(config, key, value)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.3 * torch.randn_like(p))
            elif name.endswith(".bias"):
                p.copy_(0.5 * torch.randn_like(p))
            else:
                p.copy_(0.08 * torch.randn_like(p))
        if family == "gpt_oss":  # sinks that take a real share of the attention
            for layer in model.model.layers:
                layer.self_attn.sinks.copy_(2.0 * torch.randn_like(layer.self_attn.sinks))
        if family.startswith("qwen3_5"):  # decays from slow to fast, a conv that bites
            for layer in model.model.layers:
                if hasattr(layer, "linear_attn"):
                    mixer = layer.linear_attn
                    mixer.A_log.copy_(torch.empty_like(mixer.A_log).uniform_(-4.0, 0.5))
                    mixer.conv1d.weight.copy_(0.5 * torch.randn_like(mixer.conv1d.weight))
        if family.startswith("gemma4"):  # layer scalars of their own size
            for layer in model.model.layers:
                layer.layer_scalar.copy_(0.5 + torch.rand_like(layer.layer_scalar))
        if family in ("olmo2", "olmo3", "olmoe"):
            # Heads of different magnitude, so a norm over all heads differs from a norm per
            # head (the feature's negative control).
            for layer in model.model.layers:
                head_dim = config.hidden_size // config.num_attention_heads
                layer.self_attn.q_proj.weight[:head_dim].mul_(10.0)
                layer.self_attn.k_proj.weight[:head_dim].mul_(10.0)
    return model.to(dtype).eval()


def logits(model: transformers.PreTrainedModel, tokens: np.ndarray) -> np.ndarray:
    """float32 logits [B, T, V] for unpadded token rows."""
    with torch.no_grad():
        out = model(torch.as_tensor(np.asarray(tokens), dtype=torch.long)).logits
    return out.float().numpy()
