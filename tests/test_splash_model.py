"""Splash attention (`model.attention="splash"`, Pallas interpret mode off TPU) inside the
whole model, against the XLA path, in float32.

tests/test_attention.py compares the kernels one attention call at a time; these tests
compare what training sees: logits and the gradient of a masked loss with respect to every
parameter, for packed rows whose segments are not multiples of 128 and are longer than the
sliding window, with a little padding. Mistral slides on every layer; Gemma 2 alternates
window and full layers with soft-capped scores, so under `scan_layers` its traced window
picks a splash kernel with `lax.switch` (unrolled, each layer has its own). A negative
control shows the comparison catches a wrong window. Off the kernel's lengths the model
must still run and equal XLA for every `model.attention` value, and one command-line
training run with splash must log the losses of the same run with XLA's attention.
"""

import dataclasses
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import hf_reference
from coach_jax import models

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LOGIT_ATOL = 1e-5  # observed: up to ~3e-6 on logits of magnitude ~4
GRAD_RTOL = 1e-5   # of each leaf's largest |gradient|; observed: up to ~1.5e-6
FAMILIES = ("llama3", "mistral", "gemma2")

# Segment cuts per row (positions restart at each cut; after the last cut: padding).
# No segment length is a multiple of 128, all are longer than the windows (8), and
# segment boundaries fall inside splash's blocks.
CUTS = {128: ([0, 37, 90, 128], [0, 50, 120]),
        256: ([0, 37, 130, 250], [0, 90, 256]),
        384: ([0, 37, 130, 250, 380], [0, 90, 300, 384])}  # 3 blocks of 128


def packed_batch(length, seed=0, vocab=160):
    """tokens, positions, segment ids, targets [2, length]: packed rows, padding id 0."""
    segments = np.zeros((2, length), np.int32)
    positions = np.zeros((2, length), np.int32)
    for row, cuts in enumerate(CUTS[length]):
        for s, (start, end) in enumerate(zip(cuts, cuts[1:]), start=1):
            segments[row, start:end] = s
            positions[row, start:end] = np.arange(end - start)
    assert (segments == 0).any() and (segments > 0).all(axis=1).any()
    rng = np.random.default_rng(seed)
    tokens, targets = (rng.integers(0, vocab, (2, length)).astype(np.int32) for _ in range(2))
    return tokens, positions, segments, targets


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """family -> a saved randomly weighted HF checkpoint (hf_reference)."""
    out = {}
    for family in FAMILIES:
        folder = tmp_path_factory.mktemp(family)
        hf_reference.build(family).save_pretrained(folder)
        out[family] = str(folder)
    return out


def logits_and_grads(cfg, params, tokens, positions, segments, targets):
    """Logits, and the gradient of the summed log-likelihood of the targets at real
    (segment > 0) positions with respect to every parameter."""
    def loss(p):
        logits = models.apply(cfg, p, tokens, positions, segments)
        logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
        picked = jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
        return -(picked * (segments > 0)).sum(), logits

    (_, logits), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
    return np.asarray(logits), jax.device_get(grads)


def leaf_diffs(got, want):
    """path -> max |got - want| / max |want| per parameter leaf."""
    flat_got = dict(jax.tree_util.tree_flatten_with_path(got)[0])
    out = {}
    for path, w in jax.tree_util.tree_flatten_with_path(want)[0]:
        w = np.asarray(w)
        scale = max(float(np.abs(w).max()), 1e-30)
        out[jax.tree_util.keystr(path)] = float(np.abs(np.asarray(flat_got[path]) - w).max()
                                                / scale)
    return out


@pytest.mark.parametrize("family, scan_layers, length", [
    ("llama3", True, 128),
    # A window on every layer (one splash kernel), at 384: three blocks of 128, so
    # windows and segments cross block boundaries (128 and 256 run in one block).
    ("mistral", True, 384),
    ("gemma2", True, 256),    # window / full layers, traced window: lax.switch
    ("gemma2", False, 128),   # the same model unrolled: a static window per layer
])
def test_splash_model_logits_and_grads_equal_xla(folders, family, scan_layers, length):
    cfg, params = models.load_hf(folders[family], scan_layers=scan_layers)
    assert cfg.scan_layers == scan_layers and cfg.param_dtype == "float32"
    if family != "llama3":
        assert any(cfg.layer_windows) and max(cfg.layer_windows) < 37  # shortest segment
    if family == "gemma2":
        assert 0 in cfg.layer_windows and cfg.attn_logit_softcapping == 1.0
    tokens, positions, segments, targets = packed_batch(length)
    xla_logits, xla_grads = logits_and_grads(dataclasses.replace(cfg, attention="xla"),
                                             params, tokens, positions, segments, targets)
    splash_logits, splash_grads = logits_and_grads(
        dataclasses.replace(cfg, attention="splash"), params, tokens, positions, segments,
        targets)
    real = segments > 0
    logit_diff = np.abs(splash_logits[real] - xla_logits[real]).max()
    grad_diffs = leaf_diffs(splash_grads, xla_grads)
    worst = max(grad_diffs, key=grad_diffs.get)
    print(f"{family} scan={scan_layers} T={length}: max |logits diff| {logit_diff:.2e} "
          f"(|logits| up to {np.abs(xla_logits[real]).max():.2f}); max relative grad diff "
          f"{grad_diffs[worst]:.2e} ({worst}, {len(grad_diffs)} leaves)")
    # A different kernel ran (a fallback to XLA's attention would match bit for bit).
    assert not np.array_equal(splash_logits[real], xla_logits[real])
    assert logit_diff <= LOGIT_ATOL
    assert all(d <= GRAD_RTOL for d in grad_diffs.values()), grad_diffs


