"""Meshes, shardings, multi-host and the memory check, on 8 virtual CPU devices."""

import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P
from safetensors.numpy import load_file

import hf_reference
from coach_jax import models, parallel
from coach_jax.memory import DoesNotFitError
from coach_jax.train.loop import Trainer
from test_trainer import ROOT, tiny_config

pytestmark = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (virtual) devices")


def test_parameters_and_optimizer_state_get_the_shardings_asked_for(tmp_path):
    config = tiny_config(tmp_path, **{"mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2,
                                      "data.eval": ""})
    trainer = Trainer(config, str(tmp_path / "w"))
    params = trainer.state.params
    expected = {
        ("embed_tokens",): P("tensor", "fsdp"),
        ("layers", "self_attn", "q_proj", "kernel"): P(None, "fsdp", "tensor", None),
        ("layers", "self_attn", "k_proj", "kernel"): P(None, "fsdp", "tensor", None),
        ("layers", "self_attn", "o_proj", "kernel"): P(None, "tensor", None, "fsdp"),
        ("layers", "mlp", "down_proj", "kernel"): P(None, "tensor", "fsdp"),
        ("layers", "input_layernorm", "scale"): P(None, "fsdp"),
    }
    for path, spec in expected.items():
        leaf = params
        for key in path:
            leaf = leaf[key]
        assert leaf.sharding.spec == spec, path
        assert leaf.addressable_shards[0].data.size * parallel.shard_fraction(
            leaf.sharding) ** -1 == leaf.size
    adam = trainer.state.opt_state[1][0]  # clip, then adamw's scale_by_adam
    for moments in (adam.mu, adam.nu):
        assert moments["layers"]["self_attn"]["q_proj"]["kernel"].sharding.spec == P(
            None, "fsdp", "tensor", None)
        assert moments["embed_tokens"].sharding.spec == P("tensor", "fsdp")
    assert trainer.state.step.sharding.spec == P()


