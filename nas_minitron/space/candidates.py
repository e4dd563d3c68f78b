"""Search spaces and the candidate architectures they hold near a parameter budget, from configs alone.

A `SearchSpace` lists the allowed values of each prunable axis (an explicit list, or multiples of a step between
bounds) plus a budget tolerance and optional deployment constraints. `enumerate_candidates` returns every allowed
student whose exact parameter count lies within the tolerance of the budget, without building a model and
without listing the cartesian product: parameters grow linearly in `intermediate_size`, so for each combination
of the other axes the in-budget intermediate sizes are one contiguous run, found by integer division and bisection.

Per-token metrics of a candidate (documented choices):
- `kv_bytes_per_token = 2 (K and V) * layers * KV heads * head_dim * 2 bytes (bf16)`.
- `flops_per_token` = forward FLOPs of one token at a context of `seq_len` tokens:
  `2 * (params - input embedding table) + 4 * layers * heads * head_dim * seq_len`. The first term is one
  multiply-add per weight the token meets (the lm_head included; with tied embeddings the shared table *is* the
  lm_head, so nothing is subtracted); the second is QK^T and attention-times-V against `seq_len` keys (the last
  token of a full window).
- memory (for `max_memory_bytes`) = `2 bytes * params + batch_size * seq_len * kv_bytes_per_token` (bf16 weights
  plus a full KV cache).
"""

from __future__ import annotations

import bisect
import dataclasses
import heapq
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

from nas_minitron.arch import ArchConfig, Invariants, count_params, prune_problems
from nas_minitron.errors import UserError
from nas_minitron.families import DecoderFamily, describe
from nas_minitron.space.spaces import (
    AXES,
    DEFAULT_SEQ_LEN,
    Axis,
    Constraints,
    SearchSpace,
    load_space,
    space_names,
    spaces_dir,
)

__all__ = [
    "AXES",
    "Axis",
    "CANDIDATE_COLUMNS",
    "Candidate",
    "Constraints",
    "SearchSpace",
    "axis_values",
    "best_pure_depth",
    "best_pure_width",
    "budget_window",
    "candidate_problem",
    "count_combinations",
    "default_space",
    "enumerate_candidates",
    "flops_per_token",
    "kv_bytes_per_token",
    "load_space",
    "space_names",
    "spaces_dir",
]

BF16_BYTES = 2
CANDIDATE_COLUMNS: tuple[str, ...] = ("name", *AXES, "head_dim", "params", "kv_bytes_per_token", "flops_per_token")
_NUM_NEAREST = 5


@dataclass(frozen=True)
class Candidate:
    """One allowed student near the budget; `distance_params = params - budget` (negative when under)."""

    arch: ArchConfig
    params: int
    kv_bytes_per_token: int
    flops_per_token: int
    distance_params: int

    @property
    def name(self) -> str:
        return self.arch.name

    @property
    def budget_params(self) -> int:
        return self.params - self.distance_params

    def row(self) -> dict[str, int | str]:
        """The `CANDIDATE_COLUMNS` of this candidate (the candidates.csv row)."""
        return {"name": self.name, **self.arch.to_dict(), "params": self.params,
                "kv_bytes_per_token": self.kv_bytes_per_token, "flops_per_token": self.flops_per_token}

    def to_dict(self) -> dict[str, Any]:
        return {**self.row(), "distance_params": self.distance_params}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Candidate:
        return cls(ArchConfig.from_dict(dict(data)), int(data["params"]), int(data["kv_bytes_per_token"]),
                   int(data["flops_per_token"]), int(data["distance_params"]))


class _Teacher(NamedTuple):
    family: DecoderFamily
    arch: ArchConfig
    inv: Invariants
    params: int


def _teacher(config: Mapping[str, Any]) -> _Teacher:
    family, arch = describe(config)
    inv = family.invariants_from_config(config)
    return _Teacher(family, arch, inv, count_params(arch, inv))


