"""Search spaces and candidate enumeration, from config dicts alone (no model is built, no weights are read).

- `spaces`: the `SearchSpace` record and its YAML files (`space/files/*.yaml`, package data).
- `candidates`: every allowed student near a parameter budget, and its per-token metrics.
- `presets`: published teacher configs by short name (`space/presets/*.json`), and `resolve_teacher_config`.

May import the leaf modules (arch, errors, teacher) and families; never torch or transformers at import time, so
`nas-minitron candidates --teacher llama-3.1-70b` plans on a laptop (transformers loads only to read a real
teacher directory or config.json).
"""

from __future__ import annotations

from nas_minitron.space.candidates import (
    CANDIDATE_COLUMNS,
    Candidate,
    axis_values,
    best_pure_depth,
    best_pure_width,
    budget_window,
    candidate_problem,
    count_combinations,
    default_space,
    enumerate_candidates,
    flops_per_token,
    kv_bytes_per_token,
)
from nas_minitron.space.presets import load_preset, preset_names, resolve_teacher_config
from nas_minitron.space.spaces import AXES, Axis, Constraints, SearchSpace, load_space, space_names, spaces_dir

__all__ = [
    "AXES",
    "CANDIDATE_COLUMNS",
    "Axis",
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
    "load_preset",
    "load_space",
    "preset_names",
    "resolve_teacher_config",
    "space_names",
    "spaces_dir",
]
