"""Successive halving over rungs of growing distillation budgets: the ladder, promotion, intervals, stability.

Pure Python (numpy for the bootstrap, imported lazily); the Ray side runs each rung (`halving.py`). A rung is a
token budget: rung 0 scores every screened candidate untrained; each later rung continues the promoted candidates
from their checkpoint of the rung before, under one learning-rate schedule defined over the top rung, so a
promoted candidate's curve is the curve it would have had unpromoted.

Promotion keeps the best ceil(n / eta) (at least `keep_at_least`) of a rung:
- one objective: by value; a candidate just below the cut whose paired bootstrap interval of the difference to the
  last promoted one contains 0 (the validation sequences cannot tell them apart) is promoted too, up to twice the
  quota. Paired, not marginal intervals: every candidate is validated on the same sequences, and the spread of
  sequence difficulty makes marginal intervals overlap nearly always, which would promote everyone;
- several objectives: by non-dominated sorting, the last front cut by crowding distance (NSGA-II), so that the
  Pareto set of the rung survives whenever it fits the quota.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from nas_minitron.errors import UserError
from nas_minitron.search.winners import finite_objectives

__all__ = ["BOOTSTRAP_SAMPLES", "Promotion", "RungStats", "bootstrap_interval", "crowding_distance",
           "default_rungs", "kendall_tau", "nondominated_fronts", "parse_rungs", "promote", "quota", "rung_stats",
           "spearman", "stable"]

BOOTSTRAP_SAMPLES = 1000
CONFIDENCE = 0.95
_TOKENS = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kKmM]?)\s*$")


def _tokens(text: str) -> float:
    match = _TOKENS.match(text)
    if not match:
        raise UserError(f"--rungs entries are token counts like 0, 1024, 4k or 1.5M, but got {text!r}.")
    number, suffix = float(match.group(1)), match.group(2).lower()
    return number * {"": 1, "k": 1e3, "m": 1e6}[suffix]


def parse_rungs(text: str, top_tokens: int, tokens_per_step: int) -> tuple[int, ...]:
    """`--rungs 0,1k,4k`: token budgets, each rounded to the nearest whole optimizer step (at least one after
    rung 0); 0 is put first when missing. UserError when they do not increase or the top one exceeds
    `top_tokens` (--short-tokens)."""
    raw = [_tokens(part) for part in text.split(",") if part.strip()]
    if not raw:
        raise UserError(f"--rungs needs at least one token budget, but got {text!r}.")
    if raw[0] != 0:
        raw.insert(0, 0.0)
    steps = [0] + [max(1, round(t / tokens_per_step)) for t in raw[1:]]
    rungs = tuple(s * tokens_per_step for s in steps)
    if any(b <= a for a, b in zip(rungs, rungs[1:], strict=False)):
        raise UserError(f"--rungs must increase, but {text!r} gives {', '.join(map(str, rungs))} tokens once rounded "
                        f"to whole steps of {tokens_per_step} tokens.")
    top_steps = max(1, top_tokens // tokens_per_step)
    if rungs[-1] > top_steps * tokens_per_step:
        raise UserError(f"the top rung of --rungs {text!r} ({rungs[-1]} tokens) is above --short-tokens "
                        f"{top_tokens} ({top_steps * tokens_per_step} tokens in whole steps); raise --short-tokens "
                        f"or lower the rungs.")
    return rungs


def default_rungs(top_tokens: int, eta: int, tokens_per_step: int, max_rungs: int = 4) -> tuple[int, ...]:
    """0, then budgets growing by `eta` up to the top (--short-tokens), none below one step: for 4,096 tokens
    of 1,024-token steps and eta 3: 0, 1024, 4096."""
    top_steps = max(1, top_tokens // tokens_per_step)
    steps = [top_steps]
    while len(steps) < max_rungs - 1:
        below = int(steps[-1] / eta)
        if below < 1 or below == steps[-1]:
            break
        steps.append(below)
    return (0, *(s * tokens_per_step for s in reversed(steps)))


def quota(num: int, eta: int, keep_at_least: int = 1) -> int:
    """How many of `num` candidates a rung promotes: ceil(num / eta), at least `keep_at_least`, at most num."""
    return min(num, max(keep_at_least, math.ceil(num / eta)))


def _rng(seed: int) -> Any:
    import numpy as np

    return np.random.default_rng(seed)


def _resamples(num: int, seed: int, samples: int = BOOTSTRAP_SAMPLES) -> Any:
    """[samples, num] indices of sequences drawn with replacement (shared by every candidate of a rung: paired)."""
    return _rng(seed).integers(0, num, size=(samples, num))


def bootstrap_interval(values: Sequence[float], seed: int = 0, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of `values` (per validation sequence); (nan, nan) when empty."""
    import numpy as np

    data = np.asarray([v for v in values if math.isfinite(v)], dtype=float)
    if data.size == 0:
        return math.nan, math.nan
    means = data[_resamples(data.size, seed)].mean(axis=1)
    alpha = (1 - confidence) / 2
    return float(np.quantile(means, alpha)), float(np.quantile(means, 1 - alpha))


