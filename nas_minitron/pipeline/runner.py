"""`nas-minitron search`: the one place that knows the stage order and the run directory.

Stages (each persisted, marked done in `stages/<stage>.json`, and skipped on `--resume`):
candidates → importance → logit_cache → trials → winners → distill → eval → report.
Candidates come first although the papers start from importance: they need only the config, so an unreachable
budget fails in a second instead of after the importance pass, and they tell importance which contiguous-block
sizes (layers dropped) to measure. The directory layout is described in README.md ("Run directory").
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from nas_minitron.atomic import write_json_atomic
from nas_minitron.errors import UserError
from nas_minitron.pipeline.settings import SearchSettings, differences

__all__ = ["STAGES", "Run", "run_search"]

STAGES = ("candidates", "importance", "logit_cache", "trials", "winners", "distill", "eval", "report")
Log = Callable[[str], None]


class Run:
    """The live state of one run: settings, run directory and the teacher's config (not a record)."""

    def __init__(self, settings: SearchSettings, run_dir: Path, resume: bool, log: Log) -> None:
        self.settings, self.dir, self.resume, self.log = settings, run_dir, resume, log
        self._teacher: Any = None

    def path(self, *parts: str) -> Path:
        return self.dir.joinpath(*parts)

    def done(self, stage: str) -> bool:
        return self.path("stages", f"{stage}.json").is_file()

    def mark(self, stage: str, wall_s: float, **extra: Any) -> None:
        write_json_atomic(self.path("stages", f"{stage}.json"),
                          {"stage": stage, "wall_s": round(wall_s, 3), "finished_at": _now(), **extra})

    def stage_info(self, stage: str) -> dict[str, Any]:
        return json.loads(self.path("stages", f"{stage}.json").read_text())

    @property
    def config(self) -> dict[str, Any]:
        return json.loads(self.path("config.json").read_text())

    def device(self) -> str:
        import torch

        if self.settings.device == "auto":
            return "cuda" if torch.cuda.is_available() else "cpu"
        if self.settings.device == "cuda" and not torch.cuda.is_available():
            raise UserError("--device cuda but no CUDA device is available; use --device cpu or auto.")
        return self.settings.device

    def teacher(self) -> tuple[Any, Any]:
        """The teacher and tokenizer, loaded once per driver process."""
        if self._teacher is None:
            from nas_minitron.teacher import load_teacher

            self._teacher = load_teacher(self.settings.teacher, self.settings.cache_dir, device=self.device())
        return self._teacher

    def sequences(self, split: str) -> Any:
        from nas_minitron.search.worker import load_sequences

        return load_sequences(self.path("data", f"{split}.safetensors"))


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _prepare(settings: SearchSettings, run_dir: Path, resume: bool) -> dict[str, Any]:
    """Check a new or resumed run directory and return the resolved config (written by `_create`)."""
    from nas_minitron.families import get_family
    from nas_minitron.arch import Budget, count_params
    from nas_minitron.teacher import load_teacher_config

    config_file = run_dir / "config.json"
    if resume:
        if not config_file.is_file():
            raise UserError(f"--resume: {str(run_dir)!r} holds no config.json of an earlier search.")
        changed = differences(json.loads(config_file.read_text()), settings)
        if changed:
            raise UserError(f"--resume: {str(run_dir)!r} was made with different settings: " + "; ".join(changed))
    elif run_dir.exists() and any(run_dir.iterdir()):
        raise UserError(f"run directory {str(run_dir)!r} already exists; pass --resume to continue it or choose "
                        f"another --run-dir.")
    budget = Budget.parse(settings.budget)
    teacher_config = load_teacher_config(settings.teacher, settings.cache_dir)
    family = get_family(teacher_config["model_type"])
    arch = family.arch_from_config(teacher_config)
    teacher_params = count_params(arch, family.invariants_from_config(teacher_config))
    resolved = {**settings.to_dict(), "budget_params": budget.resolve(teacher_params),
                "teacher_params": teacher_params, "teacher_arch": arch.name, "head_dim": arch.head_dim,
                "model_type": family.model_type, "vocab_size": int(teacher_config["vocab_size"])}
    if not resume:
        from nas_minitron.pipeline.stages import find_candidates

        find_candidates(settings, resolved["budget_params"])  # an unreachable budget fails before any output
    return resolved


def _lock(run_dir: Path):  # type: ignore[no-untyped-def]
    """Hold an exclusive lock on the run directory: two searches writing one directory would corrupt it."""
    import fcntl
    import os

    handle = (run_dir / ".lock").open("a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        handle.close()
        raise UserError(f"run directory {str(run_dir)!r} is in use by another search (pid {holder}).") from None
    handle.seek(0)
    handle.truncate()
    handle.write(str(os.getpid()))
    handle.flush()
    return handle


def _create(settings: SearchSettings, run_dir: Path, resolved: dict[str, Any]) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(run_dir / "config.json", resolved)
    write_json_atomic(run_dir / "summary.json", {"teacher": settings.teacher, "budget": settings.budget,
                                                 "data": settings.data, "started_at": _now(), "stage_wall_s": {}})


def run_search(settings: SearchSettings, run_dir: Path, resume: bool, log: Log = print) -> Path:
    """Run (or resume) every stage; returns the report's path."""
    from nas_minitron.pipeline import stages as search_stages

    resolved = _prepare(settings, run_dir, resume)
    log(f"run directory {run_dir} ({'resumed' if resume else 'new'}): teacher {resolved['teacher_arch']}, "
        f"budget {settings.budget} = {resolved['budget_params']:,} parameters")
    if not (run_dir / "stages" / "trials.json").is_file():
        search_stages.start_ray(settings, resolved, log)  # unreachable cluster or too small: refused up front
    if not resume:
        _create(settings, run_dir, resolved)
    lock = _lock(run_dir)
    run = Run(settings, run_dir, resume, log)
    try:
        _run_stages(run)
    finally:
        lock.close()
        import sys

        if "ray" in sys.modules:
            import ray

            ray.shutdown()
    return Path(run.stage_info("report")["path"])


def _run_stages(run: Run) -> None:
    from nas_minitron.pipeline import stages as search_stages

    stages: dict[str, Callable[[Run], dict[str, Any] | None]] = {
        "candidates": search_stages.candidates,
        "importance": search_stages.importance,
        "logit_cache": search_stages.logit_cache,
        "trials": search_stages.trials,
        "winners": search_stages.winners,
        "distill": search_stages.distill_winners,
        "eval": search_stages.evaluate,
        "report": search_stages.report,
    }
    for stage in STAGES:
        if run.done(stage):
            run.log(f"[{stage}] done earlier, skipped")
            continue
        run.log(f"[{stage}] ...")
        start = time.perf_counter()
        extra = stages[stage](run) or {}
        wall_s = time.perf_counter() - start
        run.mark(stage, wall_s, **extra)
        _update_summary(run, stage, wall_s)
        run.log(f"[{stage}] done in {wall_s:.1f} s")


def _update_summary(run: Run, stage: str, wall_s: float) -> None:
    summary = json.loads(run.path("summary.json").read_text())
    summary.setdefault("stage_wall_s", {})[stage] = round(wall_s, 3)
    if stage == STAGES[-1]:
        summary["finished_at"] = _now()
    write_json_atomic(run.path("summary.json"), summary)