# ---- per-token metrics -------------------------------------------------------------------------------------
def kv_bytes_per_token(arch: ArchConfig) -> int:
    """bf16 KV-cache bytes one token occupies: K and V, every layer and KV head."""
    return _kv_bytes(arch.num_hidden_layers, arch.num_key_value_heads, arch.head_dim)


def _kv_bytes(num_layers: int, num_kv_heads: int, head_dim: int) -> int:
    return 2 * num_layers * num_kv_heads * head_dim * BF16_BYTES


def flops_per_token(arch: ArchConfig, inv: Invariants, seq_len: int = DEFAULT_SEQ_LEN) -> int:
    """Forward FLOPs of one token at a `seq_len` context (formula in the module docstring)."""
    return _flops(arch, inv, count_params(arch, inv), seq_len)


def _flops(arch: ArchConfig, inv: Invariants, params: int, seq_len: int) -> int:
    lookup_only = 0 if inv.tie_word_embeddings else inv.vocab_size * arch.hidden_size
    attention = 4 * arch.num_hidden_layers * arch.num_attention_heads * arch.head_dim * seq_len
    return 2 * (params - lookup_only) + attention


def _memory_bytes(params: int, kv_bytes: int, constraints: Constraints) -> int:
    return BF16_BYTES * params + constraints.batch_size * constraints.seq_len * kv_bytes


def _constraint_problem(arch: ArchConfig, params: int, flops: int, constraints: Constraints) -> str | None:
    kv_bytes = kv_bytes_per_token(arch)
    if constraints.max_kv_bytes_per_token is not None and kv_bytes > constraints.max_kv_bytes_per_token:
        return f"{kv_bytes:,} KV bytes/token exceed max_kv_bytes_per_token {constraints.max_kv_bytes_per_token:,}"
    if constraints.max_flops_per_token is not None and flops > constraints.max_flops_per_token:
        return f"{flops:,} FLOPs/token exceed max_flops_per_token {constraints.max_flops_per_token:,}"
    memory = _memory_bytes(params, kv_bytes, constraints)
    if constraints.max_memory_bytes is not None and memory > constraints.max_memory_bytes:
        return (f"{memory:,} bytes (bf16 weights + KV cache at batch {constraints.batch_size}, seq_len "
                f"{constraints.seq_len}) exceed max_memory_bytes {constraints.max_memory_bytes:,}")
    return None