def _inseparable(a: Sequence[float], b: Sequence[float], seed: int, confidence: float = CONFIDENCE) -> bool:
    """Whether the paired bootstrap interval of mean(b - a) over the same sequences contains 0."""
    import numpy as np

    if not a or len(a) != len(b):
        return False
    diff = np.asarray(b, dtype=float) - np.asarray(a, dtype=float)
    if not np.all(np.isfinite(diff)):
        return False
    means = diff[_resamples(diff.size, seed)].mean(axis=1)
    alpha = (1 - confidence) / 2
    return bool(np.quantile(means, alpha) <= 0 <= np.quantile(means, 1 - alpha))


def _dominates(a: Sequence[float], b: Sequence[float]) -> bool:
    return all(x <= y for x, y in zip(a, b, strict=True)) and any(x < y for x, y in zip(a, b, strict=True))


def nondominated_fronts(points: Sequence[Sequence[float]]) -> list[list[int]]:
    """Indices of `points` (all objectives minimized) by non-dominated front: the Pareto set first."""
    remaining = list(range(len(points)))
    fronts: list[list[int]] = []
    while remaining:
        front = [i for i in remaining if not any(_dominates(points[j], points[i]) for j in remaining if j != i)]
        fronts.append(front)
        remaining = [i for i in remaining if i not in front]
    return fronts


def crowding_distance(points: Sequence[Sequence[float]], front: Sequence[int]) -> dict[int, float]:
    """NSGA-II crowding distance of each member of `front` (inf at the ends of every objective)."""
    distance = {i: 0.0 for i in front}
    if len(front) <= 2:
        return {i: math.inf for i in front}
    for k in range(len(points[front[0]])):
        order = sorted(front, key=lambda i: points[i][k])
        low, high = points[order[0]][k], points[order[-1]][k]
        distance[order[0]] = distance[order[-1]] = math.inf
        if high == low:
            continue
        for left, mid, right in zip(order, order[1:], order[2:], strict=False):
            distance[mid] += (points[right][k] - points[left][k]) / (high - low)
    return distance


@dataclass(frozen=True)
class Promotion:
    """A rung's decision: who continues, in order, and why the extra ones were kept."""

    promoted: tuple[str, ...]
    stopped: tuple[str, ...]
    quota: int
    tied: tuple[str, ...] = ()  # promoted beyond the quota: not separable from the last one within it
    ranks: Mapping[str, int] | None = None  # 1-based rank of every candidate in the rung


def promote(rows: Sequence[Mapping[str, Any]], objectives: Sequence[str], eta: int, *, keep_at_least: int = 1,
            seed: int = 0, seq_key: str | None = None) -> Promotion:
    """Promote the best of a rung's `rows` (each with `name`, the objectives and, for the interval rule, a list of
    per-sequence values under `seq_key`, e.g. `val_kl_seq`). Rows with a missing or non-finite objective (failed
    trials) are never promoted."""
    usable = [r for r in rows if finite_objectives(r, objectives) is not None]
    broken = [str(r["name"]) for r in rows if r not in usable]
    q = quota(len(usable), eta, keep_at_least) if usable else 0
    points = [[float(r[k]) for k in objectives] for r in usable]
    if len(objectives) == 1:
        order = sorted(range(len(usable)), key=lambda i: (points[i][0], str(usable[i]["name"])))
    else:
        order = []
        for front in nondominated_fronts(points):
            crowd = crowding_distance(points, front)
            order.extend(sorted(front, key=lambda i: (-crowd[i], points[i][0], str(usable[i]["name"]))))
    ranks = {str(usable[i]["name"]): rank for rank, i in enumerate(order, start=1)}
    keep = order[:q]
    tied: list[int] = []
    if len(objectives) == 1 and seq_key and keep:
        last = usable[keep[-1]].get(seq_key) or []
        for i in order[q: 2 * q]:
            if not _inseparable(list(last), list(usable[i].get(seq_key) or []), seed):
                break
            tied.append(i)
    promoted = [str(usable[i]["name"]) for i in keep + tied]
    stopped = [str(usable[i]["name"]) for i in order if str(usable[i]["name"]) not in promoted] + broken
    return Promotion(tuple(promoted), tuple(stopped), q, tuple(str(usable[i]["name"]) for i in tied), ranks)


