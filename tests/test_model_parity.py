"""Logits of the Flax decoder against Hugging Face PyTorch, family by family (fp32, CPU)."""

import dataclasses

import numpy as np
import pytest

import hf_reference
from coach_jax import models, parallel

TOLERANCE = 1e-4
SEQ_LEN = 48  # beyond llama3's original_max_position_embeddings (16) and Mistral's window (8)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """family -> (HF model, its saved folder)."""
    out = {}
    for family in hf_reference.FAMILIES:
        model = hf_reference.build(family)
        folder = tmp_path_factory.mktemp(family)
        model.save_pretrained(folder)
        out[family] = (model, str(folder))
    return out


def _tokens(batch=2, length=SEQ_LEN, seed=1):
    return np.random.RandomState(seed).randint(0, 160, (batch, length)).astype(np.int32)


@pytest.mark.parametrize("scan_layers", [True, False])
@pytest.mark.parametrize("family", list(hf_reference.FAMILIES))
def test_logits_match_hf(checkpoints, family, scan_layers):
    hf_model, folder = checkpoints[family]
    cfg, params = models.load_hf(folder, scan_layers=scan_layers)
    tokens = _tokens()
    diff = np.abs(np.asarray(models.apply(cfg, params, tokens))
                  - hf_reference.logits(hf_model, tokens)).max()
    print(f"{family} scan={scan_layers}: max |logits - HF| = {diff:.2e}")
    assert diff <= TOLERANCE


# Each feature switched off in coach_jax must break parity by far more than the tolerance:
# this proves the tests above exercise the feature. "family/feature" keys give a family
# more than one control; a function of the loaded config gives changes that depend on it.
NEGATIVE_CONTROLS = {
    "llama3": dict(rope_scaling=None),
    "mistral": dict(layer_windows=(0, 0)),
    "qwen2": dict(qkv_bias=False),
    "qwen3": dict(qk_norm=False),
    "llama_biases": dict(qkv_bias=False, o_bias=False, mlp_bias=False),
    "smollm3": dict(rope_layers=(True,) * 4),  # the NoPE layers given RoPE
    "smollm3_window": dict(layer_windows=(0,) * 4),
    "phi3": dict(partial_rotary_factor=1.0),
    "phi3/window": dict(layer_windows=(0, 0)),
    "gemma2/activation": dict(activation="silu"),
    "gemma2/norm_unit_offset": dict(norm_unit_offset=False),
    "gemma2/sandwich_norms": dict(sandwich_norms=False),
    "gemma2/scale_embeddings": dict(scale_embeddings=False),
    "gemma2/query_pre_attn_scalar": dict(query_pre_attn_scalar=None),
    "gemma2/attn_logit_softcapping": dict(attn_logit_softcapping=None),
    "gemma2/final_logit_softcapping": dict(final_logit_softcapping=None),
    "gemma2/window": dict(layer_windows=(0, 0)),
    "gemma3_text/qk_norm": dict(qk_norm=False),
    "gemma3_text/local_rope": dict(local_rope_theta=None),
    "gemma3_text/linear_rope": dict(rope_scaling=None),
    "gemma3_text/window": dict(layer_windows=(0, 0)),
    "olmo3/window": dict(layer_windows=(0, 0)),
    "olmo3/local_rope": dict(local_rope_theta=40000.0),  # the full layers' base
    "olmo3/yarn": dict(rope_scaling=None),
    # LongRoPE (48 tokens, past the switch at 32): the long factors ignored, the
    # attention factor ignored.
    "phi4_mini/longrope_switch": lambda cfg: dict(rope_scaling=dataclasses.replace(
        cfg.rope_scaling, long_factor=cfg.rope_scaling.short_factor)),
    "gpt_oss/sinks": dict(attention_sinks=False),
    "gpt_oss/swiglu_clamp": lambda cfg: dict(moe=dataclasses.replace(cfg.moe,
                                                                     swiglu_limit=1e9)),
    "gpt_oss/gate_up_deinterleaved": {},
    "qwen3_yarn": dict(rope_scaling=None),
    "qwen3_yarn/ramp": lambda cfg: dict(rope_scaling=dataclasses.replace(
        cfg.rope_scaling, beta_fast=32.0, beta_slow=1.0)),
    "qwen3_yarn/attention_factor": lambda cfg: dict(rope_scaling=dataclasses.replace(
        cfg.rope_scaling, attention_factor=1.0)),
    "phi4_mini/attention_factor": lambda cfg: dict(rope_scaling=dataclasses.replace(
        cfg.rope_scaling, attention_factor=1.0)),
    "olmo2/post_norms": dict(post_norms=False),
    "olmo2/qk_norm_all_heads": dict(qk_norm_all_heads=False),
    # Mixtures of experts: the top-k renormalisation flipped, the shared expert dropped or
    # its sigmoid gate held at 1/2, two experts' weights swapped, a per-head q/k norm.
    "mixtral/normalize_top_k": lambda cfg: dict(moe=dataclasses.replace(
        cfg.moe, normalize_top_k=False)),
    "mixtral/experts_swapped": {},
    "qwen2_moe/normalize_top_k": lambda cfg: dict(moe=dataclasses.replace(
        cfg.moe, normalize_top_k=True)),
    "qwen2_moe/shared_expert": lambda cfg: dict(moe=dataclasses.replace(
        cfg.moe, shared_expert_size=0)),
    "qwen2_moe/shared_expert_gate": {},
    "qwen3_moe/normalize_top_k": lambda cfg: dict(moe=dataclasses.replace(
        cfg.moe, normalize_top_k=False)),
    "olmoe/qk_norm_all_heads": dict(qk_norm_all_heads=False),
    # Qwen3.5: the attention output gate dropped (q_proj cut to its queries), every head
    # rotated, Llama's norms for the (1 + w) ones; the MoE's shared expert dropped.
    "qwen3_5/output_gate": dict(attention_output_gate=False),
    "qwen3_5/partial_rotary": dict(partial_rotary_factor=1.0),
    "qwen3_5/norm_unit_offset": dict(norm_unit_offset=False),
    "qwen3_5_moe/shared_expert": lambda cfg: dict(moe=dataclasses.replace(
        cfg.moe, shared_expert_size=0)),
    # Gemma 4: the shared layers reusing the first layers' keys and values instead of the
    # last ones of their type, PLE dropped, default RoPE for the proportional one, the
    # values' norm and the layer scalars dropped.
    "gemma4_text/kv_sharing": dict(kv_sources=(-1, -1, -1, -1, 0, 1)),
    "gemma4_text/per_layer_embeddings": dict(per_layer_input_size=0),
    "gemma4_text/proportional_rope": dict(rope_scaling=None),
    "gemma4_text/v_norm": dict(v_norm=False),
    "gemma4_text/layer_scalar": dict(layer_scalar=False),
}


