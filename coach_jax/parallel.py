"""The device mesh, logical-axis rules, and where every array lives.

One device is a mesh too: the loop always runs on a (data, fsdp, expert, tensor) mesh, so
the same code serves a laptop, a GPU node and a TPU slice. Parameters carry logical axis
names (models/layers.py); RULES map them onto mesh axes: FSDP shards `embed` (so
parameters, gradients and optimizer state are split over data-parallel devices), expert
parallelism shards a mixture's experts (models/moe.py exchanges the tokens), tensor
parallelism shards heads, KV heads, MLP and vocabulary. A dimension that does not divide
its mesh axis stays whole (replicated) rather than failing. Batches are split over
(data, fsdp, expert): outside the experts the expert axis is one more data-parallel axis.
"""

from __future__ import annotations

import math
import os
from typing import Any, Callable

import flax.linen as nn
import jax
import numpy as np
from absl import logging
from jax.sharding import NamedSharding, PartitionSpec as P

from coach_jax.models.attention import BATCH_AXES
from coach_jax.models.config import ModelConfig
from coach_jax.models.decoder import Params, logical_axes, path_str

AXES = ("data", "fsdp", "expert", "tensor")
RULES: dict[str, Any] = {
    "vocab": "tensor", "embed": "fsdp", "heads": "tensor", "kv_heads": "tensor",
    "mlp": "tensor", "expert": "expert", "head_dim": None, "layers": None,
}


def make_mesh(shape: tuple[int, ...]) -> jax.sharding.Mesh:
    """A mesh over all devices with Auto axes (XLA places the collectives). `shape`:
    (data, fsdp, expert, tensor), or (data, fsdp, tensor) without expert parallelism."""
    if len(shape) == 3:
        shape = (shape[0], shape[1], 1, shape[2])
    return jax.make_mesh(tuple(shape), AXES,
                         axis_types=(jax.sharding.AxisType.Auto,) * len(AXES))


def batch_sharding(mesh: jax.sharding.Mesh) -> NamedSharding:
    """Rows of a batch split over the data-parallel axes."""
    return NamedSharding(mesh, P(BATCH_AXES))


def data_shards(mesh: jax.sharding.Mesh | None) -> int:
    """How many ways a batch's rows are split."""
    return 1 if mesh is None else math.prod(mesh.shape[a] for a in BATCH_AXES)


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def spec_for(logical: tuple[str | None, ...], shape: tuple[int, ...],
             mesh: jax.sharding.Mesh) -> P:
    """Mesh axes for one array's logical axes; dims that do not divide stay whole."""
    axes = []
    for name, size in zip(logical, shape):
        axis = RULES.get(name) if name else None
        if axis is not None and (mesh.shape[axis] == 1 or size % mesh.shape[axis]):
            axis = None
        axes.append(axis)
    return P(*axes)


def param_shardings(cfg: ModelConfig, mesh: jax.sharding.Mesh) -> dict[str, NamedSharding]:
    """Parameter path -> sharding, from the model's logical axes and RULES."""
    from coach_jax.models.decoder import param_shapes
    shapes = {path_str(p): x.shape for p, x in
              jax.tree_util.tree_flatten_with_path(param_shapes(cfg))[0]}
    specs = jax.tree_util.tree_flatten_with_path(
        logical_axes(cfg), is_leaf=lambda x: isinstance(x, P))[0]
    return {path_str(p): NamedSharding(mesh, spec_for(tuple(spec), shapes[path_str(p)], mesh))
            for p, spec in specs}


def sharding_fn(cfg: ModelConfig, mesh: jax.sharding.Mesh) -> Callable[[str], NamedSharding]:
    """For `models.init(..., sharding=)` and `models.load_hf(..., sharding=)`."""
    table = param_shardings(cfg, mesh)
    return lambda path: table[path]


def tree_shardings(params: Params, cfg: ModelConfig, mesh: jax.sharding.Mesh) -> Params:
    table = param_shardings(cfg, mesh)
    return jax.tree_util.tree_map_with_path(lambda p, _: table[path_str(p)], params)


