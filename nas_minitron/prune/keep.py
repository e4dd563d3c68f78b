"""`KeepIndices`: which teacher units a student keeps, per axis; and their selection from scores.

Order matters and is preserved by surgery: a permutation of all units is a valid keep set and gives the same
function. Query heads are listed group by group, following `kv_groups`: in the student, query head p reads KV
group p // heads_per_group, so each block of heads_per_group heads must come from the matching teacher group.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from nas_minitron._lazy import lazy_import
from nas_minitron.arch import ArchConfig
from nas_minitron.prune.scores import ImportanceScores

if TYPE_CHECKING:
    import torch
else:
    torch = lazy_import("torch")

__all__ = ["DEPTH_METHODS", "KeepIndices", "keep_all", "keep_from_scores"]

DEPTH_METHODS = ("auto", "contiguous", "loss_drop", "block_importance", "magnitude", "random")


@dataclass(frozen=True)
class KeepIndices:
    """Kept teacher indices. Per-layer tuples are aligned with `layers` (the i-th entry is for layers[i])."""

    layers: tuple[int, ...]
    hidden: tuple[int, ...]
    neurons: tuple[tuple[int, ...], ...]
    kv_groups: tuple[tuple[int, ...], ...]
    heads: tuple[tuple[int, ...], ...]

    def validate(self, teacher: ArchConfig, target: ArchConfig) -> None:
        """Raise ValueError unless these indices carve `target` out of `teacher`."""
        _check_unique("layers", self.layers, target.num_hidden_layers, teacher.num_hidden_layers)
        if list(self.layers) != sorted(self.layers):
            raise ValueError(f"kept layers must be in increasing order, got {self.layers}")
        _check_unique("hidden", self.hidden, target.hidden_size, teacher.hidden_size)
        for name in ("neurons", "kv_groups", "heads"):
            if len(getattr(self, name)) != target.num_hidden_layers:
                raise ValueError(f"{name} has {len(getattr(self, name))} layers, expected {target.num_hidden_layers}")
        t_group, s_group = teacher.heads_per_group, target.heads_per_group
        for i, layer in enumerate(self.layers):
            _check_unique(f"neurons[{layer}]", self.neurons[i], target.intermediate_size, teacher.intermediate_size)
            groups, heads = self.kv_groups[i], self.heads[i]
            _check_unique(f"kv_groups[{layer}]", groups, target.num_key_value_heads, teacher.num_key_value_heads)
            _check_unique(f"heads[{layer}]", heads, target.num_attention_heads, teacher.num_attention_heads)
            for slot, group in enumerate(groups):
                block = heads[slot * s_group : (slot + 1) * s_group]
                if any(h // t_group != group for h in block):
                    raise ValueError(f"layer {layer}: heads {block} do not all belong to KV group {group}")

    def to_dict(self) -> dict[str, Any]:
        return {
            "layers": list(self.layers),
            "hidden": list(self.hidden),
            "neurons": [list(v) for v in self.neurons],
            "kv_groups": [list(v) for v in self.kv_groups],
            "heads": [list(v) for v in self.heads],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> KeepIndices:
        return cls(
            layers=tuple(int(v) for v in data["layers"]),
            hidden=tuple(int(v) for v in data["hidden"]),
            neurons=tuple(tuple(int(v) for v in row) for row in data["neurons"]),
            kv_groups=tuple(tuple(int(v) for v in row) for row in data["kv_groups"]),
            heads=tuple(tuple(int(v) for v in row) for row in data["heads"]),
        )


def _check_unique(name: str, values: Sequence[int], expected: int, limit: int) -> None:
    if len(values) != expected:
        raise ValueError(f"{name}: {len(values)} indices, expected {expected}")
    if len(set(values)) != len(values) or any(not 0 <= v < limit for v in values):
        raise ValueError(f"{name}: indices must be distinct and in [0, {limit}), got {list(values)}")


def keep_all(teacher: ArchConfig) -> KeepIndices:
    """Keep everything in the original order: surgery then reproduces the teacher exactly."""
    num_layers = teacher.num_hidden_layers
    return KeepIndices(
        layers=tuple(range(num_layers)),
        hidden=tuple(range(teacher.hidden_size)),
        neurons=tuple(tuple(range(teacher.intermediate_size)) for _ in range(num_layers)),
        kv_groups=tuple(tuple(range(teacher.num_key_value_heads)) for _ in range(num_layers)),
        heads=tuple(tuple(range(teacher.num_attention_heads)) for _ in range(num_layers)),
    )


def _top(scores: torch.Tensor, k: int) -> tuple[int, ...]:
    """Indices of the k largest scores, in increasing index order (stable tie-break on index)."""
    order = torch.argsort(scores.double(), descending=True, stable=True)[:k]
    return tuple(sorted(int(i) for i in order))


def select_layers(
    scores: ImportanceScores, num_layers: int, total_layers: int, method: str = "auto"
) -> tuple[int, ...]:
    """Kept layer indices for a depth of `num_layers`.

    `contiguous` drops the window of `total_layers - num_layers` adjacent layers whose removal hurt the LM loss
    least (the second Minitron paper found this the better guide); other methods keep the top-scored layers.
    `auto` prefers contiguous, then loss_drop, then block_importance, then whatever the record has.
    """
    if num_layers == total_layers:
        return tuple(range(total_layers))
    drop = total_layers - num_layers
    if method == "auto":
        if drop in scores.windows:
            method = "contiguous"
        else:
            preference = ("loss_drop", "block_importance", "magnitude", "random")
            method = next((m for m in preference if m in scores.layers), next(iter(scores.layers), "contiguous"))
    if method == "contiguous":
        if drop not in scores.windows:
            raise ValueError(f"scores have no contiguous-window losses for removing {drop} layers")
        start = int(scores.windows[drop].double().argmin())
        return tuple(i for i in range(total_layers) if not start <= i < start + drop)
    if method not in scores.layers:
        raise ValueError(f"scores have no layer scores for {method!r}; they have {sorted(scores.layers)}")
    return _top(scores.layers[method], num_layers)


def keep_from_scores(
    scores: ImportanceScores, teacher: ArchConfig, target: ArchConfig, depth_method: str = "auto"
) -> KeepIndices:
    """Keep the highest-scored units on every axis (Minitron's ranking), heads evenly within KV groups."""
    layers = select_layers(scores, target.num_hidden_layers, teacher.num_hidden_layers, depth_method)
    neurons, kv_groups, heads = [], [], []
    t_group, s_group = teacher.heads_per_group, target.heads_per_group
    for layer in layers:
        neurons.append(_top(scores.neurons[layer], target.intermediate_size))
        head_scores = scores.heads[layer].reshape(teacher.num_key_value_heads, t_group)  # [KV, heads per group]
        groups = _top(head_scores.sum(dim=1), target.num_key_value_heads)
        kv_groups.append(groups)
        kept: list[int] = []
        for group in groups:
            within = _top(head_scores[group], s_group)
            kept.extend(group * t_group + h for h in within)
        heads.append(tuple(kept))
    return KeepIndices(
        layers=layers,
        hidden=_top(scores.channels, target.hidden_size),
        neurons=tuple(neurons),
        kv_groups=tuple(kv_groups),
        heads=tuple(heads),
    )
