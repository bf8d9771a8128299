"""The memory check from shapes alone: what a run will need per device, read from the
model's config.json without loading a weight (`--mode=memory`), so a run that does not fit
is found before anything is downloaded to the machine or compiled.

It follows the Trainer's own estimate (coach_jax.memory): the base, adapter, gradients and
optimizer state from their shapes and shardings (a QLoRA base from the shapes of its
quantized codes and scales), activations by the remat policy.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax

from coach_jax import adapters, memory, parallel, train
from coach_jax.config import Settings
from coach_jax.models.builder import model_config_of
from coach_jax.models.config import ModelConfig
from coach_jax.models.decoder import param_shapes, path_str, select
from coach_jax.models.lora import LoraSpec, is_adapter_path
from coach_jax.models.vocab import fitted_sizes


def model_config(settings: Settings, tokenizer_size: int, tensor_ways: int) -> ModelConfig:
    """The run's ModelConfig, its vocabulary grown and padded as models.builder does."""
    cfg = model_config_of(settings.model, tokenizer_size)
    real, padded = fitted_sizes(cfg, tokenizer_size,
                                math.lcm(settings.model.vocab_multiple, tensor_ways))
    return dataclasses.replace(cfg, vocab_size=padded,
                               real_vocab_size=real if real < padded else None)


def estimate(settings: Settings, tokenizer_size: int, mesh: jax.sharding.Mesh
             ) -> memory.MemoryEstimate:
    s, a = settings, settings.adapter
    cfg = model_config(s, tokenizer_size, mesh.shape["tensor"])
    table = parallel.param_shardings(cfg, mesh)
    shapes = param_shapes(cfg)
    base = None
    if a.enabled:
        modules, layers = adapters.resolve(cfg, a.targets, a.layers or None)
        lora_cfg = dataclasses.replace(cfg, projection="lora", lora=LoraSpec(
            a.rank, a.alpha, modules, a.use_rslora, a.dropout, layers))
        base = jax.tree_util.tree_map_with_path(
            lambda p, x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=table[path_str(p)]),
            shapes)
        if a.quantize_base != "none":
            from coach_jax.models import quantize
            base = jax.eval_shape(functools.partial(
                quantize.quantize_base, qtype=a.quantize_base, block=a.quantize_block), base)
            base = _sharded_like_kernels(base, table)
        cfg, shapes = lora_cfg, select(param_shapes(lora_cfg), is_adapter_path)
    _, parts = train.prepare(cfg, shapes, s.optimizer, s.train.groups, max(s.train.steps, 1),
                             loss=s.train.loss, micro_batches=s.train.micro_batches)
    create = functools.partial(train.create_state, parts=parts, seed=s.train.seed)
    abstract_state, shardings = parallel.state_shardings(create, shapes, cfg, mesh)
    trainable, _ = train.param_groups.split(abstract_state.params, parts.label_tree)
    rows = s.train.global_batch_size // (
        s.train.micro_batches * parallel.data_shards(mesh))
    return memory.estimate(abstract_state, shardings, trainable, cfg, max(rows, 1),
                           s.data.max_seq_len, s.train.loss.chunk_tokens, base,
                           quantized=a.enabled and a.quantize_base != "none")


def _sharded_like_kernels(base, table):
    """A quantized kernel's codes (and scales) count the kernel's share per device."""
    def leaf(key_path, x):
        path = path_str(key_path).split("/")
        kernel = "/".join(p for p in path if p not in ("qvalue", "scale", "zero_point"))
        sharding = table.get(kernel)
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding) if sharding else x
    return jax.tree_util.tree_map_with_path(leaf, base)
