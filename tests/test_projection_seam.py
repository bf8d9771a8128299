"""The projection seam: dense keeps today's parameters; a strategy registered here adds
per-projection and per-group parameters without touching attention, MLP or decoder."""

import dataclasses

import flax.linen as nn
import jax
import numpy as np
import pytest

import toy_family
from coach_jax import models
from coach_jax.models import projection

TOKENS = np.random.RandomState(0).randint(0, 64, (2, 10)).astype(np.int32)
DENSE_AXES = {  # today's parameters and their logical axes (scanned layers)
    "embed_tokens": ("vocab", "embed"),
    "layers/input_layernorm/scale": ("layers", "embed"),
    "layers/mlp/down_proj/kernel": ("layers", "mlp", "embed"),
    "layers/mlp/gate_proj/kernel": ("layers", "embed", "mlp"),
    "layers/mlp/up_proj/kernel": ("layers", "embed", "mlp"),
    "layers/post_attention_layernorm/scale": ("layers", "embed"),
    "layers/self_attn/k_proj/kernel": ("layers", "embed", "kv_heads", "head_dim"),
    "layers/self_attn/o_proj/kernel": ("layers", "heads", "head_dim", "embed"),
    "layers/self_attn/q_proj/kernel": ("layers", "embed", "heads", "head_dim"),
    "layers/self_attn/v_proj/kernel": ("layers", "embed", "kv_heads", "head_dim"),
    "lm_head": ("embed", "vocab"),
    "norm/scale": ("embed",),
}
PROJECTIONS = ("self_attn/q_proj", "self_attn/k_proj", "self_attn/v_proj", "self_attn/o_proj",
               "mlp/gate_proj", "mlp/up_proj", "mlp/down_proj")


class Shift(nn.Module):
    """A group's shared parameter: one shift of the input rows."""

    @nn.compact
    def __call__(self, rows_NxI):
        shift = self.param("shift", nn.with_logical_partitioning(nn.initializers.zeros,
                                                                 ("toy_in",)),
                           (rows_NxI.shape[-1],))
        return rows_NxI + shift


class ToyDelta(projection.Strategy):
    """y + (x + group shift) @ delta, delta zero-initialised (as LoRA's B is)."""

    def adapt(self, proj, rows_NxI, y_NxO):
        delta = proj.declare("delta", nn.initializers.zeros,
                             (rows_NxI.shape[-1], y_NxO.shape[-1]), ("toy_in", "toy_out"))
        shifted = rows_NxI if proj.shared is None else proj.shared(rows_NxI)
        return y_NxO + shifted @ delta.astype(y_NxO.dtype)

    def shared(self, cfg, group):
        return Shift(name=group)


@pytest.fixture(scope="module", autouse=True)
def registered():
    projection.register("toy_delta", ToyDelta())
    with toy_family.registered():
        yield
    del projection.STRATEGIES["toy_delta"]


def _cfg(**changes):
    cfg = models.ModelConfig(model_type="toyfused", vocab_size=64, hidden_size=32,
                             intermediate_size=48, num_layers=2, num_heads=4, num_kv_heads=2,
                             head_dim=8)
    return dataclasses.replace(cfg, **changes)


def _axes(cfg):
    specs = jax.tree_util.tree_flatten_with_path(models.logical_axes(cfg),
                                                 is_leaf=lambda x: isinstance(x, jax.P))[0]
    return {models.decoder.path_str(p): tuple(spec) for p, spec in specs}


def _flat(params):
    return {models.decoder.path_str(p): x
            for p, x in jax.tree_util.tree_flatten_with_path(params)[0]}


def _unflat(flat):
    tree = {}
    for path, x in flat.items():
        *parents, leaf = path.split("/")
        node = tree
        for name in parents:
            node = node.setdefault(name, {})
        node[leaf] = x
    return tree


@pytest.mark.parametrize("model_type", ["llama", "toyfused"])
def test_dense_keeps_todays_parameters(model_type):
    assert _axes(_cfg(model_type=model_type)) == DENSE_AXES


@pytest.mark.parametrize("scan_layers", [True, False])
def test_strategy_adds_parameters_and_equals_dense_while_they_are_zero(scan_layers):
    dense_cfg = _cfg(scan_layers=scan_layers)
    cfg = dataclasses.replace(dense_cfg, projection="toy_delta")
    flat = _flat(models.init(cfg, seed=1))
    dense_paths = set(_flat(models.param_shapes(dense_cfg)))
    layers = ["layers"] if scan_layers else ["layers_0", "layers_1"]
    assert set(flat) - dense_paths == (
        {f"{layer}/{proj}/delta" for layer in layers for proj in PROJECTIONS}
        | {f"{layer}/{group}/shift" for layer in layers
           for group in ("self_attn/qkv", "mlp/gate_up")})  # one shift per group
    if scan_layers:
        assert _axes(cfg)["layers/self_attn/qkv/shift"] == ("layers", "toy_in")

    dense = {path: x for path, x in flat.items() if path in dense_paths}
    expected = np.asarray(models.apply(dense_cfg, _unflat(dense), TOKENS))
    np.testing.assert_array_equal(np.asarray(models.apply(cfg, _unflat(flat), TOKENS)),
                                  expected)

    rng = np.random.RandomState(2)
    changed = {path: x + 0.05 * rng.standard_normal(x.shape).astype(x.dtype)
               if path.endswith(("/delta", "/shift")) else x for path, x in flat.items()}
    with_delta = np.asarray(models.apply(cfg, _unflat(changed), TOKENS))
    assert np.abs(with_delta - expected).max() > 1e-3
    unshifted = {path: np.zeros_like(x) if path.endswith("/shift") else x
                 for path, x in changed.items()}
    assert np.abs(np.asarray(models.apply(cfg, _unflat(unshifted), TOKENS))
                  - with_delta).max() > 1e-4  # the group's shift reaches its members


def test_unknown_strategy_is_named():
    with pytest.raises(models.UnsupportedModelError,
                       match=r"projection='bitnet'; expected one of dense, lora"):
        _cfg(projection="bitnet")