def _run(workdir, *overrides, devices=8, env_extra=None):
    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
           "JAX_PLATFORMS": "cpu", **(env_extra or {})}
    return subprocess.Popen(
        [sys.executable, "-m", "coach_jax.main", "--config", "configs/default.py",
         "--workdir", str(workdir), "--config.model.hf_path=", "--config.eval.reference=",
         "--config.model.init.hidden_size=32",
         "--config.model.init.intermediate_size=64", "--config.model.init.num_hidden_layers=2",
         "--config.model.init.head_dim=8", "--config.train.steps=3",
         "--config.train.log_every=1", "--config.train.global_batch_size=8",
         "--config.train.eval_every=0", "--config.data.eval=", "--config.schedule.warmup_steps=1",
         "--config.eval.generate_examples=0",
         "--config.checkpoint.every_steps=0", "--config.optimizer.learning_rate=1e-2",
         f"--config.data.cache_dir={workdir}/../cache", *overrides],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(process):
    out, err = process.communicate(timeout=600)
    assert process.returncode == 0, err[-3000:]
    return out


def _losses(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [r["loss"] for r in map(json.loads, f) if "loss" in r]


def _exported(workdir):
    return load_file(os.path.join(workdir, "export", "model.safetensors"))


def test_every_mesh_matches_one_device_through_the_cli(tmp_path):
    # All runs start at once (independent processes): their start-up and compilation overlap.
    meshes = [(8, 1, 1), (1, 8, 1), (2, 2, 2), (1, 4, 2)]
    one = _run(tmp_path / "one", "--config.mesh.data=1", devices=1)
    running = [_run(tmp_path / f"mesh{data}{fsdp}{tensor}", f"--config.mesh.data={data}",
                    f"--config.mesh.fsdp={fsdp}", f"--config.mesh.tensor={tensor}")
               for data, fsdp, tensor in meshes]
    _finish(one)
    reference_losses, reference_params = _losses(tmp_path / "one"), _exported(tmp_path / "one")
    assert len(reference_losses) == 3
    for (data, fsdp, tensor), process in zip(meshes, running):
        workdir = tmp_path / f"mesh{data}{fsdp}{tensor}"
        _finish(process)
        np.testing.assert_allclose(_losses(workdir), reference_losses, rtol=2e-5)
        params = _exported(workdir)
        assert params.keys() == reference_params.keys()
        for name, value in params.items():
            np.testing.assert_allclose(value, reference_params[name], rtol=1e-4, atol=1e-5,
                                       err_msg=f"{name} on mesh {(data, fsdp, tensor)}")


def _free_port():
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_two_processes_match_one_and_read_only_their_share(tmp_path):
    common = ("--config.data.packing=none",)  # same rows per step whatever the host split
    single_run = _run(tmp_path / "single", *common)  # alongside the two processes
    port = _free_port()
    processes = [
        _run(tmp_path / "multi", *common,
             f"--config.distributed.coordinator_address=localhost:{port}",
             "--config.distributed.num_processes=2", f"--config.distributed.process_id={i}",
             devices=4)
        for i in range(2)]
    for process in (single_run, *processes):
        _finish(process)
    np.testing.assert_allclose(_losses(tmp_path / "multi"), _losses(tmp_path / "single"),
                               rtol=2e-5)
    shares = [json.load(open(tmp_path / "multi" / f"data_process_{i}.json")) for i in range(2)]
    single = json.load(open(tmp_path / "single" / "data_process_0.json"))
    assert [s["examples"] for s in shares] == [single["examples"] // 2] * 2
    assert sum(s["tokens"] for s in shares) == single["tokens"]


def test_hf_weights_load_straight_into_fsdp_shards(tmp_path):
    hf_reference.build("llama3").save_pretrained(tmp_path)
    mesh = parallel.make_mesh((1, 8, 1))
    cfg = models.ModelConfig.from_hf_dir(tmp_path)
    _, params = models.load_hf(tmp_path, sharding=parallel.sharding_fn(cfg, mesh))
    sharded = 0
    for leaf in jax.tree.leaves(params):
        if "fsdp" in jax.tree.leaves(tuple(leaf.sharding.spec)):
            sharded += 1
            for shard in leaf.addressable_shards:
                assert shard.data.size * 8 == leaf.size  # no device holds the whole matrix
    assert sharded >= 8


def test_memory_check_refuses_what_cannot_fit_and_accepts_what_can(tmp_path):
    tight = tiny_config(tmp_path, **{"memory.device_bytes": 2**20, "data.eval": ""})
    with pytest.raises(DoesNotFitError, match=r"more than 90% of the 1.0 MiB a device has. "
                                               r"Try: .*model.remat=full"):
        Trainer(tight, str(tmp_path / "tight"))
    roomy = tiny_config(tmp_path, **{"memory.device_bytes": 2**30, "data.eval": ""})
    trainer = Trainer(roomy, str(tmp_path / "roomy"))
    assert 0 < trainer.memory.total < 2**30
    sharded = Trainer(tiny_config(tmp_path, **{"mesh.data": 1, "mesh.fsdp": 8,
                                               "data.eval": ""}), str(tmp_path / "fsdp"))
    assert sharded.memory.params == pytest.approx(trainer.memory.params / 8, rel=0.05)


def test_splash_runs_per_shard_and_matches_one_device():
    """Splash (interpreted) inside its shard_map on a (data 2, fsdp 2, tensor 2) mesh, rows
    and grouped heads split: the step's loss, gradient norm and new parameters equal one
    device's XLA-attention step (packed rows, fp32)."""
    import dataclasses
    from coach_jax import train
    cfg = models.ModelConfig(model_type="llama", vocab_size=64, hidden_size=32,
                             intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                             head_dim=8, attention="splash")
    params = models.init(cfg, 0)
    rng = np.random.default_rng(0)
    rows, length = 8, 128
    segments = np.ones((rows, length), np.int32)
    segments[:, 50:] = 2
    segments[::2, 100:] = 3
    positions = np.zeros_like(segments)
    for r in range(rows):
        for s in np.unique(segments[r]):
            positions[r, segments[r] == s] = np.arange((segments[r] == s).sum())
    tokens = rng.integers(0, 64, (rows, length + 1)).astype(np.int32)
    batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
             "loss_mask": (rng.random((rows, length)) < 0.5).astype(np.int32),
             "segment_ids": segments, "positions": positions,
             "source_ids": np.zeros((rows, length), np.int32)}
    optimizer = train.OptimizerConfig("sgd", 0.1, schedule=train.ScheduleConfig("constant"))

    def one_step(model_cfg, mesh):
        step_config, parts = train.prepare(model_cfg, params, optimizer, train.ParamGroups(), 10)
        state = train.create_state(params, parts)
        if mesh is None:
            return train.compile_train_step(step_config, parts)(state, batch)
        create = lambda p: train.create_state(p, parts)
        _, shardings = parallel.state_shardings(create, params, model_cfg, mesh)
        rows_sharding = parallel.batch_sharding(mesh)
        step = train.compile_train_step(step_config, parts, shardings, rows_sharding)
        return step(parallel.place(state, shardings), parallel.global_batch(batch, rows_sharding),
                    None)

    sharded_state, sharded = one_step(cfg, parallel.make_mesh((2, 2, 2)))
    state, single = one_step(dataclasses.replace(cfg, attention="xla"), None)
    for key in ("loss", "grad_norm"):
        np.testing.assert_allclose(float(sharded[key]), float(single[key]), rtol=1e-5)
    for a, b in zip(jax.tree.leaves(sharded_state.params), jax.tree.leaves(state.params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)
