"""`nas-minitron search`: runs the stages in `run_dir.STAGES` order, each persisted and marked done in
`stages/<stage>.json`, skipped on `--resume`; refuses a run before any output when its settings, budget or cluster
cannot work (pre-flight), and holds the run directory's lock while it runs."""

from __future__ import annotations

import fcntl
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from nas_minitron.arch import Budget, count_params
from nas_minitron.atomic import write_json_atomic
from nas_minitron.errors import UserError
from nas_minitron.families import describe
from nas_minitron.pipeline import stages
from nas_minitron.pipeline.run_dir import STAGES, Log, Run, now
from nas_minitron.pipeline.settings import SearchSettings, differences
from nas_minitron.teacher import load_teacher_config

__all__ = ["run_search"]

# The stage functions, by the names STAGES gives them (run_dir.STAGES owns the order).
STAGE_FUNCTIONS: dict[str, Callable[[Run], dict[str, Any] | None]] = {
    "candidates": stages.candidates,
    "importance": stages.importance,
    "logit_cache": stages.logit_cache,
    "trials": stages.trials,
    "winners": stages.winners,
    "distill": stages.distill_winners,
    "eval": stages.evaluate,
    "report": stages.report,
}
assert tuple(STAGE_FUNCTIONS) == STAGES, "every stage has one function, in run order"


def _prepare(settings: SearchSettings, run_dir: Path, resume: bool) -> dict[str, Any]:
    """Check a new or resumed run directory and return the resolved config (written by `_create`)."""
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
    family, arch = describe(teacher_config)
    teacher_params = count_params(arch, family.invariants_from_config(teacher_config))
    resolved = {**settings.to_dict(), "budget_params": budget.resolve(teacher_params),
                "teacher_params": teacher_params, "teacher_arch": arch.name, "head_dim": arch.head_dim,
                "model_type": family.model_type, "vocab_size": int(teacher_config["vocab_size"])}
    if not resume:
        stages.find_candidates(settings, resolved["budget_params"])  # an unreachable budget fails before any output
    return resolved


def _lock(run_dir: Path) -> IO[str]:
    """Hold an exclusive lock on the run directory: two searches writing one directory would corrupt it."""
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
                                                 "data": settings.data, "started_at": now(), "stage_wall_s": {}})


def run_search(settings: SearchSettings, run_dir: Path, resume: bool, log: Log = print) -> Path:
    """Run (or resume) every stage; returns the report's path."""
    resolved = _prepare(settings, run_dir, resume)
    log(f"run directory {run_dir} ({'resumed' if resume else 'new'}): teacher {resolved['teacher_arch']}, "
        f"budget {settings.budget} = {resolved['budget_params']:,} parameters")
    if not (run_dir / "stages" / "trials.json").is_file():
        stages.start_ray(settings, resolved, log)  # unreachable cluster or too small: refused up front
    if not resume:
        _create(settings, run_dir, resolved)
    lock = _lock(run_dir)
    run = Run(settings, run_dir, resume, log)
    try:
        _run_stages(run)
    finally:
        lock.close()
        stages.stop_ray()
    return Path(run.stage_info("report")["path"])


def _run_stages(run: Run) -> None:
    for stage in STAGES:
        if run.done(stage):
            run.log(f"[{stage}] done earlier, skipped")
            continue
        run.log(f"[{stage}] ...")
        start = time.perf_counter()
        extra = STAGE_FUNCTIONS[stage](run) or {}
        wall_s = time.perf_counter() - start
        run.mark(stage, wall_s, **extra)
        _update_summary(run, stage, wall_s)
        run.log(f"[{stage}] done in {wall_s:.1f} s")


def _update_summary(run: Run, stage: str, wall_s: float) -> None:
    summary = json.loads(run.path("summary.json").read_text())
    summary.setdefault("stage_wall_s", {})[stage] = round(wall_s, 3)
    if stage == STAGES[-1]:
        summary["finished_at"] = now()
    write_json_atomic(run.path("summary.json"), summary)

