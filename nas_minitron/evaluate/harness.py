"""Benchmark scores through lm-eval: the teacher and its students on the same tasks, saved side by side.

`evaluate_model` runs `lm_eval.simple_evaluate` on an in-memory model (HFLM), so a freshly distilled student is
scored without a save/load round trip. Tasks are looked up in the bundled offline tasks
(`nas_minitron/evaluate/tasks/`), then any `include_path`, and only then in lm-eval's ~15k built-in tasks (indexing
those takes seconds, and most of them download their data from the Hugging Face hub).
"""

from __future__ import annotations

import difflib
import functools
import json
import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nas_minitron._lazy import lazy_import
from nas_minitron.atomic import atomic_directory
from nas_minitron.errors import UserError, first_line
from nas_minitron.evaluate.speed import SpeedResult
from nas_minitron.integrity import verify_checksums
from nas_minitron.teacher import load_teacher

if TYPE_CHECKING:
    import lm_eval
    import lm_eval.models.huggingface as lm_eval_hf
    import lm_eval.tasks as lm_eval_tasks
    import pandas as pd
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase
else:
    lm_eval = lazy_import("lm_eval")
    lm_eval_hf = lazy_import("lm_eval.models.huggingface")
    lm_eval_tasks = lazy_import("lm_eval.tasks")
    pd = lazy_import("pandas")

__all__ = [
    "DEFAULT_TASKS",
    "LOCAL_TASKS_DIR",
    "MINITRON_PRESET",
    "EvalResult",
    "evaluate_model",
    "find_tasks",
    "eval_table",
    "load_model",
    "read_eval",
    "resolve_tasks",
    "save_eval",
    "wide_table",
]

LOCAL_TASKS_DIR = Path(__file__).parent / "tasks"
DEFAULT_TASKS = "pydoc_next_sentence"
# The Minitron / LLM-pruning papers' benchmark set with their few-shot counts. All download from the hub.
MINITRON_PRESET: dict[str, int] = {
    "mmlu": 5,
    "hellaswag": 10,
    "winogrande": 5,
    "arc_challenge": 25,
    "truthfulqa_mc2": 0,
    "gsm8k": 5,
}
_PRESETS = {"minitron": MINITRON_PRESET}
_OFFLINE_VARS = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")


@dataclass(frozen=True)
class EvalResult:
    """Scores of one model: {task: {metric: value}}; metric names as lm-eval reports them, minus ",none"."""

    label: str
    params: int
    tasks: dict[str, dict[str, float]]
    path: str | None = None
    num_fewshot: dict[str, int | None] = field(default_factory=dict)
    limit: int | None = None
    wall_s: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, label: str, data: dict[str, Any]) -> EvalResult:
        return cls(
            label=label,
            params=int(data.get("params", 0)),
            tasks={t: {m: float(v) for m, v in ms.items()} for t, ms in data.get("tasks", {}).items()},
            path=data.get("path"),
            num_fewshot=dict(data.get("num_fewshot", {})),
            limit=data.get("limit"),
            wall_s=float(data.get("wall_s", 0.0)),
        )


def resolve_tasks(spec: str | Sequence[str], num_fewshot: int | None = None) -> dict[str, int | None]:
    """Task names (or a preset name) -> {task: few-shot count}; `num_fewshot` overrides every task's count."""
    names = [n.strip() for n in spec.split(",")] if isinstance(spec, str) else [str(n).strip() for n in spec]
    names = [n for n in names if n]
    if not names:
        raise UserError(f"no task given in {spec!r}; valid: a comma-separated list of task names or 'minitron'.")
    tasks: dict[str, int | None] = {}
    for name in names:
        preset = _PRESETS.get(name.lower())
        entries: dict[str, int | None] = dict(preset) if preset else {name: None}
        for task, shots in entries.items():
            tasks[task] = shots if num_fewshot is None else num_fewshot
    if num_fewshot is not None and num_fewshot < 0:
        raise UserError(f"--num-fewshot must be >= 0, but got {num_fewshot}.")
    return tasks


def _include_paths(include_path: str | os.PathLike[str] | None) -> list[str]:
    paths = [str(LOCAL_TASKS_DIR)]
    if include_path is not None:
        extra = Path(include_path).expanduser()
        if not extra.is_dir():
            raise UserError(f"--include-path {str(include_path)!r} is not a directory of lm-eval task YAML files.")
        paths.append(str(extra))
    return paths


@functools.lru_cache(maxsize=4)
def _indexed(paths: tuple[str, ...], include_defaults: bool) -> lm_eval_tasks.TaskManager:
    """Cached: indexing lm-eval's built-in tasks takes seconds, and the CLI checks names before loading a model."""
    return lm_eval_tasks.TaskManager(include_path=list(paths), include_defaults=include_defaults)


