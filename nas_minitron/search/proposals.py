"""Map Optuna's fixed-distribution suggestions onto in-budget candidates, and back.

Optuna refuses categorical parameters whose choices change between trials, yet which hidden sizes fit the budget
depends on the layers already chosen. So each axis gets one float u in [0, 1), always with the same distribution,
that indexes the sorted values still feasible given the earlier axes. Every proposal is therefore an in-budget
candidate, and u stays monotone in the axis value, which TPE can learn from.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from nas_minitron.arch import ArchConfig
from nas_minitron.space.spaces import AXES

__all__ = ["DECISION_ORDER", "decode", "encode", "param_name"]

# The space's axes (space.spaces.AXES) in the order they are decided: depth first, then attention shape, then
# widths; intermediate last (finest-grained).
DECISION_ORDER = ("num_hidden_layers", "num_key_value_heads", "num_attention_heads", "hidden_size", "intermediate_size")
assert sorted(DECISION_ORDER) == sorted(AXES), "every axis of the space is decided exactly once"


def param_name(axis: str) -> str:
    return f"u_{axis}"


def _values(pool: Sequence[ArchConfig], axis: str) -> list[int]:
    return sorted({getattr(c, axis) for c in pool})


def decode(candidates: Sequence[ArchConfig], suggestions: Mapping[str, float]) -> ArchConfig:
    """The candidate that the suggestions u_<axis> in [0, 1) select."""
    if not candidates:
        raise ValueError("no candidates to choose from")
    pool = list(candidates)
    for axis in DECISION_ORDER:
        values = _values(pool, axis)
        u = min(max(float(suggestions[param_name(axis)]), 0.0), 1.0)
        chosen = values[min(int(u * len(values)), len(values) - 1)]
        pool = [c for c in pool if getattr(c, axis) == chosen]
    assert len(pool) == 1, f"axes do not identify a candidate: {pool}"
    return pool[0]


def encode(candidates: Sequence[ArchConfig], arch: ArchConfig) -> dict[str, float]:
    """Suggestions that `decode` maps to `arch` (the centre of its interval on each axis)."""
    if arch not in candidates:
        raise ValueError(f"{arch.name} is not among the candidates")
    pool = list(candidates)
    point: dict[str, float] = {}
    for axis in DECISION_ORDER:
        values = _values(pool, axis)
        index = values.index(getattr(arch, axis))
        point[param_name(axis)] = (index + 0.5) / len(values)
        pool = [c for c in pool if getattr(c, axis) == getattr(arch, axis)]
    return point
