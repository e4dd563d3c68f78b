"""Search-space records and their YAML files (`space/files/*.yaml`, package data).

File format (every key optional; an axis left out keeps the teacher's value, i.e. is not pruned):

    teacher: llama-3.1-8b          # the preset the file was written for (informational; tests use it)
    description: free text
    tolerance: 0.05                # |params - budget| <= tolerance * budget
    axes:                          # HF field names
      num_hidden_layers: {multiple_of: 1, max_prune_ratio: 0.5}   # step form: multiples of a step, bounded by
      hidden_size: {multiple_of: 128, min: 2048, max: 4096}       #   min/max or max_prune_ratio (max defaults to
      num_key_value_heads: [4, 8]                                 #   the teacher's value, always included)
    constraints:
      max_kv_bytes_per_token: 131072
      max_flops_per_token: 1.6e10
      max_memory_bytes: 16e9       # bf16 weights + KV cache at batch_size x seq_len
      batch_size: 1
      seq_len: 4096                # also the context of flops_per_token
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from nas_minitron.errors import UserError, first_line
from nas_minitron.families import describe

__all__ = ["AXES", "Axis", "Constraints", "SearchSpace", "load_space", "space_names", "spaces_dir"]

AXES: tuple[str, ...] = (
    "num_hidden_layers",
    "hidden_size",
    "intermediate_size",
    "num_attention_heads",
    "num_key_value_heads",
)
DEFAULT_TOLERANCE = 0.05
DEFAULT_SEQ_LEN = 4096
_AXIS_KEYS = ("values", "multiple_of", "min", "max", "max_prune_ratio")
_TOP_KEYS = ("teacher", "description", "tolerance", "axes", "constraints")


@dataclass(frozen=True)
class Axis:
    """The allowed values of one axis: an explicit list, or multiples of `multiple_of` between bounds."""

    values: tuple[int, ...] | None = None
    multiple_of: int = 1
    min_value: int | None = None  # lowest allowed value (exclusive with max_prune_ratio)
    max_value: int | None = None  # highest allowed value; default the teacher's
    max_prune_ratio: float | None = None  # lowest allowed = ceil(teacher * (1 - ratio))

    def resolve(self, teacher_value: int) -> list[int]:
        """Allowed values for a teacher whose axis is `teacher_value`, ascending, none above it.

        In the step form the teacher's value is included even when it is not a multiple of the step
        (keeping an axis whole is always allowed) unless `max_value` lies below it.
        """
        if self.values is not None:
            return sorted({v for v in self.values if v <= teacher_value})
        high = teacher_value if self.max_value is None else min(self.max_value, teacher_value)
        low = 1
        if self.min_value is not None:
            low = self.min_value
        elif self.max_prune_ratio is not None:
            low = math.ceil(teacher_value * (1.0 - self.max_prune_ratio) - 1e-9)
        step = self.multiple_of
        values = list(range(max(step, -(-low // step) * step), high + 1, step))
        if high == teacher_value and low <= teacher_value and teacher_value not in values:
            values.append(teacher_value)
        return values

    def to_dict(self) -> dict[str, Any]:
        if self.values is not None:
            return {"values": list(self.values)}
        data = {"multiple_of": self.multiple_of, "min": self.min_value, "max": self.max_value,
                "max_prune_ratio": self.max_prune_ratio}
        return {k: v for k, v in data.items() if v is not None}


@dataclass(frozen=True)
class Constraints:
    """Optional deployment limits; `batch_size` and `seq_len` set the memory (and FLOPs) context."""

    max_kv_bytes_per_token: int | None = None
    max_flops_per_token: int | None = None
    max_memory_bytes: int | None = None
    batch_size: int = 1
    seq_len: int = DEFAULT_SEQ_LEN


@dataclass(frozen=True)
class SearchSpace:
    """Allowed values per prunable axis, the budget tolerance and deployment constraints."""

    name: str
    num_hidden_layers: Axis
    hidden_size: Axis
    intermediate_size: Axis
    num_attention_heads: Axis
    num_key_value_heads: Axis
    tolerance: float = DEFAULT_TOLERANCE
    constraints: Constraints = Constraints()
    teacher: str | None = None  # the preset a file was written for
    source: str | None = None  # the YAML file it came from

    def axis(self, name: str) -> Axis:
        if name not in AXES:
            raise KeyError(name)
        axis: Axis = getattr(self, name)
        return axis

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (what the run's config.json records)."""
        return {"name": self.name, "source": self.source, "teacher": self.teacher, "tolerance": self.tolerance,
                "axes": {name: self.axis(name).to_dict() for name in AXES},
                "constraints": dataclasses.asdict(self.constraints)}


