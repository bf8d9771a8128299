"""The typed settings a run is built from, validated once and before any model is loaded,
and the train state's shardings derived from the parameters' logical axes."""

import dataclasses
import functools
import typing

import jax
import pytest
from jax.sharding import PartitionSpec as P

from coach_jax import config as config_module, models, parallel, train
from coach_jax.config import ConfigError, Settings, resolve
from coach_jax.train import loop, optimizers, param_groups
from test_trainer import tiny_config


def _annotations(cls, seen=None):
    """Every field type reachable from a settings dataclass, nested sections included."""
    seen = set() if seen is None else seen
    if cls in seen:
        return []
    seen.add(cls)
    found = []
    for name, hint in typing.get_type_hints(cls).items():
        found.append((f"{cls.__name__}.{name}", hint))
        for arg in (hint, *typing.get_args(hint)):
            if dataclasses.is_dataclass(arg):
                found += _annotations(arg, seen)
    return found


def test_settings_are_typed_through_and_through():
    fields = _annotations(Settings)
    assert len(fields) > 40
    assert [name for name, hint in fields if hint is typing.Any] == []


def test_resolve_gives_every_section(tmp_path):
    settings = resolve(tiny_config(tmp_path, **{"optimizer.name": "lion"}), 1)
    assert settings.optimizer.name == "lion"
    assert settings.train.loss.chunk_tokens == 256 == config_module.CHUNK_TOKENS
    assert settings.eval.chunk_tokens == settings.train.loss.chunk_tokens
    assert settings.data.max_seq_len == 256
    assert dict(settings.model.init)["hidden_size"] == 32
    assert settings.mesh_shape == (1, 1, 1, 1)


def test_optimizer_checked_once_and_before_the_model_is_built(tmp_path, monkeypatch):
    calls = []
    accepted = optimizers.accepted_hparams
    monkeypatch.setattr(optimizers, "accepted_hparams",
                        lambda factory: calls.append(factory) or accepted(factory))

    def no_model(*args, **kwargs):
        raise AssertionError("the model was built before the config was checked")
    monkeypatch.setattr(loop, "build_model", no_model)
    config = tiny_config(tmp_path, **{"optimizer.name": "schedule_free_adamw",
                                      "data.eval": ""})
    with pytest.raises(ConfigError, match=r"set schedule.name='constant'"):
        loop.Trainer(config, str(tmp_path / "w"))
    assert len(calls) == 1


@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (virtual) devices")
@pytest.mark.parametrize("name, groups", [
    ("adamw", param_groups.ParamGroups((("embed_tokens", "frozen"), ("mlp", 0.5)))),
    ("adafactor", param_groups.ParamGroups()),
    ("muon", param_groups.ParamGroups()),
])
def test_optimizer_state_shards_like_its_parameters(name, groups):
    cfg = models.ModelConfig(model_type="llama", vocab_size=64, hidden_size=32,
                             intermediate_size=48, num_layers=2, num_heads=4, num_kv_heads=2,
                             head_dim=8)
    mesh = parallel.make_mesh((2, 2, 2))
    params = models.init(cfg, 0, parallel.sharding_fn(cfg, mesh))
    optimizer = train.OptimizerConfig(name, 1e-3, schedule=train.ScheduleConfig("constant"))
    _, parts = train.prepare(cfg, params, optimizer, groups, 10)
    create = functools.partial(train.create_state, parts=parts)
    abstract, shardings = parallel.state_shardings(create, params, cfg, mesh)
    assert jax.tree.structure(abstract) == jax.tree.structure(jax.eval_shape(create, params))
    param_specs = {models.decoder.path_str(p): s.spec for p, s in
                   jax.tree_util.tree_flatten_with_path(parallel.tree_shardings(params, cfg,
                                                                                mesh))[0]}
    mirrored = 0
    for path, leaf in jax.tree_util.tree_flatten_with_path(abstract.opt_state)[0]:
        spec = jax.tree_util.tree_flatten_with_path(shardings.opt_state)[0]
        spec = dict((jax.tree_util.keystr(p), s.spec) for p, s in spec)[
            jax.tree_util.keystr(path)]
        names = [str(getattr(k, "key", "")) for k in path]
        param = "/".join(n for n in names if n)
        matches = [k for k in param_specs if param.endswith(k)]
        shape = jax.eval_shape(lambda: params)
        own = None
        if matches:
            own = functools.reduce(lambda t, k: t[k], max(matches, key=len).split("/"), shape)
        if own is not None and own.shape == leaf.shape:
            assert spec == param_specs[max(matches, key=len)], (name, param)
            mirrored += 1
        else:  # factored statistics, counts: replicated
            assert all(axis is None for axis in spec), (name, param, leaf.shape)
    assert mirrored >= 9
    state = jax.jit(create, out_shardings=shardings)(params)
    assert state.params["layers"]["mlp"]["up_proj"]["kernel"].sharding.spec == P(
        None, "fsdp", "tensor")


def test_mxfp4_needs_its_blocks_of_32(tmp_path):
    """The OCP MX format's block is 32 weights: another adapter.quantize_block is named."""
    config = tiny_config(tmp_path, **{"adapter.kind": "lora", "adapter.quantize_base": "mxfp4"})
    with pytest.raises(ConfigError, match="set adapter.quantize_block=32"):
        resolve(config, 1)
    config = tiny_config(tmp_path, **{"adapter.kind": "lora", "adapter.quantize_base": "mxfp4",
                                      "adapter.quantize_block": 32})
    assert resolve(config, 1).adapter.quantize_base == "mxfp4"
