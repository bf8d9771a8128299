"""Gated DeltaNet (Qwen3.5's linear attention) against transformers' torch reference, and
its packing: neither the recurrent state nor the conv window crosses a segment boundary."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers.models.qwen3_5 import modeling_qwen3_5 as hf_qwen3_5

import hf_reference
from coach_jax import models
from coach_jax.models import gated_deltanet
from coach_jax.models.decoder import Decoder

TOLERANCE = 1e-4


def _rule_inputs(batch=2, length=150, key_heads=2, value_heads=4, key_dim=8, value_dim=6,
                 seed=0):
    rng = np.random.default_rng(seed)
    normal = lambda *shape: rng.normal(size=shape).astype(np.float32)
    q, k = normal(batch, length, key_heads, key_dim), normal(batch, length, key_heads, key_dim)
    v = normal(batch, length, value_heads, value_dim)
    g = -0.4 * np.abs(normal(batch, length, value_heads))
    beta = 1 / (1 + np.exp(-normal(batch, length, value_heads)))
    return q, k, v, g, beta


def _ours(q, k, v):
    """q, k as the layer hands them to the rule: L2-normalised, repeated to the value
    heads (key head i serves value heads i*group...), q scaled by key_dim ** -0.5."""
    group = v.shape[2] // q.shape[2]
    q = jnp.repeat(gated_deltanet.l2_normalize(q), group, axis=2) * q.shape[-1] ** -0.5
    return q, jnp.repeat(gated_deltanet.l2_normalize(k), group, axis=2)


def test_chunked_rule_equals_transformers_torch_chunk_rule():
    """150 tokens: two full chunks of 64 and a padded third; grouped value heads."""
    q, k, v, g, beta = _rule_inputs()
    expected, expected_state = hf_qwen3_5.torch_chunk_gated_delta_rule(
        *(torch.tensor(x) for x in (q, k, v)), g=torch.tensor(g), beta=torch.tensor(beta),
        output_final_state=True, use_qk_l2norm_in_kernel=True)
    out, state = gated_deltanet.chunked_delta_rule(*_ours(q, k, v), v, g, beta,
                                                   jnp.ones(g.shape[:2], jnp.int32))
    np.testing.assert_allclose(out, expected.numpy(), atol=1e-5)
    np.testing.assert_allclose(state, expected_state.numpy(), atol=1e-5)


def test_chunked_and_recurrent_agree_over_300_tokens_with_segments():
    q, k, v, g, beta = _rule_inputs(length=300, seed=1)
    segments = np.ones((2, 300), np.int32)
    segments[:, 37:], segments[:, 101:], segments[1, 250:] = 2, 3, 0
    args = (*_ours(q, k, v), v, g, beta, jnp.asarray(segments))
    chunked, chunked_state = gated_deltanet.chunked_delta_rule(*args)
    recurrent, recurrent_state = gated_deltanet.recurrent_delta_rule(*args)
    assert np.abs(chunked - recurrent).max() <= 1e-5
    assert np.abs(chunked_state - recurrent_state).max() <= 1e-5
    # Without segments the rule is the recurrence transformers decodes with.
    expected, _ = hf_qwen3_5.torch_recurrent_gated_delta_rule(
        *(torch.tensor(x) for x in (q, k, v)), g=torch.tensor(g), beta=torch.tensor(beta),
        use_qk_l2norm_in_kernel=True)
    alone, _ = gated_deltanet.recurrent_delta_rule(*args[:5], jnp.ones((2, 300), jnp.int32))
    np.testing.assert_allclose(alone, expected.numpy(), atol=1e-5)


def test_chunked_rule_continues_from_a_state():
    """The first 100 tokens' state carried into the next 90 gives the 190-token run."""
    q, k, v, g, beta = _rule_inputs(length=190, seed=2)
    q, k = _ours(q, k, v)
    ones = jnp.ones((2, 190), jnp.int32)
    whole, whole_state = gated_deltanet.chunked_delta_rule(q, k, v, g, beta, ones)
    _, state = gated_deltanet.chunked_delta_rule(q[:, :100], k[:, :100], v[:, :100],
                                                 g[:, :100], beta[:, :100], ones[:, :100])
    rest, rest_state = gated_deltanet.chunked_delta_rule(
        q[:, 100:], k[:, 100:], v[:, 100:], g[:, 100:], beta[:, 100:], ones[:, 100:], state,
        ones[:, 0])
    np.testing.assert_allclose(rest, whole[:, 100:], atol=1e-5)
    np.testing.assert_allclose(rest_state, whole_state, atol=1e-5)


