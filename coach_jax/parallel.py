"""The device mesh and where arrays live on it.

One device is a mesh too: the loop always runs on a (data, fsdp, tensor) mesh, so the same
code serves a laptop and a pod. Batches are sharded over (data, fsdp); parameters are
replicated here, and sharded by logical-axis rules once FSDP and tensor parallelism land.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

AXES = ("data", "fsdp", "tensor")


def make_mesh(shape: tuple[int, int, int]) -> jax.sharding.Mesh:
    """A mesh over all devices with Auto axes (XLA places the collectives)."""
    return jax.make_mesh(shape, AXES, axis_types=(jax.sharding.AxisType.Auto,) * len(AXES))


def batch_sharding(mesh: jax.sharding.Mesh) -> NamedSharding:
    """Rows of a batch split over the data-parallel axes."""
    return NamedSharding(mesh, P(("data", "fsdp")))


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def global_batch(local: dict[str, np.ndarray], sharding: NamedSharding) -> dict[str, jax.Array]:
    """This process's rows as one global array per key (each process feeds its share)."""
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local.items()}


def place(tree: Any, sharding: NamedSharding) -> Any:
    return jax.tree.map(lambda x: jax.device_put(x, sharding), tree)