def _pre_norm_params(params):
    """OLMo 2's two norms as a pre-norm layer's (the same scales, applied before)."""
    layers = dict(params["layers"])
    layers["input_layernorm"] = layers["post_attention_layernorm"]
    layers["post_attention_layernorm"] = layers.pop("post_feedforward_layernorm")
    return {**params, "layers": layers}


def _per_head_norm_params(params):
    """OLMo 2's all-heads q/k norm scales cut to one head's width: a per-head norm."""
    attention = dict(params["layers"]["self_attn"])
    for name in ("q_norm", "k_norm"):
        scale = attention[name]["scale"]
        attention[name] = {"scale": scale[:, :16]}  # [layers, head_dim]
    return {**params, "layers": {**params["layers"], "self_attn": attention}}


def _experts_swapped(params):
    """Experts 0 and 1 trade weights in every layer: the router still picks by index."""
    experts = {name: w.at[:, [0, 1]].set(w[:, [1, 0]])
               for name, w in params["layers"]["mlp"]["experts"].items()}
    mlp = {**params["layers"]["mlp"], "experts": experts}
    return {**params, "layers": {**params["layers"], "mlp": mlp}}


def _shared_gate_zeroed(params):
    """The shared expert's gate kernel zeroed: sigmoid(0) = 1/2 for every token."""
    out = dict(params)
    for name, layer in params.items():
        if isinstance(layer, dict) and "shared_expert_gate" in layer.get("mlp", {}):
            gate = {"kernel": 0 * layer["mlp"]["shared_expert_gate"]["kernel"]}
            out[name] = {**layer, "mlp": {**layer["mlp"], "shared_expert_gate": gate}}
    return out


def _without_sinks(params):
    attention = {k: v for k, v in params["layers"]["self_attn"].items() if k != "sinks"}
    return {**params, "layers": {**params["layers"], "self_attn": attention}}


def _gate_up_halves(params):
    """gpt-oss's fused gate_up columns read as two halves instead of alternating."""
    experts = dict(params["layers"]["mlp"]["experts"])
    for kind in ("proj", "bias"):
        gate, up = experts[f"gate_{kind}"], experts[f"up_{kind}"]
        fused = np.stack([gate, up], axis=-1).reshape(*gate.shape[:-1], -1)
        half = fused.shape[-1] // 2
        experts[f"gate_{kind}"], experts[f"up_{kind}"] = fused[..., :half], fused[..., half:]
    mlp = {**params["layers"]["mlp"], "experts": experts}
    return {**params, "layers": {**params["layers"], "mlp": mlp}}


