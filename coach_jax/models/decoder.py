"""The decoder and its functional API: `init`, `apply`, `hidden_states`, `logits_from_hidden`.

Params are a plain nested dict of arrays. Their logical axis names, declared next to each
parameter in layers.py, are read back with `logical_axes(cfg)` as a matching tree of
`PartitionSpec`s of logical names.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from coach_jax.models import moe  # noqa: F401  (registers the "moe" feed-forward)
from coach_jax.models import rope
from coach_jax.models.config import ModelConfig
from coach_jax.models.kv_cache import KVCache
from coach_jax.models.layers import DecoderLayer, Projection, RMSNorm, _param

Params = dict[str, Any]
_REMAT_POLICIES = {
    "full": None,  # save nothing: recompute the whole layer in the backward pass
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "save_attention": jax.checkpoint_policies.save_only_these_names("attention_out"),
}
# Maps a parameter path such as "layers/self_attn/q_proj/kernel" to where it should live.
ShardingFn = Callable[[str], jax.sharding.Sharding]


def _layer_class(cfg: ModelConfig) -> type[nn.Module]:
    """DecoderLayer, rematerialised in the backward pass as `cfg.remat` says. A scan's
    body keeps XLA from merging the recomputation into the forward pass, so only a layer
    scanned on its own may skip the guard (layers of a scanned group keep it)."""
    if cfg.remat == "none":
        return DecoderLayer
    alone_in_scan = cfg.scan_layers and cfg.scan_period == 1
    return nn.remat(DecoderLayer, policy=_REMAT_POLICIES[cfg.remat],
                    prevent_cse=not alone_in_scan)


class LayerGroup(nn.Module):
    """`cfg.scan_period` consecutive layers of different kinds, unrolled: the body of the
    scan over a stack whose layers repeat in groups (Qwen3.5's three DeltaNet layers and
    one attention layer). Layer j of every group lives at `layers/group_layer_j`."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, carry, positions_BxT, segment_ids_BxT, rope_tables, windows_P, slots,
                 layers_P, per_layer_inputs_P):
        cfg = self.cfg
        for j, (mixer, kind) in enumerate(cfg.layer_kinds[:cfg.scan_period]):
            carry, _ = _layer_class(cfg)(cfg, kind, mixer, name=f"{GROUP_LAYER}{j}")(
                carry, positions_BxT, segment_ids_BxT, rope_tables, windows_P[j], slots,
                layers_P[j], per_layer_inputs_P[j])
        return carry, None


GROUP_LAYER = "group_layer_"


def layer_root(cfg: ModelConfig, layer: int) -> tuple[str, int | None]:
    """Where layer `layer`'s parameters live: their subtree ("layers_3" unrolled, "layers"
    scanned, "layers/group_layer_1" scanned in groups) and the layer's index along that
    subtree's stacked axis (None unrolled)."""
    if not cfg.scan_layers:
        return f"layers_{layer}", None
    period = cfg.scan_period
    if period == 1:
        return "layers", layer
    return f"layers/{GROUP_LAYER}{layer % period}", layer // period


def split_layer_path(cfg: ModelConfig, path: str) -> tuple[str, str] | None:
    """(layer subtree, path inside a layer) of a decoder-layer parameter path, as
    `layer_root` names subtrees; None for a parameter outside the layers."""
    first, _, rest = path.partition("/")
    if first.startswith("layers_"):
        return first, rest
    if first != "layers":
        return None
    if cfg.scan_layers and cfg.scan_period > 1:
        member, _, rest = rest.partition("/")
        return f"layers/{member}", rest
    return "layers", rest


def layers_of_root(cfg: ModelConfig, root: str) -> list[tuple[int, int | None]]:
    """The (layer, stacked index) pairs whose parameters a layer subtree holds."""
    return [(i, index) for i in range(cfg.num_layers)
            for r, index in [layer_root(cfg, i)] if r == root]


