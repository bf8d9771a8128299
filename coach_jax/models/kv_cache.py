"""The decoding cache: attention layers' keys and values, DeltaNet layers' states.

Every slot of the cache carries the position and segment id of the token whose keys it
holds, so the attention mask is built exactly as in training (attention.attention_mask):
empty slots and left padding have segment 0 and are never seen by a real token, and a
sliding window keeps working from positions alone. Gated DeltaNet layers (Qwen3.5) keep
instead the last conv_kernel - 1 inputs of their conv1d and their recurrent state, which
start over where the segment id changes, as in training.
"""

from __future__ import annotations

from typing import NamedTuple

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from coach_jax.models.config import ModelConfig


class Slots(NamedTuple):
    """What every layer of one decoding call shares."""

    positions_BxS: jax.Array
    segment_ids_BxS: jax.Array
    index: jax.Array  # the first slot the new tokens are written to
    # The segment ids of the conv_kernel - 1 tokens before the new ones (0: none) and of
    # the one just before: which cached DeltaNet inputs and state the new tokens continue.
    history_segments_BxW: jax.Array | None = None
    last_segment_B: jax.Array | None = None


class LayerStates(NamedTuple):
    """The per-layer arrays, each stacked over the layers of its token mixer
    (ModelConfig.cache_slot); None where the model has no such layers."""

    keys: jax.Array | None  # [attention layers, B, S, K, H]
    values: jax.Array | None
    conv: jax.Array | None = None  # [DeltaNet layers, B, conv_kernel - 1, channels]
    recurrent: jax.Array | None = None  # [DeltaNet layers, B, heads, key dim, value dim]
    # Gemma 4's full layers, of their own geometry: [global layers, B, S, K', H']
    global_keys: jax.Array | None = None
    global_values: jax.Array | None = None


def attention_fields(mixer: str) -> tuple[str, str]:
    """The LayerStates fields of an attention mixer's keys and values."""
    return ("global_keys", "global_values") if mixer == "global_attention" else (
        "keys", "values")


@flax.struct.dataclass
class KVCache:
    keys_LxBxSxKxH: jax.Array | None
    values_LxBxSxKxH: jax.Array | None
    positions_BxS: jax.Array
    segment_ids_BxS: jax.Array  # 0 = empty slot or padding
    index: jax.Array  # int32 scalar: the next slot to write, the same for every row
    conv_LxBxWxC: jax.Array | None = None
    recurrent_LxBxHxKxV: jax.Array | None = None
    global_keys_LxBxSxKxH: jax.Array | None = None
    global_values_LxBxSxKxH: jax.Array | None = None

    def layer_states(self) -> LayerStates:
        return LayerStates(self.keys_LxBxSxKxH, self.values_LxBxSxKxH, self.conv_LxBxWxC,
                           self.recurrent_LxBxHxKxV, self.global_keys_LxBxSxKxH,
                           self.global_values_LxBxSxKxH)

    def with_layer_states(self, states: LayerStates, written: int) -> "KVCache":
        """The cache after `written` new tokens updated every layer's states."""
        return self.replace(keys_LxBxSxKxH=states.keys, values_LxBxSxKxH=states.values,
                            conv_LxBxWxC=states.conv, recurrent_LxBxHxKxV=states.recurrent,
                            global_keys_LxBxSxKxH=states.global_keys,
                            global_values_LxBxSxKxH=states.global_values,
                            index=self.index + written)

    def slots(self, cfg: ModelConfig, positions_BxT: jax.Array, segment_ids_BxT: jax.Array
              ) -> tuple["KVCache", Slots]:
        """The slot bookkeeping after writing T new tokens at `index` (the layers write
        their own states), and what the layers share to do it."""
        history = last = None
        if cfg.deltanet is not None:
            width = max(cfg.deltanet.conv_kernel - 1, 1)
            before = jnp.pad(self.segment_ids_BxS, ((0, 0), (width, 0)))
            window = jax.lax.dynamic_slice_in_dim(before, self.index, width, axis=1)
            history = window[:, width - (cfg.deltanet.conv_kernel - 1):]
            last = window[:, -1]
        start = (0, self.index)
        cache = self.replace(
            positions_BxS=jax.lax.dynamic_update_slice(
                self.positions_BxS, positions_BxT.astype(jnp.int32), start),
            segment_ids_BxS=jax.lax.dynamic_update_slice(
                self.segment_ids_BxS, segment_ids_BxT.astype(jnp.int32), start))
        return cache, Slots(cache.positions_BxS, cache.segment_ids_BxS, self.index, history,
                            last)


def init_cache(cfg: ModelConfig, batch: int, length: int) -> KVCache:
    """An empty cache of `length` slots per row: keys and values in the compute dtype,
    DeltaNet conv inputs too, their recurrent states in float32 (as the rule runs)."""
    dtype = jnp.dtype(cfg.compute_dtype)

    def keys_and_values(mixer):
        layers = cfg.cached_layers(mixer)
        if not layers:
            return None, None
        head_dim, kv_heads = cfg.attention_geometry(mixer)
        shape = (layers, batch, length, kv_heads, head_dim)
        return jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)

    keys, values = keys_and_values("attention")
    global_keys, global_values = keys_and_values("global_attention")
    conv = recurrent = None
    if cfg.deltanet is not None:
        spec, layers = cfg.deltanet, cfg.cached_layers("gated_deltanet")
        channels = 2 * spec.key_dim + spec.value_dim
        conv = jnp.zeros((layers, batch, spec.conv_kernel - 1, channels), dtype)
        recurrent = jnp.zeros((layers, batch, spec.num_value_heads, spec.key_head_dim,
                               spec.value_head_dim), jnp.float32)
    return KVCache(keys, values, jnp.zeros((batch, length), jnp.int32),
                   jnp.zeros((batch, length), jnp.int32), jnp.zeros((), jnp.int32),
                   conv, recurrent, global_keys, global_values)


def slot(cfg: ModelConfig, layer: jax.Array | int) -> jax.Array | int:
    """Layer `layer`'s place among the cached layers of its token mixer (a traced index
    under scan looks it up)."""
    if isinstance(layer, int):
        return cfg.cache_slot(layer)
    if len(set(cfg.mixers)) == 1 and not any(cfg.reuses_kv(i) for i in range(cfg.num_layers)):
        return layer
    table = np.asarray([cfg.cache_slot(i) for i in range(cfg.num_layers)], np.int32)
    return jnp.asarray(table)[layer]


def write(cache_LxBxSxKxH: jax.Array, new_BxTxKxH: jax.Array, layer: jax.Array | int,
          index: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Writes one layer's T new keys (or values) from slot `index`, in place: only the new
    tokens move, never the whole cache. Returns (cache, that layer's [B, S, K, H])."""
    cache_LxBxSxKxH = jax.lax.dynamic_update_slice(
        cache_LxBxSxKxH, new_BxTxKxH.astype(cache_LxBxSxKxH.dtype)[None],
        (layer, 0, index, 0, 0))
    return cache_LxBxSxKxH, cache_LxBxSxKxH[layer]
