"""Which parameters train, and how fast: groups by regex on parameter paths.

Rules are `(regex, value)` pairs, first match wins, matched with `re.search` against paths
such as `layers/self_attn/q_proj/kernel` or `embed_tokens`. A value is "frozen" or a
learning-rate multiplier (1.0 = the default rate). Unmatched parameters train at 1.0.

Frozen parameters are taken out of the trainable tree entirely: no gradient is asked for
them and the optimizer holds no state for them. `trainable_last_layers = k` trains only the
last k decoder layers (`trainable_layers`, an adapter's layer selection, the layers it
names); with unrolled layers that is a path rule, with layers stacked under
`scan` it masks the gradient and update rows of the earlier layers (their optimizer state
exists, as part of the stacked arrays, but stays zero).
"""

from __future__ import annotations

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np

from coach_jax.models.decoder import GROUP_LAYER, Params, path_str

FROZEN = "frozen"


class ParamGroupError(ValueError):
    """A train.freeze / train.lr_multipliers rule that cannot work, in one line."""


def rule_key(value: str | float) -> str:
    """The config key a rule came from."""
    return "train.freeze" if value == FROZEN else "train.lr_multipliers"


@dataclasses.dataclass(frozen=True)
class ParamGroups:
    rules: tuple[tuple[str, str | float], ...] = ()  # (regex, "frozen" or multiplier)
    trainable_last_layers: int | None = None
    # Only these decoder layers train (an adapter's layer selection); None: all.
    trainable_layers: tuple[int, ...] | None = None

    def layer_trains(self, layer: int, num_layers: int) -> bool:
        if self.trainable_last_layers is not None and \
                layer < num_layers - self.trainable_last_layers:
            return False
        return self.trainable_layers is None or layer in self.trainable_layers

    def __post_init__(self):
        for pattern, value in self.rules:
            try:
                re.compile(pattern)
            except re.error as e:
                raise ParamGroupError(f"{rule_key(value)}: {pattern!r} is not a valid regular "
                                      f"expression ({e})") from None
            if value != FROZEN and not (isinstance(value, (int, float)) and value > 0):
                raise ParamGroupError(f"{rule_key(value)}: {pattern!r} has multiplier "
                                      f"{value!r}; it must be a positive number")


def label_of(path: str, groups: ParamGroups, num_layers: int) -> str:
    """'frozen' or 'lr_x<multiplier>' for one parameter path."""
    match = re.match(r"layers_(\d+)/", path)
    if match and not groups.layer_trains(int(match.group(1)), num_layers):
        return FROZEN
    for pattern, value in groups.rules:
        if re.search(pattern, path):
            return FROZEN if value == FROZEN else f"lr_x{float(value):g}"
    return "lr_x1"


def labels(params: Params, groups: ParamGroups, num_layers: int) -> Params:
    """A tree like `params` of group labels."""
    return jax.tree_util.tree_map_with_path(
        lambda p, _: label_of(path_str(p), groups, num_layers), params)


def multiplier(label: str) -> float:
    return float(label.removeprefix("lr_x"))


def split(params: Params, label_tree: Params) -> tuple[Params, Params]:
    """(trainable, frozen): the same tree twice, None where a leaf belongs to the other."""
    trainable = jax.tree.map(lambda l, x: None if l == FROZEN else x, label_tree, params)
    frozen = jax.tree.map(lambda l, x: x if l == FROZEN else None, label_tree, params)
    return trainable, frozen


def merge(trainable: Params, frozen: Params) -> Params:
    return jax.tree.map(lambda t, f: f if t is None else t, trainable, frozen,
                        is_leaf=lambda x: x is None)


def layer_update_mask(params: Params, groups: ParamGroups, num_layers: int
                      ) -> Params | None:
    """For stacked layers and a layer selection (`trainable_last_layers`,
    `trainable_layers`): a tree of [L]-broadcastable 0/1 multipliers (None elsewhere); None
    when nothing needs masking."""
    rows = np.asarray([groups.layer_trains(i, num_layers) for i in range(num_layers)])
    if rows.all() or "layers" not in params:
        return None
    # Layers scanned in groups (decoder.LayerGroup): layer j of each group at
    # layers/group_layer_j, stacked over the groups.
    period = sum(1 for name in params["layers"] if name.startswith(GROUP_LAYER)) or 1

    def mask(path, x):
        path = path_str(path)
        if x is None or not path.startswith("layers/"):
            return None
        if period == 1:
            kept = rows
        else:
            member = int(path.split("/")[1].removeprefix(GROUP_LAYER))
            kept = rows[member::period]
        return jnp.asarray(kept, x.dtype).reshape((len(kept),) + (1,) * (x.ndim - 1))

    return jax.tree_util.tree_map_with_path(mask, params)


def apply_mask(tree: Params, mask: Params | None) -> Params:
    if mask is None:
        return tree
    return jax.tree.map(lambda x, m: x if m is None else x * m, tree, mask,
                        is_leaf=lambda x: x is None)


def describe(label_tree: Params, params: Params) -> dict[str, int]:
    """Parameter counts per group label, for the run log."""
    counts: dict[str, int] = {}
    for label, x in zip(jax.tree.leaves(label_tree), jax.tree.leaves(params)):
        counts[label] = counts.get(label, 0) + int(np.prod(x.shape))
    return counts


def check_rules_match(params: Params, groups: ParamGroups) -> None:
    """A rule that matches no parameter is almost always a typo: say so."""
    paths = [path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
    for pattern, value in groups.rules:
        if not any(re.search(pattern, p) for p in paths):
            tied = ("; this model ties its LM head to embed_tokens, so there is no lm_head "
                    "parameter" if "lm_head" in pattern and "lm_head" not in params else "")
            names = sorted({re.sub(r"layers_\d+/", "layers_N/", p) for p in paths})
            raise ParamGroupError(f"{rule_key(value)}: {pattern!r} matches no parameter{tied}; "
                                  f"the parameters are: {', '.join(names)}")