def spaces_dir() -> Path:
    """The shipped search spaces: `nas_minitron/space/files/` (package data)."""
    return Path(__file__).resolve().parent / "files"


def space_names() -> list[str]:
    """Names `--space` accepts besides a file path."""
    return sorted(path.stem for path in spaces_dir().glob("*.yaml"))


def load_space(path_or_name: str | Path, teacher_config: Mapping[str, Any]) -> SearchSpace:
    """Read and validate a search-space YAML file (a path or a shipped name) against the teacher's config.

    Every schema problem is collected and raised at once as a UserError naming the file, the field and the value.
    """
    path = _space_path(path_or_name)
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as err:
        raise UserError(f"search space {str(path)!r} could not be read: {first_line(err)}") from None
    _, teacher_arch = describe(teacher_config)
    problems: list[str] = []
    space = _parse_space(data if data is not None else {}, path, teacher_arch.to_dict(), problems)
    if problems or space is None:
        raise UserError(f"search space {str(path)!r}: " + "; ".join(problems))
    return space


def _space_path(path_or_name: str | Path) -> Path:
    text = str(path_or_name)
    path = Path(text).expanduser()
    if path.is_file():
        return path
    if text.endswith((".yaml", ".yml")) or "/" in text:
        raise UserError(f"search space file {text!r} does not exist.")
    shipped = spaces_dir() / f"{text}.yaml"
    if not shipped.is_file():
        raise UserError(f"unknown search space {text!r}; give a YAML file or one of: {', '.join(space_names())}.")
    return shipped


def _parse_space(data: Any, path: Path, teacher: Mapping[str, int], problems: list[str]) -> SearchSpace | None:
    if not isinstance(data, dict):
        problems.append(f"the file must hold a mapping with keys {', '.join(_TOP_KEYS)}, but got {data!r}")
        return None
    problems += [f"unknown key {key!r} (valid: {', '.join(_TOP_KEYS)})" for key in data if key not in _TOP_KEYS]
    tolerance = data.get("tolerance", DEFAULT_TOLERANCE)
    if isinstance(tolerance, bool) or not isinstance(tolerance, (int, float)) or not 0 <= tolerance < 1:
        problems.append(f"tolerance must be a fraction in [0, 1), but got {tolerance!r}")
        tolerance = DEFAULT_TOLERANCE
    axes_data = data.get("axes") or {}
    if not isinstance(axes_data, dict):
        problems.append(f"axes must be a mapping of {', '.join(AXES)}, but got {axes_data!r}")
        axes_data = {}
    problems += [f"axes.{key}: unknown axis (valid: {', '.join(AXES)})" for key in axes_data if key not in AXES]
    axes = {name: _parse_axis(axes_data[name], f"axes.{name}", teacher[name], problems) if name in axes_data
            else Axis(values=(teacher[name],)) for name in AXES}
    teacher_name = data.get("teacher")
    if teacher_name is not None and not isinstance(teacher_name, str):
        problems.append(f"teacher must be a preset name, but got {teacher_name!r}")
    return SearchSpace(name=path.stem, **axes, tolerance=float(tolerance),
                       constraints=_parse_constraints(data.get("constraints") or {}, problems),
                       teacher=teacher_name if isinstance(teacher_name, str) else None, source=str(path))


