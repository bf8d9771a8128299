"""`ModelConfig.from_hf_dict`: what is parsed, and clear errors for what is not supported."""

import dataclasses
import json

import numpy as np
import pytest
import transformers

from coach_jax import models

BASE = dict(model_type="llama", vocab_size=32, hidden_size=16, intermediate_size=24,
            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)


def test_legacy_rope_keys_are_read():
    cfg = models.ModelConfig.from_hf_dict({
        **BASE, "rope_theta": 500000.0,
        "rope_scaling": {"type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}})
    assert cfg.rope_theta == 500000.0
    assert cfg.rope_scaling == models.Llama3RopeScaling(32.0, 1.0, 4.0, 8192)
    assert cfg.head_dim == 4


def test_qwen2_sliding_layers_follow_max_window_layers():
    cfg = models.ModelConfig.from_hf_dict({**BASE, "model_type": "qwen2", "num_hidden_layers": 4,
                                           "use_sliding_window": True, "sliding_window": 64,
                                           "max_window_layers": 2})
    assert cfg.layer_windows == (0, 0, 64, 64)
    assert cfg.qkv_bias and not cfg.o_bias
    assert models.ModelConfig.from_hf_dict({**BASE, "model_type": "qwen2",
                                            "sliding_window": 64}).layer_windows == (0, 0)


@pytest.mark.parametrize("family", ["llama3", "mistral", "qwen2", "qwen3", "llama_biases",
                                    "qwen3_yarn", "qwen3_5", "qwen3_5_moe", "gemma4_text"])
def test_exported_config_rebuilds_the_same_architecture(family):
    import hf_reference
    hf = hf_reference.FAMILIES[family]().to_dict()
    cfg = models.ModelConfig.from_hf_dict(hf)
    exported = cfg.to_hf_dict()
    rebuilt = transformers.AutoConfig.for_model(**exported)
    assert models.ModelConfig.from_hf_dict(rebuilt.to_dict()) == cfg
    without_source = dataclasses.replace(cfg, hf_source=None)
    assert models.ModelConfig.from_hf_dict(without_source.to_hf_dict()) == cfg


@pytest.mark.parametrize("change, message", [
    (dict(model_type="gpt2"), r"model_type 'gpt2' is not supported; supported: llama, mistral"),
    (dict(rope_parameters={"rope_type": "dynamic", "factor": 4.0, "rope_theta": 1e4}),
     r"rope scaling type 'dynamic' is not supported"),
    (dict(rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}),
     r"yarn rope scaling lacks 'original_max_position_embeddings'"),
    (dict(hidden_act="gelu"), r"hidden_act 'gelu' is not supported"),
    (dict(num_key_value_heads=3), r"not a multiple of num_key_value_heads=3"),
    (dict(partial_rotary_factor=0.5), r"partial_rotary_factor=0.5"),
    (dict(rope_parameters={"rope_type": "llama3", "factor": 8.0}), r"lacks 'low_freq_factor'"),
])
def test_unsupported_configs_name_the_problem(tmp_path, change, message):
    (tmp_path / "config.json").write_text(json.dumps({**BASE, **change}))
    with pytest.raises(models.UnsupportedModelError, match=message) as err:
        models.load_hf(tmp_path)
    assert str(tmp_path / "config.json") in str(err.value)


def test_missing_size_field_is_named():
    hf = dict(BASE)
    del hf["intermediate_size"]
    with pytest.raises(models.UnsupportedModelError, match="no 'intermediate_size'"):
        models.ModelConfig.from_hf_dict(hf)


def test_invalid_json_names_the_file(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(models.UnsupportedModelError, match="config.json: not valid JSON"):
        models.load_hf(tmp_path)


def test_export_refuses_what_the_hf_class_cannot_express():
    cfg = models.ModelConfig.from_hf_dict({**BASE, "model_type": "mistral"})
    with pytest.raises(models.UnsupportedModelError, match="qk_norm=True"):
        dataclasses.replace(cfg, qk_norm=True).to_hf_dict()


def test_smollm3_defaults_are_transformers_own():
    """A config.json without rope_theta or tie_word_embeddings: the values SmolLM3Config
    assumes (2e6, tied), and its rule of every 4th layer without RoPE."""
    import transformers
    hf = {"model_type": "smollm3", "vocab_size": 160, "hidden_size": 64,
          "intermediate_size": 112, "num_hidden_layers": 8, "num_attention_heads": 4,
          "num_key_value_heads": 2}
    reference = transformers.SmolLM3Config(**hf)
    cfg = models.ModelConfig.from_hf_dict(hf)
    assert cfg.rope_theta == reference.rope_parameters["rope_theta"] == 2e6
    assert cfg.tie_word_embeddings is reference.tie_word_embeddings is True
    assert cfg.rope_layers == tuple(bool(f) for f in reference.no_rope_layers)
    assert cfg.rope_layers == (True, True, True, False) * 2


def test_gemma2_defaults_are_transformers_own():
    """A minimal Gemma 2 config.json: head_dim, caps, query scale, window, alternating
    layers, activation and tying as Gemma2Config assumes them."""
    import transformers
    hf = {"model_type": "gemma2", "vocab_size": 160, "hidden_size": 64,
          "intermediate_size": 112, "num_hidden_layers": 4, "num_attention_heads": 4,
          "num_key_value_heads": 2}
    reference = transformers.Gemma2Config(**hf)
    cfg = models.ModelConfig.from_hf_dict(hf)
    assert cfg.head_dim == reference.head_dim == 256
    assert cfg.query_pre_attn_scalar == reference.query_pre_attn_scalar
    assert cfg.attn_logit_softcapping == reference.attn_logit_softcapping == 50.0
    assert cfg.final_logit_softcapping == reference.final_logit_softcapping == 30.0
    assert cfg.activation == reference.hidden_activation
    assert cfg.tie_word_embeddings is reference.tie_word_embeddings is True
    assert cfg.layer_windows == tuple(reference.sliding_window if t == "sliding_attention"
                                      else 0 for t in reference.layer_types)
    assert cfg.layer_windows == (4096, 0, 4096, 0)


OLMO3_YARN = {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 8192,
              "beta_fast": 32.0, "beta_slow": 1.0, "attention_factor": 1.2079441541679836}


@pytest.mark.parametrize("model_type, rope", [
    ("gemma3_text", {}),  # transformers' defaults: local 1e4, global 1e6
    ("gemma3_text", {"rope_theta": 500000.0, "rope_local_base_freq": 20000.0,  # older keys
                     "rope_scaling": {"rope_type": "linear", "factor": 8.0}}),
    ("olmo3", {}),  # one default base for both
    ("olmo3", {"rope_theta": 500000.0, "rope_scaling": OLMO3_YARN}),  # OLMo-3-7B's keys
])
def test_rope_per_layer_type_is_read_as_transformers_reads_it(model_type, rope):
    import transformers
    hf = {"model_type": model_type, "vocab_size": 160, "hidden_size": 64,
          "intermediate_size": 112, "num_hidden_layers": 8, "num_attention_heads": 4,
          "num_key_value_heads": 2, "max_position_embeddings": 65536, **rope}
    reference = transformers.AutoConfig.for_model(**hf)
    cfg = models.ModelConfig.from_hf_dict(hf)
    full, local = (reference.rope_parameters[t] for t in ("full_attention", "sliding_attention"))
    assert cfg.rope_theta == full["rope_theta"] and cfg.local_rope_theta == local["rope_theta"]
    assert cfg.rope_type == full["rope_type"] and local["rope_type"] == "default"
    if full["rope_type"] != "default":
        assert cfg.rope_scaling.factor == full["factor"]
    assert cfg.layer_windows == tuple(reference.sliding_window if t == "sliding_attention"
                                      else 0 for t in reference.layer_types)
    assert cfg.attn_logit_softcapping is None and cfg.final_logit_softcapping is None


PHI3 = {"model_type": "phi3", "vocab_size": 160, "hidden_size": 64, "intermediate_size": 112,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "max_position_embeddings": 1024, "partial_rotary_factor": 0.75}
SHORT, LONG = [1.0, 1.1, 1.3, 1.7, 2.2, 2.9], [1.4, 2.5, 5.0, 9.0, 17.0, 33.0]


@pytest.mark.parametrize("rope", [
    # transformers 5 keys; the top-level original length wins over the nested one.
    {"original_max_position_embeddings": 64,
     "rope_parameters": {"rope_type": "longrope", "rope_theta": 20000.0, "short_factor": SHORT,
                         "long_factor": LONG, "original_max_position_embeddings": 128}},
    # Phi-3-mini-128k's older config.json: `su`, and no top-level length (4096 assumed).
    {"rope_theta": 20000.0, "rope_scaling": {"type": "su", "short_factor": SHORT,
                                             "long_factor": LONG}},
    {"original_max_position_embeddings": 64,  # Phi-3.5's `yarn` alias, explicit factors
     "rope_scaling": {"type": "yarn", "short_factor": SHORT, "long_factor": LONG,
                      "factor": 3.0, "attention_factor": 1.3}},
])
def test_phi3_longrope_is_computed_as_transformers_computes_it(rope):
    """Short and long frequencies (to a float32 rounding: torch's pow is not numpy's) and
    the attention factor, from what
    transformers' own LongRoPE initialiser makes of the same config.json; the exported
    config.json means the same to both."""
    import numpy as np
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    from coach_jax.models import rope as coach_rope
    hf = {**PHI3, **rope}
    cfg = models.ModelConfig.from_hf_dict(hf)
    assert cfg.rope_type == "longrope"
    # transformers 5 renames su/yarn only after it checks the keys longrope needs (and
    # fails): its reference is the same config.json with the type renamed up front.
    renamed = {**hf, **{k: {**v, "type": "longrope"} for k, v in hf.items() if k == "rope_scaling"}}
    for config in (transformers.Phi3Config(**renamed),
                   transformers.AutoConfig.for_model(**cfg.to_hf_dict())):
        original = config.rope_parameters["original_max_position_embeddings"]
        assert cfg.rope_switch_length == original
        short, attention = ROPE_INIT_FUNCTIONS["longrope"](config, "cpu")
        long, _ = ROPE_INIT_FUNCTIONS["longrope"](config, "cpu", seq_len=original + 1)
        np.testing.assert_allclose(coach_rope.inverse_frequencies(cfg), short.numpy(),
                                   rtol=3e-7)
        np.testing.assert_allclose(coach_rope.inverse_frequencies(cfg, long=True),
                                   long.numpy(), rtol=3e-7)
        assert cfg.rope_scaling.attention_factor == pytest.approx(attention, rel=1e-12)
    assert models.ModelConfig.from_hf_dict(cfg.to_hf_dict()) == cfg


@pytest.mark.parametrize("change, message", [
    ({"model_type": "llama", "partial_rotary_factor": 1.0},
     r"'longrope' is not supported for llama; supported: default, llama3"),
    ({"rope_scaling": {"type": "longrope", "short_factor": SHORT[:4], "long_factor": LONG}},
     r"longrope short_factor must be 6 positive numbers"),
    ({"rope_scaling": {"type": "longrope", "short_factor": SHORT}}, r"lacks 'long_factor'"),
])
def test_bad_longrope_configs_name_the_problem(change, message):
    hf = {**PHI3, "rope_scaling": {"type": "longrope", "short_factor": SHORT[:2] * 3,
                                   "long_factor": LONG}, **change}
    with pytest.raises(models.UnsupportedModelError, match=message):
        models.ModelConfig.from_hf_dict(hf)


@pytest.mark.parametrize("rope", [
    {"factor": 4.0, "original_max_position_embeddings": 32},
    {"factor": 8.0, "original_max_position_embeddings": 4096, "beta_fast": 16.0,
     "beta_slow": 2.0, "truncate": False},  # gpt-oss's settings, cut down
    {"factor": 40.0, "original_max_position_embeddings": 4096, "mscale": 1.0,
     "mscale_all_dim": 0.707},  # DeepSeek's attention-factor pair
    {"factor": 2.0, "original_max_position_embeddings": 64, "attention_factor": 1.3},
])
def test_yarn_frequencies_and_attention_factor_equal_transformers(rope):
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    from coach_jax.models import rope as rope_lib
    hf = transformers.Qwen3Config(
        vocab_size=32, hidden_size=64, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, head_dim=64,
        max_position_embeddings=512,
        rope_parameters={"rope_type": "yarn", "rope_theta": 150000.0, **rope})
    inv_freq, attention_factor = ROPE_INIT_FUNCTIONS["yarn"](hf, "cpu")
    cfg = models.ModelConfig.from_hf_dict(hf.to_dict())
    assert cfg.rope_type == "yarn"
    assert cfg.rope_scaling.attention_factor == pytest.approx(attention_factor, rel=1e-12)
    ours = rope_lib.inverse_frequencies(cfg)
    assert (ours != rope_lib.inverse_frequencies(dataclasses.replace(cfg, rope_scaling=None))).any()
    np.testing.assert_allclose(ours, inv_freq.numpy(), rtol=1e-6)


@pytest.mark.parametrize("partial, factor", [(0.25, 1.0), (0.5, 2.0), (1.0, 1.0)])
def test_proportional_rope_frequencies_equal_transformers(partial, factor):
    """Gemma 4's full layers: frequencies over the whole (global) head's width for the
    first pairs, zeros for the rest, as transformers' proportional RoPE computes them."""
    import hf_reference
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    from coach_jax.models import rope as rope_lib
    hf = hf_reference.FAMILIES["gemma4_text"]()
    hf.rope_parameters["full_attention"].update(partial_rotary_factor=partial, factor=factor)
    expected, _ = ROPE_INIT_FUNCTIONS["proportional"](hf, "cpu", layer_type="full_attention")
    cfg = models.ModelConfig.from_hf_dict(hf.to_dict())
    assert cfg.rope_type == "proportional" and cfg.partial_rotary_factor == 1.0
    ours = rope_lib.inverse_frequencies(cfg)
    assert ours.shape == (cfg.global_head_dim // 2,)
    np.testing.assert_allclose(ours, expected.numpy(), rtol=1e-6)