# ---- axes and budgets -----------------------------------------------------------------------------------------
def default_space(teacher_config: Mapping[str, Any]) -> SearchSpace:
    """A space derived from any teacher: layers, hidden and heads down to 50%, intermediate down to 25%.

    Steps are the largest power of two dividing the teacher's value and at most 1/32 of it (Llama-3.1-8B:
    hidden 128, intermediate 256), fine enough to hold the published Minitron shapes; KV heads are the
    teacher's or half of them.
    """
    arch = _teacher(teacher_config).arch
    kv = arch.num_key_value_heads
    return SearchSpace(
        name="default",
        num_hidden_layers=Axis(multiple_of=1, max_prune_ratio=0.5),
        hidden_size=Axis(multiple_of=_default_step(arch.hidden_size), max_prune_ratio=0.5),
        intermediate_size=Axis(multiple_of=_default_step(arch.intermediate_size), max_prune_ratio=0.75),
        num_attention_heads=Axis(multiple_of=1, max_prune_ratio=0.5),
        num_key_value_heads=Axis(values=tuple(sorted({kv, kv // 2} - {0})) if kv % 2 == 0 else (kv,)),
    )


def _default_step(value: int) -> int:
    step = 1
    while value % (step * 2) == 0 and step * 2 <= max(1, value // 32):
        step *= 2
    return step


def axis_values(space: SearchSpace, teacher_arch: ArchConfig) -> dict[str, list[int]]:
    """The allowed values of each axis (ascending, none above the teacher's), keyed by HF field name."""
    return {name: space.axis(name).resolve(getattr(teacher_arch, name)) for name in AXES}


def count_combinations(space: SearchSpace, teacher_arch: ArchConfig) -> int:
    """Size of the space's cartesian product (what enumeration avoids listing)."""
    return math.prod(len(values) for values in axis_values(space, teacher_arch).values())


def budget_window(budget_params: int, tolerance: float) -> tuple[int, int]:
    """Inclusive parameter range [lo, hi] with |params - budget| <= tolerance * budget."""
    slack = tolerance * budget_params
    return math.ceil(budget_params - slack - 1e-6), math.floor(budget_params + slack + 1e-6)


def _check_budget(budget_params: int, teacher: _Teacher) -> None:
    if budget_params >= teacher.params:
        raise UserError(
            f"budget must be below the teacher's {teacher.params:,} parameters ({teacher.arch.name}), but got "
            f"{budget_params:,}; pass a smaller count like 0.5x."
        )


# ---- enumeration --------------------------------------------------------------------------------------------
class _Scan(NamedTuple):
    candidates: list[Candidate]
    smallest: Candidate | None  # the smallest allowed architecture, in budget or not
    nearest: list[Candidate]  # the closest allowed architectures just outside the window
    num_outer: int  # combinations of the non-intermediate axes examined
    num_counted: int  # architectures whose parameters were counted one by one


def _scan(space: SearchSpace, teacher: _Teacher, budget_params: int, tolerance: float,
          fixed: Mapping[str, Sequence[int]] | None = None) -> _Scan:
    """Walk (hidden, heads, KV) x layers; solve the budget window for intermediate_size.

    Parameters are affine in the layer count and, per layer, in intermediate_size, so three exact counts per
    width triple give every (layers, intermediate) count by arithmetic; records are built only in the window.
    """
    values = axis_values(space, teacher.arch)
    values.update({name: [v for v in allowed if v in values[name]] for name, allowed in (fixed or {}).items()})
    lo, hi = budget_window(budget_params, tolerance)
    inter, layer_counts = values["intermediate_size"], values["num_hidden_layers"]
    found: list[Candidate] = []
    outside: list[tuple[int, tuple[int, ...]]] = []
    smallest: Candidate | None = None
    num_outer = num_counted = 0
    kv_limit = space.constraints.max_kv_bytes_per_token
    for probe in _width_probes(values, teacher):  # layers 1, intermediate inter[0]
        one = count_params(probe, teacher.inv)
        per_layer = count_params(dataclasses.replace(probe, num_hidden_layers=2), teacher.inv) - one
        per_unit = count_params(dataclasses.replace(probe, intermediate_size=inter[0] + 1), teacher.inv) - one
        hidden, heads, kv = probe.hidden_size, probe.num_attention_heads, probe.num_key_value_heads
        for layers in layer_counts:
            if kv_limit is not None and _kv_bytes(layers, kv, probe.head_dim) > kv_limit:
                continue  # independent of intermediate_size
            num_outer += 1
            p0 = one + (layers - 1) * per_layer  # params at inter[0]
            slope = layers * per_unit
            # params(I) = p0 + slope * (I - inter[0]); the in-window I form one run [first, stop) of the list.
            first = bisect.bisect_left(inter, inter[0] - ((p0 - lo) // slope))
            stop = bisect.bisect_right(inter, inter[0] + (hi - p0) // slope)
            shape = (layers, hidden, 0, heads, kv, probe.head_dim)
            if smallest is None or p0 < smallest.params:
                smallest = _candidate(ArchConfig(*_with(shape, inter[0])), teacher, space, budget_params) or smallest
            for index in range(first, stop):
                num_counted += 1
                candidate = _candidate(ArchConfig(*_with(shape, inter[index])), teacher, space, budget_params)
                assert candidate is None or candidate.params == p0 + slope * (inter[index] - inter[0])
                if candidate is not None:
                    found.append(candidate)
            outside += [(abs(p0 + slope * (inter[i] - inter[0]) - budget_params), _with(shape, inter[i]))
                        for i in (first - 1, stop) if 0 <= i < len(inter)]
    nearest = [c for _, shape in heapq.nsmallest(4 * _NUM_NEAREST, outside)
               if (c := _candidate(ArchConfig(*shape), teacher, space, budget_params)) is not None][:_NUM_NEAREST]
    return _Scan(found, smallest, nearest, num_outer, num_counted)


def _with(shape: tuple[int, ...], intermediate_size: int) -> tuple[int, ...]:
    return shape[:2] + (intermediate_size,) + shape[3:]


def _width_probes(values: Mapping[str, list[int]], teacher: _Teacher) -> list[ArchConfig]:
    """One 1-layer probe per allowed (hidden, heads, KV): GQA-divisible, prunable, loadable by transformers."""
    if not values["intermediate_size"] or not values["num_hidden_layers"]:
        return []
    t = teacher.arch
    head_pairs = [
        (heads, kv) for heads in values["num_attention_heads"] for kv in values["num_key_value_heads"]
        if heads % kv == 0  # GQA: every KV head serves the same number of query heads
        and not prune_problems(ArchConfig(t.num_hidden_layers, t.hidden_size, t.intermediate_size, heads, kv,
                                          t.head_dim), t)
    ]
    probes = [ArchConfig(1, hidden, values["intermediate_size"][0], heads, kv, t.head_dim)
              for hidden in values["hidden_size"] for heads, kv in head_pairs]
    # Loadability depends on width alone; every axis value is at most the teacher's (axis_values).
    return [probe for probe in probes if teacher.family.loadable_problem(probe) is None]


def _candidate(arch: ArchConfig, teacher: _Teacher, space: SearchSpace, budget_params: int) -> Candidate | None:
    """The Candidate record of an allowed shape, or None if it breaks a constraint or is the teacher itself."""
    if arch == teacher.arch:
        return None
    params = count_params(arch, teacher.inv)
    flops = _flops(arch, teacher.inv, params, space.constraints.seq_len)
    if _constraint_problem(arch, params, flops, space.constraints) is not None:
        return None
    return Candidate(arch, params, kv_bytes_per_token(arch), flops, params - budget_params)


def _sorted(candidates: list[Candidate], max_count: int | None) -> list[Candidate]:
    def key(c: Candidate) -> tuple[int, int, str]:
        return abs(c.distance_params), c.params, c.name

    if max_count is not None:
        return heapq.nsmallest(max_count, candidates, key=key)
    return sorted(candidates, key=key)


def enumerate_candidates(
    space: SearchSpace,
    teacher_config: Mapping[str, Any],
    budget_params: int,
    tolerance: float | None = None,
    max_count: int | None = None,
) -> list[Candidate]:
    """Every allowed student within `tolerance` (default: the space's) of the budget, closest first.

    Allowed: in the space, prunable from the teacher (`prune_problems`), loadable by stock transformers
    (`loadable_problem`), GQA-divisible, within the constraints, and not the teacher itself. Raises UserError
    when the budget is at or above the teacher, below the smallest allowed student, or nothing lies within the
    tolerance (naming the nearest candidates).
    """
    teacher = _teacher(teacher_config)
    _check_budget(budget_params, teacher)
    tolerance = space.tolerance if tolerance is None else _check_tolerance(tolerance)
    if max_count is not None and max_count < 1:
        raise UserError(f"max_count must be a positive number of candidates, but got {max_count!r}.")
    scan = _scan(space, teacher, budget_params, tolerance)
    if not scan.candidates:
        raise UserError(_empty_message(scan, space, budget_params, tolerance))
    return _sorted(scan.candidates, max_count)


def _check_tolerance(tolerance: float) -> float:
    if not 0.0 <= tolerance < 1.0:
        raise UserError(f"tolerance must lie in [0, 1) (a fraction of the budget), but got {tolerance!r}.")
    return float(tolerance)


def _empty_message(scan: _Scan, space: SearchSpace, budget_params: int, tolerance: float) -> str:
    where = f"search space {space.name!r}"
    if scan.smallest is None:
        return f"{where} allows no architecture of this teacher under its constraints; relax them or widen the space."
    smallest = scan.smallest
    if smallest.params > budget_params:
        return (f"budget {budget_params:,} is below the smallest candidate of {where}: {smallest.name} with "
                f"{smallest.params:,} parameters; raise the budget or widen the space.")
    nearest = ", ".join(f"{c.name} ({c.params:,}, {c.distance_params / budget_params:+.1%})" for c in scan.nearest)
    nearest = nearest or "none next to the budget meets the constraints"
    return (f"no candidate of {where} lies within ±{tolerance:.1%} of the budget {budget_params:,}; nearest: "
            f"{nearest}; raise --tolerance or use a finer space.")


# ---- one architecture at a time (define-by-run search) ------------------------------------------------------
def candidate_problem(
    arch: ArchConfig,
    space: SearchSpace,
    teacher_config: Mapping[str, Any],
    budget_params: int,
    tolerance: float | None = None,
) -> str | None:
    """Why `arch` is not an in-budget candidate of `space` (None when it is one); what enumeration would say."""
    teacher = _teacher(teacher_config)
    tolerance = space.tolerance if tolerance is None else _check_tolerance(tolerance)
    values = axis_values(space, teacher.arch)
    problems = [f"{name}={getattr(arch, name)} is not allowed by search space {space.name!r}"
                for name in AXES if getattr(arch, name) not in values[name]]
    if arch == teacher.arch:
        problems.append(f"{arch.name} is the teacher itself")
    problems += prune_problems(arch, teacher.arch)
    loadable = teacher.family.loadable_problem(arch)
    if loadable:
        problems.append(loadable)
    params = count_params(arch, teacher.inv)
    constraint = _constraint_problem(arch, params, _flops(arch, teacher.inv, params, space.constraints.seq_len),
                                     space.constraints)
    if constraint:
        problems.append(constraint)
    lo, hi = budget_window(budget_params, tolerance)
    if not lo <= params <= hi:
        problems.append(f"{params:,} parameters lie outside ±{tolerance:.1%} of the budget {budget_params:,}")
    return "; ".join(problems) or None


def best_pure_width(space: SearchSpace, teacher_config: Mapping[str, Any], budget_params: int,
                    tolerance: float | None = None) -> Candidate | None:
    """The in-budget candidate closest to the budget that keeps every layer (prunes width axes only)."""
    teacher = _teacher(teacher_config)
    fixed = {"num_hidden_layers": [teacher.arch.num_hidden_layers]}
    return _best_fixed(space, teacher, budget_params, tolerance, fixed)


def best_pure_depth(space: SearchSpace, teacher_config: Mapping[str, Any], budget_params: int,
                    tolerance: float | None = None) -> Candidate | None:
    """The in-budget candidate closest to the budget that only drops layers (every width axis at the teacher's)."""
    teacher = _teacher(teacher_config)
    fixed = {name: [getattr(teacher.arch, name)] for name in AXES if name != "num_hidden_layers"}
    return _best_fixed(space, teacher, budget_params, tolerance, fixed)


def _best_fixed(space: SearchSpace, teacher: _Teacher, budget_params: int, tolerance: float | None,
                fixed: Mapping[str, Sequence[int]]) -> Candidate | None:
    _check_budget(budget_params, teacher)
    tolerance = space.tolerance if tolerance is None else _check_tolerance(tolerance)
    best = _sorted(_scan(space, teacher, budget_params, tolerance, fixed).candidates, 1)
    return best[0] if best else None