def _parse_axis(data: Any, field: str, teacher_value: int, problems: list[str]) -> Axis:
    before = len(problems)
    if isinstance(data, (list, tuple)) or (isinstance(data, dict) and "values" in data):
        raw = data["values"] if isinstance(data, dict) else data
        if isinstance(data, dict) and len(data) > 1:
            problems.append(f"{field}: give either values or a step (multiple_of/min/max/max_prune_ratio), "
                            f"not both, but got {data!r}")
        if not isinstance(raw, (list, tuple)) or not raw:
            problems.append(f"{field}.values must be a non-empty list of positive integers, but got {raw!r}")
            return Axis(values=(teacher_value,))
        values = tuple(v for v in (_int(x, f"{field}.values", problems) for x in raw) if v is not None)
        problems += [f"{field}.values: {v} exceeds the teacher's {teacher_value}" for v in values if v > teacher_value]
        return Axis(values=values) if len(problems) == before else Axis(values=(teacher_value,))
    if isinstance(data, int) and not isinstance(data, bool):
        return _parse_axis([data], field, teacher_value, problems)
    if not isinstance(data, dict):
        problems.append(f"{field} must be a list of values or a mapping with {', '.join(_AXIS_KEYS)}, "
                        f"but got {data!r}")
        return Axis(values=(teacher_value,))
    problems += [f"{field}: unknown key {key!r} (valid: {', '.join(_AXIS_KEYS)})" for key in data
                 if key not in _AXIS_KEYS]
    return _parse_step_axis(data, field, teacher_value, problems, before)


def _parse_step_axis(data: Mapping[str, Any], field: str, teacher_value: int, problems: list[str],
                     before: int) -> Axis:
    step = _int(data.get("multiple_of", 1), f"{field}.multiple_of", problems) or 1
    low = _int(data["min"], f"{field}.min", problems) if "min" in data else None
    high = _int(data["max"], f"{field}.max", problems) if "max" in data else None
    ratio = data.get("max_prune_ratio")
    if ratio is not None and (isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 <= ratio < 1):
        problems.append(f"{field}.max_prune_ratio must be a fraction in [0, 1), but got {ratio!r}")
        ratio = None
    if low is not None and ratio is not None:
        problems.append(f"{field}: give min or max_prune_ratio, not both, but got min={low!r}, "
                        f"max_prune_ratio={ratio!r}")
    if high is not None and high > teacher_value:
        problems.append(f"{field}.max: {high} exceeds the teacher's {teacher_value}")
    axis = Axis(multiple_of=step, min_value=low, max_value=high,
                max_prune_ratio=None if ratio is None else float(ratio))
    if len(problems) == before and not axis.resolve(teacher_value):
        problems.append(f"{field} allows no value at or below the teacher's {teacher_value}, but got {dict(data)!r}")
    return axis


def _parse_constraints(data: Any, problems: list[str]) -> Constraints:
    if not isinstance(data, dict):
        problems.append(f"constraints must be a mapping, but got {data!r}")
        return Constraints()
    names = [f.name for f in dataclasses.fields(Constraints)]
    problems += [f"constraints: unknown key {key!r} (valid: {', '.join(names)})" for key in data if key not in names]
    values = {key: _int(data[key], f"constraints.{key}", problems) for key in names if key in data}
    return Constraints(**{key: value for key, value in values.items() if value is not None})


def _int(value: Any, field: str, problems: list[str]) -> int | None:
    """A positive integer from YAML; accepts 16e9-style strings (YAML 1.1 reads `16e9` as text)."""
    number: Any = value
    if isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            number = None
    if isinstance(number, float) and math.isfinite(number) and number.is_integer():
        number = int(number)
    if isinstance(number, bool) or not isinstance(number, int) or number < 1:
        problems.append(f"{field} must be a positive integer, but got {value!r}")
        return None
    return number
