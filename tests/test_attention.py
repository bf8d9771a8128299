"""Attention implementations against the XLA path: forward and gradients, packed rows,
grouped KV heads, sliding windows."""

import dataclasses

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
        out = attention.attend(impl, q, k, v, positions, segments, window, window,
                               scale=scale, softcap=softcap)
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


def test_auto_picks_by_backend():
    assert attention.choose("xla", "bfloat16") == "xla"
    expected = {"gpu": "cudnn", "tpu": "splash"}.get(jax.default_backend(), "xla")
    assert attention.choose("auto", "bfloat16") == expected
    assert attention.choose("auto", "float32") in ("xla", "splash")


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="cuDNN needs a GPU")
def test_cudnn_equals_xla_on_gpu():
    q, k, v, positions, segments = (x.astype(jnp.bfloat16) if x.dtype == jnp.float32 else x
                                    for x in packed_inputs())
    xla = attention.attend("xla", q, k, v, positions, segments, None)
    cudnn = attention.attend("cudnn", q, k, v, positions, segments, None)
    mask = np.asarray(segments > 0)
    np.testing.assert_allclose(np.asarray(cudnn, np.float32)[mask],
                               np.asarray(xla, np.float32)[mask], atol=2e-2)


def test_soft_capping_never_silently_drops_to_cudnn(monkeypatch):
    """cuDNN's fused kernel has no logit soft-cap: asked for by name it is an error; `auto`
    on a GPU picks it only without a cap."""
    with pytest.raises(ValueError, match="model.attention='cudnn' cannot soft-cap"):
        attention.choose("cudnn", "bfloat16", softcap=50.0)
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert attention.choose("auto", "bfloat16") == "cudnn"
    assert attention.choose("auto", "bfloat16", softcap=50.0) == "xla"


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
