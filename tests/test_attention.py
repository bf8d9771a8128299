"""Attention implementations against the XLA path: forward and gradients, packed rows,
grouped KV heads, sliding windows."""

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from coach_jax import models
from coach_jax.models import attention

B, T, N, K, H = 2, 256, 4, 2, 16


def packed_inputs(seed=0):
    rng = np.random.default_rng(seed)
    q, k, v = (jnp.asarray(rng.normal(size=s), jnp.float32)
               for s in ((B, T, N, H), (B, T, K, H), (B, T, K, H)))
    segments = np.zeros((B, T), np.int32)
    positions = np.zeros((B, T), np.int32)
    for b, cuts in enumerate(([0, 100, 180, 250], [0, 40, 200, 256])):
        for s in range(3):
            segments[b, cuts[s]:cuts[s + 1]] = s + 1
            positions[b, cuts[s]:cuts[s + 1]] = np.arange(cuts[s + 1] - cuts[s])
    return q, k, v, positions, segments


@pytest.mark.parametrize("window, scale, softcap", [(None, None, None), (32, None, None),
                                                    (32, 0.2, 2.0)])  # Gemma's scale and cap
def test_splash_equals_xla_forward_and_backward(window, scale, softcap):
    q, k, v, positions, segments = packed_inputs()
    real = jnp.asarray(segments > 0)[..., None, None]
    weights = jax.random.normal(jax.random.key(1), (B, T, N, H))

    def loss(impl, q, k, v):
        out = attention.attend(impl, q, k, v, positions, segments, window,
                               windows=(window or 0,), scale=scale, softcap=softcap)
        return (out * weights * real).sum(), out

    (xla_loss, xla_out), xla_grads = jax.value_and_grad(
        lambda *a: loss("xla", *a), argnums=(0, 1, 2), has_aux=True)(q, k, v)
    (splash_loss, splash_out), splash_grads = jax.value_and_grad(
        lambda *a: loss("splash", *a), argnums=(0, 1, 2), has_aux=True)(q, k, v)
    mask = np.asarray(segments > 0)
    np.testing.assert_allclose(np.asarray(splash_out)[mask], np.asarray(xla_out)[mask],
                               atol=2e-6)
    for a, b in zip(splash_grads, xla_grads):
        np.testing.assert_allclose(np.asarray(a)[mask], np.asarray(b)[mask], atol=2e-5)


def test_the_model_gives_the_same_logits_with_splash():
    cfg = models.ModelConfig(model_type="mistral", vocab_size=64, hidden_size=32,
                             intermediate_size=48, num_layers=2, num_heads=4, num_kv_heads=2,
                             head_dim=8, layer_windows=(24, 24), attention="xla")
    params = models.init(cfg, 0)
    _, _, _, positions, segments = packed_inputs()
    tokens = np.random.default_rng(2).integers(0, 64, (B, T)).astype(np.int32)
    xla = models.apply(cfg, params, tokens, positions, segments)
    splash = models.apply(dataclasses.replace(cfg, attention="splash"), params, tokens,
                          positions, segments)
    mask = segments > 0
    np.testing.assert_allclose(np.asarray(splash)[mask], np.asarray(xla)[mask], atol=1e-5)


def shape(length=256, head_dim=64, dtype="bfloat16", softcap=None):
    return attention.AttentionShape(length, head_dim, dtype, softcap)


@pytest.fixture
def cudnn_installed(monkeypatch):
    """A cuDNN library, as on a GPU machine (this one has none)."""
    monkeypatch.setattr(attention, "cudnn_version", lambda: 90800)


def test_auto_picks_the_platforms_kernel(cudnn_installed):
    assert attention.choose("auto", "tpu", shape()) == attention.Choice("splash")
    assert attention.choose("auto", "cuda", shape()) == attention.Choice("cudnn")
    for platform in ("cpu", "rocm"):
        assert attention.choose("auto", platform, shape()) == attention.Choice("xla")
    assert attention.choose("xla", "tpu", shape()) == attention.Choice("xla")
    assert attention.choose("splash", "cpu", shape()) == attention.Choice("splash")


@pytest.mark.parametrize("platform, requested, kwargs, words", [
    ("tpu", "auto", dict(length=200), "multiple of 128 (length 200: data.max_seq_len)"),
    ("cpu", "splash", dict(length=1), "multiple of 128 (length 1:"),
    ("cuda", "auto", dict(dtype="float32"), "16-bit compute (model.dtype=float32)"),
    ("cuda", "auto", dict(head_dim=320), "at most 128 (head_dim=320)"),
    ("cuda", "auto", dict(head_dim=36), "multiple of 8"),
    ("cuda", "auto", dict(length=255), "even sequence length"),
    ("cuda", "auto", dict(softcap=50.0), "cannot soft-cap"),
])
def test_a_shape_a_kernel_cannot_take_goes_to_xla_with_the_reason(platform, requested,
                                                                  kwargs, words,
                                                                  cudnn_installed):
    choice = attention.choose(requested, platform, shape(**kwargs))
    assert choice.implementation == "xla" and words in choice.reason