def test_conv_equals_transformers_and_continues_from_its_history():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(2, 30, 12)).astype(np.float32)
    weight = rng.normal(size=(12, 4)).astype(np.float32)
    expected = hf_qwen3_5.causal_conv1d_fn(torch.tensor(x).transpose(1, 2),
                                           torch.tensor(weight), activation="silu")
    ones = jnp.ones((2, 30), jnp.int32)
    out, _ = gated_deltanet.causal_conv(jnp.asarray(x), jnp.asarray(weight), ones)
    np.testing.assert_allclose(out, expected.transpose(1, 2).numpy(), atol=1e-5)
    _, history = gated_deltanet.causal_conv(jnp.asarray(x[:, :17]), weight, ones[:, :17])
    rest, _ = gated_deltanet.causal_conv(jnp.asarray(x[:, 17:]), weight, ones[:, 17:],
                                         history, ones[:, :3])
    np.testing.assert_allclose(rest, out[:, 17:], atol=1e-6)


@pytest.fixture(scope="module")
def qwen3_5(tmp_path_factory):
    model = hf_reference.build("qwen3_5")
    folder = tmp_path_factory.mktemp("qwen3_5")
    model.save_pretrained(folder)
    return model, models.load_hf(folder)


def _packed():
    """Three examples of 70, 45 and 31 tokens (none a multiple of the chunk of 64, the
    first crossing it, the second crossing the next), padding after the second and third."""
    rng = np.random.RandomState(4)
    tokens, positions, segments, spans = [], [], [], []
    for seg, (n, pad) in enumerate([(70, 0), (45, 5), (31, 9)], start=1):
        spans.append((len(tokens), len(tokens) + n))
        tokens += list(rng.randint(0, 160, n)) + [7] * pad
        positions += list(range(n)) + [0] * pad
        segments += [seg] * n + [0] * pad
    row = lambda x: np.asarray([x], np.int32)
    return row(tokens), row(positions), row(segments), spans


def _packed_logits(cfg, params, tokens, positions, segments):
    """A fresh jit, so a patched gated_deltanet function is traced."""
    return np.asarray(jax.jit(lambda p, *a: Decoder(cfg).apply({"params": p}, *a))(
        params, tokens, positions, segments))


def _segments_ignored(function, position):
    """`function` called with every segment id set to 1 (argument `position`)."""
    def ignoring(*args):
        args = list(args)
        args[position] = jnp.ones_like(args[position])
        return function(*args)
    return ignoring


@pytest.mark.parametrize("crippled", [None, "state_not_reset", "conv_crosses_boundary"])
def test_packed_row_equals_each_example_alone(qwen3_5, monkeypatch, crippled):
    hf_model, (cfg, params) = qwen3_5
    if crippled == "state_not_reset":
        monkeypatch.setattr(gated_deltanet, "chunked_delta_rule", _segments_ignored(
            gated_deltanet.chunked_delta_rule, 5))
    elif crippled == "conv_crosses_boundary":
        monkeypatch.setattr(gated_deltanet, "causal_conv", _segments_ignored(
            gated_deltanet.causal_conv, 2))
    tokens, positions, segments, spans = _packed()
    packed = _packed_logits(cfg, params, tokens, positions, segments)
    worst = max(np.abs(packed[:, start:end]
                       - hf_reference.logits(hf_model, tokens[:, start:end])).max()
                for start, end in spans)
    print(f"{crippled}: max |packed - alone| = {worst:.2e}")
    assert worst <= TOLERANCE if crippled is None else worst > 100 * TOLERANCE


def test_layers_scanned_in_groups_map_to_their_checkpoint_layers(qwen3_5):
    """The group scan's layout (layer j of every group at layers/group_layer_j, stacked
    over the groups): each stacked row is the checkpoint's layer g * period + j, and a
    layer selection masks exactly those rows."""
    from coach_jax.models.decoder import layer_root
    from coach_jax.train import param_groups
    hf_model, (cfg, params) = qwen3_5
    assert cfg.scan_period == 2 and set(params["layers"]) == {"group_layer_0",
                                                              "group_layer_1"}
    assert [layer_root(cfg, i) for i in range(4)] == [
        ("layers/group_layer_0", 0), ("layers/group_layer_1", 0),
        ("layers/group_layer_0", 1), ("layers/group_layer_1", 1)]
    hf_out_proj = hf_model.model.layers[2].linear_attn.out_proj.weight.detach().numpy()
    ours = params["layers"]["group_layer_0"]["linear_attn"]["out_proj"]["kernel"][1]
    np.testing.assert_array_equal(np.asarray(ours).T, hf_out_proj)
    groups = param_groups.ParamGroups(trainable_layers=(1, 2))
    mask = param_groups.layer_update_mask(params, groups, cfg.num_layers)
    first = mask["layers"]["group_layer_0"]["input_layernorm"]["scale"]
    second = mask["layers"]["group_layer_1"]["input_layernorm"]["scale"]
    np.testing.assert_array_equal(np.asarray(first)[:, 0], [0, 1])  # layers 0, 2
    np.testing.assert_array_equal(np.asarray(second)[:, 0], [1, 0])  # layers 1, 3