def state_shardings(create: Callable[[Params], Any], params: Params, cfg: ModelConfig,
                    mesh: jax.sharding.Mesh) -> tuple[Any, Any]:
    """(abstract state, shardings) of `create(params)`, allocating nothing.

    The creation is traced (`jax.eval_shape`) on parameters boxed with their logical axes,
    so every leaf the optimizer makes from a parameter (Adam's moments, momentum,
    schedule-free's average) carries that parameter's axes and shards like it. A leaf of
    another rank (factored statistics) or without axes (step counts, the RNG) is
    replicated."""
    is_spec = lambda x: isinstance(x, P)
    specs = {path_str(p): spec for p, spec in jax.tree_util.tree_flatten_with_path(
        logical_axes(cfg), is_leaf=is_spec)[0]}
    # `params` may be part of the model's tree (an adapter's).
    boxed = jax.tree_util.tree_map_with_path(
        lambda p, x: nn.LogicallyPartitioned(jax.ShapeDtypeStruct(x.shape, x.dtype),
                                             tuple(specs[path_str(p)])), params)
    abstract = jax.eval_shape(create, boxed)
    is_box = lambda x: isinstance(x, nn.LogicallyPartitioned)

    def place(leaf: Any) -> Any:
        if not is_box(leaf):
            return replicated(mesh)
        if not hasattr(leaf.value, "ndim"):  # a placeholder (optax's MaskedNode)
            return jax.tree.map(lambda _: replicated(mesh), leaf.value)
        if len(leaf.names) != leaf.value.ndim:
            return replicated(mesh)
        return NamedSharding(mesh, spec_for(leaf.names, leaf.value.shape, mesh))

    return nn.unbox(abstract), jax.tree.map(place, abstract, is_leaf=is_box)


def traced_on_mesh(fn: Callable[..., Any], mesh: jax.sharding.Mesh | None) -> Callable[..., Any]:
    """`fn`, traced with `mesh` as the context mesh: a kernel XLA cannot partition (splash
    attention) reads it there to run per shard. Put inside `jax.jit`, so `.lower` and
    `jax.export` see the same trace as a call."""
    if mesh is None:
        return fn

    def on_mesh(*args: Any, **kwargs: Any) -> Any:
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
            return fn(*args, **kwargs)
    # Named as the function it wraps (a partial's), so profiles say "jit_train_step".
    on_mesh.__name__ = getattr(fn, "__name__", getattr(getattr(fn, "func", None), "__name__",
                                                       "on_mesh"))
    return on_mesh


def global_batch(local: dict[str, np.ndarray], sharding: NamedSharding) -> dict[str, jax.Array]:
    """This process's rows as one global array per key (each process feeds its share)."""
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local.items()}


def place(tree: Any, shardings: Any) -> Any:
    return jax.tree.map(jax.device_put, tree, shardings)


def shard_fraction(sharding: NamedSharding) -> float:
    """The share of an array one device holds under `sharding`."""
    spec = sharding.spec
    used = [a for entry in spec if entry is not None
            for a in (entry if isinstance(entry, tuple) else (entry,))]
    return 1.0 / math.prod(sharding.mesh.shape[a] for a in used) if used else 1.0


def initialize_distributed(coordinator_address: str, num_processes: int, process_id: int
                           ) -> None:
    """Joins JAX's multi-controller runtime before any device is used.

    "" : single process. "auto": let JAX find the cluster (TPU VMs, SLURM, ...). Otherwise
    "host:port" with num_processes and process_id (or the COACH_JAX_PROCESS_ID /
    SLURM_PROCID environment variables).
    """
    if not coordinator_address:
        return
    if coordinator_address == "auto":
        jax.distributed.initialize()
    else:
        if process_id < 0:
            process_id = int(os.environ.get("COACH_JAX_PROCESS_ID",
                                            os.environ.get("SLURM_PROCID", "-1")))
        if num_processes <= 0 or process_id < 0:
            raise ValueError("distributed.coordinator_address needs distributed.num_processes "
                             "and distributed.process_id (or COACH_JAX_PROCESS_ID)")
        jax.distributed.initialize(coordinator_address, num_processes, process_id)
    logging.info("process %d of %d, %d local / %d global devices", jax.process_index(),
                 jax.process_count(), jax.local_device_count(), jax.device_count())