def test_splash_with_the_wrong_window_is_caught(folders):
    """The negative control: splash told a window of 16 instead of Mistral's 8 moves the
    logits far beyond the tolerance above."""
    cfg, params = models.load_hf(folders["mistral"])
    assert cfg.layer_windows == (8, 8)
    tokens, positions, segments, _ = packed_batch(256)
    xla = np.asarray(models.apply(dataclasses.replace(cfg, attention="xla"), params, tokens,
                                  positions, segments))
    wrong = dataclasses.replace(cfg, attention="splash", layer_windows=(16, 16))
    splash = np.asarray(models.apply(wrong, params, tokens, positions, segments))
    real = segments > 0
    diff = np.abs(splash[real] - xla[real]).max()
    print(f"splash with window 16 against XLA with 8: max |logits diff| {diff:.2e}")
    assert diff > 1000 * LOGIT_ATOL


TINY = models.ModelConfig(model_type="mistral", vocab_size=64, hidden_size=32,
                          intermediate_size=48, num_layers=2, num_heads=4, num_kv_heads=2,
                          head_dim=8, layer_windows=(24, 0), attention="xla")


def test_init_with_splash_gives_the_xla_params():
    """`init` traces a one-token input, which splash cannot take; the params do not
    depend on the kernel."""
    splash = models.init(dataclasses.replace(TINY, attention="splash"), 0)
    xla = models.init(TINY, 0)
    jax.tree_util.tree_map(np.testing.assert_array_equal, splash, xla)


@pytest.fixture(scope="module")
def tiny_params():
    return models.init(TINY, 0)


@pytest.mark.parametrize("length", [1, 7, 100, 128, 200])
def test_every_attention_value_runs_at_any_length(tiny_params, length):
    """Lengths splash cannot take (not multiples of 128) fall back to XLA's attention;
    128 runs splash (interpreted) with the window switched per scanned layer."""
    tokens = np.random.default_rng(length).integers(0, 64, (2, length)).astype(np.int32)
    xla = np.asarray(models.apply(TINY, tiny_params, tokens))
    for implementation in ("auto", "splash"):
        got = np.asarray(models.apply(dataclasses.replace(TINY, attention=implementation),
                                      tiny_params, tokens))
        assert got.shape == (2, length, 64)
        np.testing.assert_allclose(got, xla, atol=LOGIT_ATOL, err_msg=implementation)


def training_losses(workdir):
    """step -> (loss, supervised tokens) from a run's metrics.jsonl."""
    rows = [json.loads(line) for line in open(workdir / "metrics.jsonl")]
    return {r["step"]: (r["loss"], r["supervised_tokens"]) for r in rows if "loss" in r}


def test_a_splash_training_run_logs_the_xla_runs_losses(short_default_run, tmp_path):
    """The README's run (conftest's 3 steps, attention auto: XLA's on CPU) again with
    --config.model.attention=splash: the same batches and losses, through the command
    line (on conftest's 8 virtual devices, so splash runs per shard)."""
    xla_workdir, overrides, xla_result = short_default_run
    assert xla_result.returncode == 0, xla_result.stderr
    assert json.load(open(xla_workdir / "config.json"))["model"]["attention"] in ("auto", "xla")
    overrides = [o for o in overrides if not o.startswith("--config.data.cache_dir=")]
    workdir = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "-m", "coach_jax.main", "--config", "configs/default.py",
         "--workdir", str(workdir), *overrides, f"--config.data.cache_dir={tmp_path / 'cache'}",
         "--config.model.attention=splash", "--verbosity=0"],  # -v 0: the kernel's log line
        cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert "attention: splash" in result.stderr
    assert json.load(open(workdir / "config.json"))["model"]["attention"] == "splash"
    splash, xla = training_losses(workdir), training_losses(xla_workdir)
    assert sorted(splash) == sorted(xla) == [1, 2, 3]
    for step in xla:
        print(f"step {step}: loss splash {splash[step][0]:.7f} xla {xla[step][0]:.7f}")
        assert splash[step][1] == xla[step][1]  # the same batch
        assert splash[step][0] == pytest.approx(xla[step][0], abs=1e-3)