def find_tasks(
    names: Sequence[str], include_path: str | os.PathLike[str] | None = None
) -> tuple[lm_eval_tasks.TaskManager, set[str]]:
    """A TaskManager that knows every name in `names`, and the subset found locally (offline-safe).

    Unknown names raise a UserError suggesting close names from the task index.
    """
    paths = tuple(_include_paths(include_path))
    local = _indexed(paths, False)
    local_names = set(local.task_index)
    if all(name in local_names for name in names):
        return local, set(names)
    full = _indexed(paths, True)
    unknown = [name for name in names if name not in full.task_index]
    if unknown:
        hints = {name: difflib.get_close_matches(name, list(full.task_index), n=5, cutoff=0.6) for name in unknown}
        detail = "; ".join(
            f"{name!r} (did you mean {', '.join(h)}?)" if h else f"{name!r} (no close match)"
            for name, h in hints.items()
        )
        raise UserError(
            f"unknown lm-eval task {detail}; valid: 'minitron', the bundled {sorted(local_names)}, tasks under "
            f"--include-path, or an lm-eval task name (`lm-eval ls tasks`)."
        )
    return full, {name for name in names if name in local_names}


def load_model(
    spec: str | os.PathLike[str], device: str = "cpu", dtype: torch.dtype | None = None, verify: bool = False
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, str]:
    """A model directory (or any teacher spec, e.g. 'smollm2-135m') -> (model, tokenizer, label) in eval mode.

    A directory this project wrote is checked against its checksums.json first: sizes, and with `verify` sha256."""
    path = Path(spec).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file() or not any(path.glob("*.safetensors")):
            raise UserError(
                f"{str(spec)!r} is not a model directory: expected config.json and *.safetensors "
                f"(a Hugging Face save_pretrained directory)."
            )
        verify_checksums(path, "model file", "write it again (prune, distill or search)", full=verify)
        model, tokenizer = load_teacher(str(path), dtype=dtype, device=device, what="model")
        return model, tokenizer, path.resolve().name
    model, tokenizer = load_teacher(str(spec), dtype=dtype, device=device, what="model")
    return model, tokenizer, Path(str(spec)).name


def evaluate_model(
    model_or_path: PreTrainedModel | str | os.PathLike[str],
    tokenizer: PreTrainedTokenizerBase | None,
    tasks: str | Sequence[str],
    *,
    num_fewshot: int | None = None,
    limit: int | None = None,
    include_path: str | os.PathLike[str] | None = None,
    batch_size: int = 8,
    device: str = "cpu",
    label: str | None = None,
) -> EvalResult:
    """Score one model on lm-eval tasks (names or the 'minitron' preset); an in-memory model is moved to `device`."""
    if limit is not None and limit < 1:
        raise UserError(f"--limit must be a positive number of examples per task, but got {limit}.")
    if batch_size < 1:
        raise UserError(f"--batch-size must be >= 1, but got {batch_size}.")
    wanted = resolve_tasks(tasks, num_fewshot)
    manager, local_names = find_tasks(list(wanted), include_path)
    path: str | None = None
    if isinstance(model_or_path, (str, os.PathLike)):
        path = str(model_or_path)
        model, loaded_tokenizer, default_label = load_model(model_or_path, device=device)
        tokenizer = tokenizer or loaded_tokenizer
    else:
        model, default_label = model_or_path, "model"
        model.to(device)  # type: ignore[arg-type]  # transformers' wrapped `to` loses torch's signature
    if tokenizer is None:
        raise UserError("evaluate_model needs a tokenizer for an in-memory model.")
    model.eval()
    started = time.perf_counter()
    scores = _run_lm_eval(model, tokenizer, wanted, manager, set(wanted) - local_names, limit, batch_size)
    return EvalResult(
        label=label or default_label,
        params=sum(p.numel() for p in model.parameters()),  # parameters() yields tied weights once
        tasks=scores,
        path=path,
        num_fewshot=wanted,
        limit=limit,
        wall_s=round(time.perf_counter() - started, 3),
    )


def _run_lm_eval(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    wanted: dict[str, int | None],
    manager: lm_eval_tasks.TaskManager,
    hub_tasks: set[str],
    limit: int | None,
    batch_size: int,
) -> dict[str, dict[str, float]]:
    """One simple_evaluate call per distinct few-shot count (lm-eval takes a single count per call)."""
    lm = lm_eval_hf.HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    scores: dict[str, dict[str, float]] = {}
    for shots in sorted(set(wanted.values()), key=lambda s: -1 if s is None else s):
        names = [name for name, n in wanted.items() if n == shots]
        try:
            out = lm_eval.simple_evaluate(
                model=lm, tasks=names, num_fewshot=shots, limit=limit, task_manager=manager, log_samples=False
            )
        except (ConnectionError, OSError) as err:
            if not hub_tasks.intersection(names):
                raise
            raise UserError(_hub_hint(sorted(hub_tasks.intersection(names)), err)) from None
        scores.update(_task_metrics(out, names))
    return scores