def _queries_only(params):
    """Qwen3.5's q_proj without its gate half: each head's first head_dim columns (in
    every layer subtree, scanned in groups or not)."""
    if not isinstance(params, dict):
        return params
    if "q_proj" in params:
        kernel = params["q_proj"]["kernel"]  # [..., D, N, 2H]
        return {**params, "q_proj": {"kernel": kernel[..., :kernel.shape[-1] // 2]}}
    return {name: _queries_only(value) for name, value in params.items()}


# Controls that change the parameter tree the crippled layers expect, or the parameters.
CONTROL_PARAMS = {"olmo2/post_norms": _pre_norm_params,
                  "olmo2/qk_norm_all_heads": _per_head_norm_params,
                  "olmoe/qk_norm_all_heads": _per_head_norm_params,
                  "mixtral/experts_swapped": _experts_swapped,
                  "qwen2_moe/shared_expert_gate": _shared_gate_zeroed,
                  "gpt_oss/sinks": _without_sinks,
                  "gpt_oss/gate_up_deinterleaved": _gate_up_halves,
                  "qwen3_5/output_gate": _queries_only}


@pytest.mark.parametrize("control", list(NEGATIVE_CONTROLS))
def test_feature_switched_off_breaks_parity(checkpoints, control):
    family = control.split("/")[0]
    hf_model, folder = checkpoints[family]
    cfg, params = models.load_hf(folder)
    changes = NEGATIVE_CONTROLS[control]
    changes = changes(cfg) if callable(changes) else changes
    assert all(getattr(cfg, k) != v for k, v in changes.items()), \
        "the HF config did not turn the feature on"
    crippled = dataclasses.replace(cfg, **changes)
    params = CONTROL_PARAMS.get(control, lambda p: p)(params)
    tokens = _tokens()
    diff = np.abs(np.asarray(models.apply(crippled, params, tokens))
                  - hf_reference.logits(hf_model, tokens)).max()
    print(f"{control}: max diff {diff:.2e}")
    assert diff > 100 * TOLERANCE


def _packed_row(lengths, pad_after, rng, pad_token):
    """Segments of `lengths` back to back; `pad_after[i]` padding tokens after segment i."""
    tokens, positions, segments, spans = [], [], [], []
    for seg, (n, pad) in enumerate(zip(lengths, pad_after), start=1):
        spans.append((len(tokens), len(tokens) + n))
        tokens += list(rng.randint(0, 160, n))
        positions += list(range(n))
        segments += [seg] * n
        tokens += [pad_token] * pad
        positions += [0] * pad
        segments += [0] * pad
    as_row = lambda x: np.asarray([x], np.int32)
    return as_row(tokens), as_row(positions), as_row(segments), spans


@pytest.mark.parametrize("family", list(hf_reference.FAMILIES))
def test_packed_row_matches_each_example_alone(checkpoints, family):
    hf_model, folder = checkpoints[family]
    cfg, params = models.load_hf(folder)
    rng = np.random.RandomState(2)
    tokens, positions, segments, spans = _packed_row([21, 14, 9], [0, 3, 2], rng, pad_token=7)
    packed = np.asarray(models.apply(cfg, params, tokens, positions, segments))
    for start, end in spans:
        alone = hf_reference.logits(hf_model, tokens[:, start:end])
        assert np.abs(packed[:, start:end] - alone).max() <= TOLERANCE


def test_longrope_switches_per_example_in_a_packed_row(checkpoints):
    """coach_jax's LongRoPE rule: an example longer than original_max_position_embeddings
    (32 here) rotates with the long factors, a shorter one packed beside it with the short
    ones; each gets what transformers computes for it alone."""
    hf_model, folder = checkpoints["phi4_mini"]
    cfg, params = models.load_hf(folder)
    assert cfg.rope_switch_length == 32
    tokens, positions, segments, spans = _packed_row([40, 14, 32, 33], [2, 0, 1, 0],
                                                     np.random.RandomState(8), pad_token=5)
    packed = np.asarray(models.apply(cfg, params, tokens, positions, segments))
    for start, end in spans:
        alone = hf_reference.logits(hf_model, tokens[:, start:end])
        assert np.abs(packed[:, start:end] - alone).max() <= TOLERANCE, (start, end)


def test_example_lengths_follow_segments_and_restarting_positions():
    from coach_jax.models import rope
    segments = np.asarray([[1, 1, 1, 2, 2, 0, 0, 3], [4, 4, 4, 4, 4, 4, 0, 0]], np.int32)
    positions = np.asarray([[0, 1, 2, 0, 1, 0, 0, 0], [0, 1, 2, 0, 1, 2, 5, 6]], np.int32)
    np.testing.assert_array_equal(rope.example_lengths(positions, segments),
                                  [[3, 3, 3, 2, 2, 1, 1, 1], [3, 3, 3, 3, 3, 3, 7, 7]])


@pytest.mark.parametrize("family", ["llama3", "mistral"])
def test_padding_tokens_do_not_change_real_logits(checkpoints, family):
    _, folder = checkpoints[family]
    cfg, params = models.load_hf(folder)
    tokens, positions, segments, _ = _packed_row([17, 12], [5, 4], np.random.RandomState(3),
                                                 pad_token=0)
    real = segments > 0
    other_padding = np.where(real, tokens, np.random.RandomState(4).randint(0, 160, tokens.shape))
    other_positions = np.where(real, positions, 3)
    a = np.asarray(models.apply(cfg, params, tokens, positions, segments))
    b = np.asarray(models.apply(cfg, params, other_padding.astype(np.int32),
                                other_positions.astype(np.int32), segments))
    assert not np.array_equal(tokens, other_padding)
    np.testing.assert_array_equal(a[real], b[real])


def test_hidden_states_feed_the_lm_head(checkpoints):
    _, folder = checkpoints["qwen2"]  # tied embeddings
    cfg, params = models.load_hf(folder)
    tokens = _tokens(batch=1, length=12)
    hidden = models.hidden_states(cfg, params, tokens)
    assert hidden.shape == (1, 12, cfg.hidden_size)
    np.testing.assert_allclose(models.logits_from_hidden(cfg, params, hidden),
                               models.apply(cfg, params, tokens), atol=1e-6)


def test_bf16_compute_tracks_fp32(checkpoints):
    hf_model, folder = checkpoints["qwen3"]
    cfg, params = models.load_hf(folder, compute_dtype="bfloat16")
    assert cfg.param_dtype == "float32"
    tokens = _tokens()
    logits = models.apply(cfg, params, tokens)
    assert logits.dtype == np.dtype("bfloat16")
    reference = hf_reference.logits(hf_model, tokens)
    diff = np.abs(np.asarray(logits, np.float32) - reference)
    # bf16 has 8 mantissa bits: close, but not fp32-exact.
    assert diff.max() < 0.1 * np.abs(reference).max()
    assert diff.max() > TOLERANCE


@pytest.mark.parametrize("family", ["llama3", "mistral"])
def test_query_blocks_match_hf(checkpoints, family):
    """T = 128 runs attention in 64-query blocks (see attention.dot_product_attention)."""
    hf_model, folder = checkpoints[family]
    cfg, params = models.load_hf(folder)
    rng = np.random.RandomState(6)
    tokens, positions, segments, spans = _packed_row([50, 30, 40], [0, 5, 3], rng, pad_token=1)
    assert tokens.shape[1] == 128
    packed = np.asarray(models.apply(cfg, params, tokens, positions, segments))
    for start, end in spans:
        alone = hf_reference.logits(hf_model, tokens[:, start:end])
        assert np.abs(packed[:, start:end] - alone).max() <= TOLERANCE
    unpacked = _tokens(batch=1, length=128, seed=7)
    assert np.abs(np.asarray(models.apply(cfg, params, unpacked))
                  - hf_reference.logits(hf_model, unpacked)).max() <= TOLERANCE


@pytest.mark.parametrize("family", ["olmo2", "smollm3_window", "gemma3_text", "mixtral",
                                    "qwen2_moe"])
def test_a_data_fsdp_tensor_mesh_gives_one_devices_logits(checkpoints, family):
    """Parameters sharded over a (2, 2, 2) mesh as in training: OLMo 2's norm over all heads
    spans the tensor-split heads, SmolLM3's per-layer RoPE flags ride the scan, experts'
    weights split over FSDP and tensor axes feed the grouped matmuls."""
    _, folder = checkpoints[family]
    cfg, params = models.load_hf(folder)
    tokens = _tokens(batch=4)
    expected = np.asarray(models.apply(cfg, params, tokens))
    mesh = parallel.make_mesh((2, 2, 2))
    sharded = parallel.place(params, parallel.tree_shardings(params, cfg, mesh))
    layer = sharded["layers" if cfg.scan_layers else "layers_0"]
    assert "tensor" in layer["self_attn"]["q_proj"]["kernel"].sharding.spec
    got = np.asarray(models.apply(cfg, sharded, tokens))
    np.testing.assert_allclose(got, expected, atol=5e-5)  # reduction order; parity is 1e-4