@pytest.mark.parametrize("platform, kwargs, words", [
    ("cuda", dict(softcap=50.0), "model.attention='cudnn' cannot soft-cap"),
    ("cuda", dict(head_dim=512), "model.attention='cudnn' needs a head dim"),
    ("cuda", dict(dtype="float32"), "model.attention='cudnn' needs 16-bit compute"),
    ("cpu", dict(), "model.attention='cudnn' needs a CUDA GPU (this platform is cpu)"),
])
def test_an_explicit_cudnn_that_cannot_run_is_an_error(platform, kwargs, words,
                                                       cudnn_installed):
    with pytest.raises(ValueError, match=re.escape(words)):
        attention.choose("cudnn", platform, shape(**kwargs))


def test_without_the_cudnn_library_auto_takes_xla_and_cudnn_is_refused():
    if attention.cudnn_version() is not None:
        pytest.skip("this machine has cuDNN")
    choice = attention.choose("auto", "cuda", shape())
    assert choice == attention.Choice(
        "xla", "cuDNN attention needs the cuDNN library, which this machine does not have")
    with pytest.raises(ValueError, match="model.attention='cudnn' needs the cuDNN library"):
        attention.choose("cudnn", "cuda", shape())


def test_splash_blocks_tile_every_length_it_takes():
    assert [attention.splash_block(n) for n in (128, 256, 384, 768, 1024, 131072)] == \
        [128, 256, 128, 256, 512, 512]


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="cuDNN needs a GPU")
def test_cudnn_equals_xla_on_gpu():
    q, k, v, positions, segments = (x.astype(jnp.bfloat16) if x.dtype == jnp.float32 else x
                                    for x in packed_inputs())
    xla = attention.attend("xla", q, k, v, positions, segments, None)
    cudnn = attention.attend("cudnn", q, k, v, positions, segments, None)
    mask = np.asarray(segments > 0)
    np.testing.assert_allclose(np.asarray(cudnn, np.float32)[mask],
                               np.asarray(xla, np.float32)[mask], atol=2e-2)


def test_capped_attention_equals_a_hand_computation():
    """scores * scale -> cap * tanh(s / cap) -> causal mask -> softmax -> values, in numpy."""
    rng = np.random.default_rng(3)
    q, k, v = (rng.normal(size=(1, 6, 2, 4)).astype(np.float32) for _ in range(3))
    positions = np.arange(6, dtype=np.int32)[None]
    segments = np.ones((1, 6), np.int32)
    out = np.asarray(attention.attend("xla", q, k, v, positions, segments, None, scale=0.3,
                                      softcap=1.5))
    scores = np.einsum("thd,shd->hts", q[0], k[0]) * 0.3
    scores = 1.5 * np.tanh(scores / 1.5)
    scores = np.where(np.tril(np.ones((6, 6), bool)), scores, -np.inf)
    weights = np.exp(scores - scores.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    np.testing.assert_allclose(out[0], np.einsum("hts,shd->thd", weights, v[0]), atol=1e-6)


def test_attention_sinks_equal_gpt_oss_eager_attention():
    """gpt-oss's sink logit per head in the softmax, against transformers' own
    `eager_attention_forward` (4 heads on 2 KV heads, a causal mask): the training path and
    the KV-cache path agree with it; without the sinks the result moves."""
    import types
    import torch
    from transformers.models.gpt_oss import modeling_gpt_oss
    rng = np.random.default_rng(5)
    length, heads, kv_heads, dim = 7, 4, 2, 8
    q = rng.normal(size=(1, length, heads, dim)).astype(np.float32)
    k, v = (rng.normal(size=(1, length, kv_heads, dim)).astype(np.float32) for _ in range(2))
    sinks = np.asarray([0.5, -1.0, 2.0, 0.0], np.float32)
    causal = np.triu(np.full((length, length), -np.inf, np.float32), 1)[None, None]
    module = types.SimpleNamespace(sinks=torch.tensor(sinks), num_key_value_groups=2,
                                   training=False)
    as_heads = lambda x: torch.tensor(x).transpose(1, 2)
    expected, _ = modeling_gpt_oss.eager_attention_forward(
        module, as_heads(q), as_heads(k), as_heads(v), torch.tensor(causal), scaling=0.25)
    positions = np.arange(length, dtype=np.int32)[None]
    segments = np.ones((1, length), np.int32)
    got = attention.attend("xla", q, k, v, positions, segments, None, scale=0.25,
                           sinks_N=jnp.asarray(sinks))
    np.testing.assert_allclose(np.asarray(got), expected.numpy(), atol=1e-6)
    mask = attention.attention_mask(positions, positions, segments, segments, None)
    cached = attention.dot_product_attention(q, k, v, mask, scale=0.25, sinks_N=sinks)
    np.testing.assert_allclose(np.asarray(cached), expected.numpy(), atol=1e-6)
    plain = attention.attend("xla", q, k, v, positions, segments, None, scale=0.25)
    assert np.abs(np.asarray(plain) - expected.numpy()).max() > 0.05
    on_tpu = attention.choose("auto", "tpu", attention.AttentionShape(128, dim, "bfloat16",
                                                                     sinks=True))
    assert on_tpu == attention.Choice("xla", "splash attention has no attention sinks (gpt-oss)")