def _hub_hint(names: list[str], err: BaseException) -> str:
    offline = [var for var in _OFFLINE_VARS if os.environ.get(var, "").lower() in ("1", "true", "yes")]
    why = f"this process is offline ({', '.join(v + '=1' for v in offline)})" if offline else "the hub is unreachable"
    first = first_line(err)
    return (
        f"tasks {', '.join(names)} download their data from the Hugging Face hub, but {why}: {first}. Run once "
        f"online to fill the datasets cache, or use the offline task --tasks {DEFAULT_TASKS} or --include-path DIR."
    )


def _task_metrics(out: dict[str, Any], names: Sequence[str]) -> dict[str, dict[str, float]]:
    """lm-eval's {"acc,none": 0.3, "alias": ...} per requested task (group scores for groups like mmlu)."""
    merged = dict(out.get("results", {}))
    merged.update(out.get("groups", {}) or {})
    metrics: dict[str, dict[str, float]] = {}
    for name in names:
        values = merged.get(name, {})
        metrics[name] = {
            key.removesuffix(",none"): float(value)
            for key, value in values.items()
            if "," in key and isinstance(value, (int, float)) and not isinstance(value, bool)
        }
    return metrics


def eval_table(results: Sequence[EvalResult]) -> pd.DataFrame:
    """Long table: model, params, task, metric, value (the eval/table.csv format)."""
    rows = [
        {"model": r.label, "params": r.params, "task": task, "metric": metric, "value": value}
        for r in results
        for task, metrics in r.tasks.items()
        for metric, value in metrics.items()
    ]
    return pd.DataFrame(rows, columns=["model", "params", "task", "metric", "value"])


def wide_table(long: pd.DataFrame) -> pd.DataFrame:
    """Teacher and students side by side: one row per (task, metric), one column per model (teacher first)."""
    if long.empty:
        return long
    table = long.pivot_table(index=["task", "metric"], columns="model", values="value", aggfunc="first", sort=False)
    order = sorted(table.columns, key=lambda label: (label != "teacher", list(long["model"]).index(label)))
    return table[order]


_SPEED_COLUMNS = [
    "model", "params", "batch_size", "seq_len", "prefill_tok_s", "decode_tok_s", "peak_mem_bytes", "kv_cache_bytes",
    "device", "num_decode_tokens", "prefill_s", "decode_s", "peak_mem_method", "dtype",
]  # fmt: skip


def read_eval(run_dir: str | os.PathLike[str]) -> tuple[list[EvalResult], pd.DataFrame]:
    """The evaluations and speed rows saved under `run_dir/eval/` (empty when there are none yet)."""
    eval_dir = Path(run_dir) / "eval"
    results: list[EvalResult] = []
    if (eval_dir / "results.json").is_file():
        models = json.loads((eval_dir / "results.json").read_text()).get("models", {})
        results = [EvalResult.from_dict(label, data) for label, data in models.items()]
    speed = pd.read_csv(eval_dir / "speed.csv") if (eval_dir / "speed.csv").is_file() else pd.DataFrame()
    return results, speed


def save_eval(
    run_dir: str | os.PathLike[str], results: Sequence[EvalResult], speeds: Sequence[SpeedResult] = ()
) -> Path:
    """Merge into `run_dir/eval/` (results.json, table.csv, speed.csv); same label replaces. Written atomically."""
    old_results, old_speed = read_eval(run_dir)
    merged = {r.label: r for r in old_results}
    merged.update({r.label: r for r in results})
    ordered = sorted(merged.values(), key=lambda r: r.label != "teacher")  # stable: teacher first
    speed = pd.DataFrame([s.to_dict() for s in speeds])
    if not old_speed.empty:
        replaced = set(speed["model"]) if not speed.empty else set()
        speed = pd.concat([old_speed[~old_speed["model"].isin(replaced)], speed], ignore_index=True)
    eval_dir = Path(run_dir) / "eval"
    with atomic_directory(eval_dir, overwrite=True) as tmp:
        for other in eval_dir.glob("*") if eval_dir.is_dir() else []:
            if other.is_file() and other.name not in ("results.json", "table.csv", "speed.csv"):
                shutil.copy2(other, tmp / other.name)  # keep files that others put there
        payload = {"models": {r.label: {k: v for k, v in r.to_dict().items() if k != "label"} for r in ordered}}
        (tmp / "results.json").write_text(json.dumps(payload, indent=2) + "\n")
        eval_table(ordered).to_csv(tmp / "table.csv", index=False)
        if not speed.empty:
            columns = [c for c in _SPEED_COLUMNS if c in speed.columns]
            speed[columns + [c for c in speed.columns if c not in columns]].to_csv(tmp / "speed.csv", index=False)
    return eval_dir
