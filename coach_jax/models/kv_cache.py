"""The key/value cache for autoregressive decoding.

Every slot of the cache carries the position and segment id of the token whose keys it
holds, so the attention mask is built exactly as in training (attention.attention_mask):
empty slots and left padding have segment 0 and are never seen by a real token, and a
sliding window keeps working from positions alone.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

from coach_jax.models.config import ModelConfig


@flax.struct.dataclass
class KVCache:
    keys_LxBxSxKxH: jax.Array
    values_LxBxSxKxH: jax.Array
    positions_BxS: jax.Array
    segment_ids_BxS: jax.Array  # 0 = empty slot or padding
    index: jax.Array  # int32 scalar: the next slot to write, the same for every row

    def written(self, positions_BxT: jax.Array, segment_ids_BxT: jax.Array) -> "KVCache":
        """The slot bookkeeping after writing T new tokens at `index` (keys come per layer)."""
        start = (0, self.index)
        return self.replace(
            positions_BxS=jax.lax.dynamic_update_slice(
                self.positions_BxS, positions_BxT.astype(jnp.int32), start),
            segment_ids_BxS=jax.lax.dynamic_update_slice(
                self.segment_ids_BxS, segment_ids_BxT.astype(jnp.int32), start))


def init_cache(cfg: ModelConfig, batch: int, length: int) -> KVCache:
    """An empty cache of `length` slots per row, in the compute dtype."""
    shape = (cfg.num_layers, batch, length, cfg.num_kv_heads, cfg.head_dim)
    dtype = jnp.dtype(cfg.compute_dtype)
    return KVCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype),
                   jnp.zeros((batch, length), jnp.int32), jnp.zeros((batch, length), jnp.int32),
                   jnp.zeros((), jnp.int32))


def write(cache_LxBxSxKxH: jax.Array, new_BxTxKxH: jax.Array, layer: jax.Array | int,
          index: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Writes one layer's T new keys (or values) from slot `index`, in place: only the new
    tokens move, never the whole cache. Returns (cache, that layer's [B, S, K, H])."""
    cache_LxBxSxKxH = jax.lax.dynamic_update_slice(
        cache_LxBxSxKxH, new_BxTxKxH.astype(cache_LxBxSxKxH.dtype)[None],
        (layer, 0, index, 0, 0))
    return cache_LxBxSxKxH, cache_LxBxSxKxH[layer]