class Decoder(nn.Module):
    """Embedding, `num_layers` decoder layers (scanned or unrolled), final norm, LM head."""

    cfg: ModelConfig

    def setup(self):
        cfg = self.cfg
        normal = nn.initializers.normal(cfg.initializer_range)
        self.embed_tokens = _param(self, "embed_tokens", normal,
                                   (cfg.vocab_size, cfg.hidden_size), ("vocab", "embed"), cfg)
        layer = _layer_class(cfg)
        if cfg.scan_layers:
            period = cfg.scan_period
            body, args = (layer, (cfg, cfg.feed_forward[0], cfg.mixers[0])) if period == 1 \
                else (LayerGroup, (cfg,))
            self.layers = nn.scan(
                body, variable_axes={"params": 0, "intermediates": 0},
                split_rngs={"params": True, "dropout": True},
                # positions, segment ids, rope tables, cache slots are shared by all layers;
                # each layer (group) has its own windows and indices.
                in_axes=(nn.broadcast, nn.broadcast, nn.broadcast, 0, nn.broadcast, 0, 0),
                length=cfg.num_layers // period,
                metadata_params={nn.PARTITION_NAME: "layers"})(*args, name="layers")
        else:
            self.layers = [layer(cfg, kind, mixer, name=f"layers_{i}")
                           for i, (mixer, kind) in enumerate(cfg.layer_kinds)]
        self.norm = RMSNorm(cfg, name="norm")
        if cfg.per_layer_input_size:  # Gemma 4's per-layer embeddings (PLE)
            width = cfg.num_layers * cfg.per_layer_input_size
            # Sharded as the embeddings are: 2.3B weights in Gemma 4 E2B.
            self.embed_tokens_per_layer = _param(
                self, "embed_tokens_per_layer", normal, (cfg.per_layer_vocab_size, width),
                ("vocab", "embed"), cfg)
            self.per_layer_model_projection = Projection(
                cfg, ("embed",), ("per_layer",), (width,), name="per_layer_model_projection")
            self.per_layer_projection_norm = RMSNorm(cfg, "per_layer",
                                                     name="per_layer_projection_norm")
        if not cfg.tie_word_embeddings:
            self.lm_head = _param(self, "lm_head", normal, (cfg.hidden_size, cfg.vocab_size),
                                  ("embed", "vocab"), cfg)

    def hidden_states(self, tokens_BxT: jax.Array, positions_BxT: jax.Array,
                      segment_ids_BxT: jax.Array) -> jax.Array:
        """Final-norm hidden states [B, T, D] in the compute dtype."""
        return self.decode(tokens_BxT, positions_BxT, segment_ids_BxT, None)[0]

    def decode(self, tokens_BxT: jax.Array, positions_BxT: jax.Array,
               segment_ids_BxT: jax.Array, cache: KVCache | None
               ) -> tuple[jax.Array, KVCache | None]:
        """Hidden states of T new tokens; with a cache, they attend to everything already
        in it and are written into it at `cache.index`."""
        cfg = self.cfg
        x_BxTxD = jnp.take(self.embed_tokens, tokens_BxT, axis=0)
        if cfg.scale_embeddings:  # Gemma: times sqrt(hidden_size), in the weights' dtype
            x_BxTxD = x_BxTxD * jnp.asarray(np.float32(cfg.hidden_size ** 0.5),
                                            x_BxTxD.dtype)
        x_BxTxD = x_BxTxD.astype(cfg.compute_dtype)
        rope_tables = rope.position_tables(cfg, positions_BxT, segment_ids_BxT)
        slots = kv = None
        if cache is not None:
            kv = cache.layer_states()
            cache, slots = cache.slots(cfg, positions_BxT, segment_ids_BxT)
        # Each layer's PLE input (Gemma 4) [L, B, T, P]; a placeholder per layer otherwise.
        per_layer = (self.per_layer_inputs(tokens_BxT, x_BxTxD) if cfg.per_layer_input_size
                     else jnp.zeros((cfg.num_layers,), x_BxTxD.dtype))
        carry = (x_BxTxD, kv, {})
        if cfg.scan_layers:  # per group of scan_period layers: their windows and indices
            groups = (cfg.num_layers // cfg.scan_period, cfg.scan_period)
            windows = jnp.asarray(cfg.layer_windows, dtype=jnp.int32).reshape(groups)
            layers = jnp.arange(cfg.num_layers, dtype=jnp.int32).reshape(groups)
            per_layer = per_layer.reshape(*groups, *per_layer.shape[1:])
            if cfg.scan_period == 1:
                windows, layers, per_layer = windows[:, 0], layers[:, 0], per_layer[:, 0]
            carry, _ = self.layers(carry, positions_BxT, segment_ids_BxT, rope_tables, windows,
                                   slots, layers, per_layer)
        else:
            for i, (layer, window) in enumerate(zip(self.layers, cfg.layer_windows)):
                carry, _ = layer(carry, positions_BxT, segment_ids_BxT, rope_tables, window,
                                 slots, i, per_layer[i])
        x_BxTxD, kv, _ = carry
        if cache is not None:
            cache = cache.with_layer_states(kv, tokens_BxT.shape[1])
        return self.norm(x_BxTxD), cache

    def per_layer_inputs(self, tokens_BxT: jax.Array, x_BxTxD: jax.Array) -> jax.Array:
        """Gemma 4's per-layer embeddings [L, B, T, P]: the token's row of
        `embed_tokens_per_layer` (times sqrt(P)) and a projection of its embedding x
        (times hidden_size^-0.5, RMS-normalised), summed and scaled by 2^-0.5."""
        cfg = self.cfg
        size, layers = cfg.per_layer_input_size, cfg.num_layers
        batch, length = tokens_BxT.shape
        table = jnp.take(self.embed_tokens_per_layer, tokens_BxT, axis=0)
        table = table * jnp.asarray(np.float32(size ** 0.5), table.dtype)
        projected = self.per_layer_model_projection(x_BxTxD) * np.float32(
            cfg.hidden_size ** -0.5).astype(x_BxTxD.dtype)
        projected = self.per_layer_projection_norm(
            projected.reshape(batch, length, layers, size))
        out = (projected + table.reshape(batch, length, layers, size).astype(projected.dtype)
               ) * np.float32(2 ** -0.5).astype(projected.dtype)
        return jnp.moveaxis(out, 2, 0)

    def logits_from_hidden(self, hidden_BxTxD: jax.Array) -> jax.Array:
        """Logits [B, T, V] in the compute dtype; padding ids of a padded vocabulary get a
        large negative logit, so they carry no probability."""
        cfg = self.cfg
        dtype = jnp.dtype(cfg.compute_dtype)
        # One 2-D matmul over flattened rows, as the projections: XLA's CPU backward for
        # the [B, T, D] form computed the head's weight gradient with a slow transposed dot.
        rows_NxD = hidden_BxTxD.reshape(-1, hidden_BxTxD.shape[-1])
        head_DxV = (self.embed_tokens.astype(dtype).T if cfg.tie_word_embeddings
                    else self.lm_head.astype(dtype))
        logits = (rows_NxD @ head_DxV).reshape(*hidden_BxTxD.shape[:-1], -1)
        if cfg.final_logit_softcapping:  # Gemma 2: cap * tanh(logits / cap)
            cap = cfg.final_logit_softcapping
            logits = (cap * jnp.tanh(logits.astype(jnp.float32) / cap)).astype(dtype)
        if cfg.real_vocab_size is not None and cfg.real_vocab_size < cfg.vocab_size:
            real = jnp.arange(cfg.vocab_size) < cfg.real_vocab_size
            logits = jnp.where(real, logits, jnp.finfo(dtype).min)
        return logits

    def __call__(self, tokens_BxT, positions_BxT, segment_ids_BxT):
        return self.logits_from_hidden(
            self.hidden_states(tokens_BxT, positions_BxT, segment_ids_BxT))


def _defaults(tokens_BxT: jax.Array, positions_BxT: jax.Array | None,
              segment_ids_BxT: jax.Array | None) -> tuple[jax.Array, jax.Array]:
    """One unpacked example per row when positions / segments are not given."""
    batch, length = tokens_BxT.shape
    if positions_BxT is None:
        positions_BxT = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
    if segment_ids_BxT is None:
        segment_ids_BxT = jnp.ones((batch, length), dtype=jnp.int32)
    return positions_BxT, segment_ids_BxT


@functools.partial(jax.jit, static_argnums=0)
def hidden_states(cfg: ModelConfig, params: Params, tokens: jax.Array,
                  positions: jax.Array | None = None,
                  segment_ids: jax.Array | None = None,
                  dropout_rng: jax.Array | None = None) -> jax.Array:
    """Final hidden states [B, T, D]: the input of the LM head (and of chunked losses).
    `dropout_rng` switches on the model's dropout (LoRA's, when it has one): training."""
    return Decoder(cfg).apply({"params": params}, tokens,
                              *_defaults(tokens, positions, segment_ids),
                              method=Decoder.hidden_states,
                              rngs=None if dropout_rng is None else {"dropout": dropout_rng})


def hidden_states_and_router(cfg: ModelConfig, params: Params, tokens: jax.Array,
                             positions: jax.Array, segment_ids: jax.Array,
                             dropout_rng: jax.Array | None = None
                             ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """`hidden_states` and the MoE layers' router sums (models/moe.router_sums), stacked
    in layer order: counts and probs [sparse layers, experts], z and tokens [sparse
    layers]. Empty for a model without MoE layers."""
    hidden, state = Decoder(cfg).apply(
        {"params": params}, tokens, positions, segment_ids, method=Decoder.hidden_states,
        rngs=None if dropout_rng is None else {"dropout": dropout_rng},
        mutable=["intermediates"])
    found = state.get("intermediates", {})
    if not found:
        return hidden, {}
    if cfg.scan_layers and cfg.scan_period == 1:  # one entry, stacked by the scan
        (sums,) = found["layers"]["mlp"]["router"]
        return hidden, sums
    if cfg.scan_layers:  # one entry per MoE layer of the group, stacked over the groups
        layers = [(g * cfg.scan_period + int(name.removeprefix(GROUP_LAYER)),
                   jax.tree.map(lambda x: x[g], entry["mlp"]["router"][0]))
                  for name, entry in found["layers"].items()
                  for g in range(cfg.num_layers // cfg.scan_period)]
    else:
        layers = [(int(name.removeprefix("layers_")), entry["mlp"]["router"][0])
                  for name, entry in found.items()]
    layers.sort(key=lambda item: item[0])
    return hidden, jax.tree.map(lambda *x: jnp.stack(x), *[sums for _, sums in layers])


@functools.partial(jax.jit, static_argnums=0)
def logits_from_hidden(cfg: ModelConfig, params: Params, hidden: jax.Array) -> jax.Array:
    """Applies the (tied or untied) LM head to hidden states [B, T, D]."""
    return Decoder(cfg).apply({"params": params}, hidden, method=Decoder.logits_from_hidden)


@functools.partial(jax.jit, static_argnums=0)
def apply(cfg: ModelConfig, params: Params, tokens: jax.Array,
          positions: jax.Array | None = None,
          segment_ids: jax.Array | None = None) -> jax.Array:
    """The pure forward pass: token ids [B, T] -> logits [B, T, V].

    `positions` [B, T] restart at 0 for each packed example; `segment_ids` [B, T] tell
    packed examples apart (0 = padding). Attention never crosses segments.
    """
    return Decoder(cfg).apply({"params": params}, tokens,
                              *_defaults(tokens, positions, segment_ids))


@functools.partial(jax.jit, static_argnums=0, donate_argnums=5)
def decode(cfg: ModelConfig, params: Params, tokens: jax.Array, positions: jax.Array,
           segment_ids: jax.Array, cache: KVCache) -> tuple[jax.Array, KVCache]:
    """Hidden states [B, T, D] of T new tokens attending to the cache, and the cache with
    them written in (donated: updated in place; inside another jit, donation is that
    jit's business)."""
    return Decoder(cfg).apply({"params": params}, tokens, positions, segment_ids, cache,
                              method=Decoder.decode)


def _boxed_init(cfg: ModelConfig, rng: jax.Array) -> Params:
    """Parameters from a one-token trace. The attention kernel does not change them, and
    fused kernels have length limits a one-token input breaks: XLA's attention traces it."""
    tokens = jnp.zeros((1, 1), jnp.int32)
    cfg = dataclasses.replace(cfg, attention="xla")
    return Decoder(cfg).init(rng, tokens, *_defaults(tokens, None, None))["params"]


def logical_axes(cfg: ModelConfig) -> Params:
    """A tree like the params whose leaves are `PartitionSpec`s of logical axis names."""
    boxed = jax.eval_shape(functools.partial(_boxed_init, cfg), jax.random.key(0))
    return nn.get_partition_spec(boxed)


def param_shapes(cfg: ModelConfig) -> Params:
    """A tree like the params with `jax.ShapeDtypeStruct` leaves; allocates nothing."""
    boxed = jax.eval_shape(functools.partial(_boxed_init, cfg), jax.random.key(0))
    return nn.unbox(boxed)


def path_str(key_path: tuple[Any, ...]) -> str:
    """"layers/self_attn/q_proj/kernel" for a jax key path."""
    return "/".join(str(getattr(k, "key", k)) for k in key_path)


def select(tree: Params, keep: Callable[[str], bool]) -> Params:
    """The leaves whose path `keep` accepts, as a nested dict of their own."""
    out: dict[str, Any] = {}
    for key_path, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
        path = path_str(key_path)
        if keep(path):
            *parents, leaf = path.split("/")
            node = out
            for p in parents:
                node = node.setdefault(p, {})
            node[leaf] = x
    return out


def kernel_input_dims(path: str) -> int:
    """How many leading (non-`layers`) dims of a Projection kernel are its inputs: o_proj
    contracts (heads, head_dim), every other projection one dim."""
    return 2 if path.split("/")[-2:-1] == ["o_proj"] else 1


def init(cfg: ModelConfig, seed: int, sharding: ShardingFn | None = None,
         only: Callable[[str], bool] | None = None) -> Params:
    """Random parameters, created directly where `sharding(path)` says (never whole on one
    device first when a sharding is given). `only(path)` keeps just those parameters (an
    adapter's): the rest is never computed, as nothing returned depends on it."""
    def keep(tree: Params) -> Params:
        return tree if only is None else select(tree, only)

    shapes = keep(param_shapes(cfg))
    out_shardings = None
    if sharding is not None:
        out_shardings = jax.tree_util.tree_map_with_path(
            lambda path, _: sharding(path_str(path)), shapes)
    make = jax.jit(lambda rng: keep(nn.unbox(_boxed_init(cfg, rng))),
                   out_shardings=out_shardings)
    return make(jax.random.key(seed))


def count_params(params: Params) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(params)))
