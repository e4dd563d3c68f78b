"""Winners: the top K by one objective, or the Pareto set (all objectives minimized) when there are several."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["OBJECTIVES", "finite_objectives", "pareto_front", "select_winners"]

# Every objective is minimized. Short-distillation metrics come from the trials; the others from the arch.
OBJECTIVES: dict[str, str] = {
    "val_kl": "KL(teacher || student) on validation after the short distillation",
    "val_loss": "student LM loss on validation after the short distillation",
    "params": "parameter count",
    "kv_bytes_per_token": "KV-cache bytes per token (bf16)",
    "flops_per_token": "forward FLOPs per token",
}


def finite_objectives(row: Mapping[str, Any], objectives: Sequence[str]) -> list[float] | None:
    """The row's objective values, or None when one is missing, not a number or not finite."""
    values = [row.get(k) for k in objectives]
    if all(isinstance(v, (int, float)) and math.isfinite(float(v)) for v in values):
        return [float(v) for v in values]  # type: ignore[arg-type]  # checked numbers above
    return None


def _usable(row: Mapping[str, Any], objectives: Sequence[str]) -> bool:
    return row.get("status") == "COMPLETE" and finite_objectives(row, objectives) is not None


def _dominates(a: Mapping[str, Any], b: Mapping[str, Any], objectives: Sequence[str]) -> bool:
    no_worse = all(float(a[k]) <= float(b[k]) for k in objectives)
    better = any(float(a[k]) < float(b[k]) for k in objectives)
    return no_worse and better


def pareto_front(rows: Sequence[Mapping[str, Any]], objectives: Sequence[str]) -> list[Mapping[str, Any]]:
    """Completed rows with finite objectives that no other such row dominates."""
    usable = [r for r in rows if _usable(r, objectives)]
    return [r for r in usable if not any(_dominates(o, r, objectives) for o in usable if o is not r)]


def select_winners(
    rows: Sequence[Mapping[str, Any]], objectives: Sequence[str], num_winners: int
) -> list[Mapping[str, Any]]:
    """Top `num_winners` distinct archs: by the objective, or from the Pareto set ordered by the first objective.

    Failed trials (NaN loss, errors) and rows without finite objectives never win. Duplicate archs (a trial that
    re-proposed a finished candidate) count once.
    """
    if num_winners < 1:
        return []
    pool = pareto_front(rows, objectives) if len(objectives) > 1 else [r for r in rows if _usable(r, objectives)]
    pool = sorted(pool, key=lambda r: tuple(float(r[k]) for k in objectives))
    winners: list[Mapping[str, Any]] = []
    seen: set[str] = set()
    for row in pool:
        if row["name"] not in seen:
            seen.add(row["name"])
            winners.append(row)
    return winners[:num_winners]