def _ranks(values: Sequence[float]) -> list[float]:
    """Average ranks (ties share the mean rank), 1-based."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    """Spearman's rank correlation (Pearson on average ranks); nan below 2 points or with no variation."""
    if len(a) != len(b) or len(a) < 2:
        return math.nan
    ra, rb = _ranks(a), _ranks(b)
    ma, mb = sum(ra) / len(ra), sum(rb) / len(rb)
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb, strict=True))
    va = math.sqrt(sum((x - ma) ** 2 for x in ra))
    vb = math.sqrt(sum((y - mb) ** 2 for y in rb))
    return cov / (va * vb) if va and vb else math.nan


def kendall_tau(a: Sequence[float], b: Sequence[float]) -> float:
    """Kendall's tau-b; nan below 2 points or with no variation."""
    if len(a) != len(b) or len(a) < 2:
        return math.nan
    concordant = discordant = ties_a = ties_b = 0
    for i in range(len(a)):
        for j in range(i + 1, len(a)):
            da, db = a[i] - a[j], b[i] - b[j]
            if da == 0 and db == 0:
                continue
            if da == 0:
                ties_a += 1
            elif db == 0:
                ties_b += 1
            elif (da > 0) == (db > 0):
                concordant += 1
            else:
                discordant += 1
    denominator = math.sqrt((concordant + discordant + ties_a) * (concordant + discordant + ties_b))
    return (concordant - discordant) / denominator if denominator else math.nan


@dataclass(frozen=True)
class RungStats:
    """How a rung's ranking of the candidates it shares with the rung before compares with that rung's."""

    rung: int
    tokens: int
    num: int  # candidates scored at this rung
    spearman: float  # with the previous rung, over the candidates of this rung (nan at rung 0)
    kendall: float
    top1_same: bool | None  # the best of this rung was the best of these candidates at the previous rung
    topk_agreement: float  # |top-k here & top-k there| / k, k = `k` (the next rung's quota)
    k: int

    def to_dict(self) -> dict[str, Any]:
        return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in self.__dict__.items()}


def rung_stats(rung: int, tokens: int, now: Mapping[str, float], before: Mapping[str, float] | None,
               k: int) -> RungStats:
    """Compare the values `now` (name -> objective at this rung) with `before` (the previous rung's)."""
    if not before:
        return RungStats(rung, tokens, len(now), math.nan, math.nan, None, math.nan, k)
    names = sorted(n for n in now if n in before and math.isfinite(now[n]) and math.isfinite(before[n]))
    a, b = [before[n] for n in names], [now[n] for n in names]
    if not names:
        return RungStats(rung, tokens, len(now), math.nan, math.nan, None, math.nan, k)
    top_now = sorted(names, key=lambda n: now[n])
    top_before = sorted(names, key=lambda n: before[n])
    kk = max(1, min(k, len(names)))
    agreement = len(set(top_now[:kk]) & set(top_before[:kk])) / kk
    return RungStats(rung, tokens, len(now), spearman(a, b), kendall_tau(a, b), top_now[0] == top_before[0],
                     agreement, kk)


def stable(history: Sequence[RungStats], min_tau: float = 0.8, rungs: int = 2) -> bool:
    """The early-stop rule: the last `rungs` comparisons each kept the best and had Kendall tau >= `min_tau`."""
    recent = [s for s in history if s.top1_same is not None][-rungs:]
    return len(recent) == rungs and all(s.top1_same and s.kendall >= min_tau for s in recent)
