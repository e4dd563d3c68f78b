"""The trial contract: what the driver hands a trial, what a trial reports back, and the records built from it.

A leaf of `search/` with no third-party import: the driver (pipeline/), the Ray side (`tune.py`, `searcher.py`)
and the worker (`worker.py`) all import it, and nothing here imports them.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nas_minitron.distill.config import DistillConfig

__all__ = ["FAILED_KEY", "FATAL_KEY", "FINAL_KEY", "PLACEMENT_KEYS", "SAMPLERS", "TRIAL_STATUSES", "Report",
           "TrialRecord", "TrialSpec", "rung_checkpoint_dir", "rung_result_path", "trial_log_path",
           "trial_record_path", "trial_result_path", "trial_resume_dir", "trial_scratch_dir", "trial_weights_path"]

FAILED_KEY = "failed"  # a trial whose loss went non-finite reports this; Optuna is told FAIL
FINAL_KEY = "final"  # set on a trial's last report only; a trial stopped early never sends it
# A trial that cannot run anywhere in this cluster (a reserved GPU that is not visible) reports its message under
# this key and ends; the driver then stops the whole search with that message (one line, exit 2) instead of
# letting every trial fail the same way.
FATAL_KEY = "fatal"
# What every report of a trial carries about where it ran: the torch device, Ray's GPU ids for the trial, the
# dtype of the student's parameters and the dtype its forward passes compute in.
PLACEMENT_KEYS = ("device", "gpu_ids", "param_dtype", "compute_dtype")
SAMPLERS = ("auto", "tpe", "nsga2", "random")  # auto: TPE for one objective, NSGA-II for several
# INTERRUPTED: a trial of an earlier driver that was still running when that driver died (`--resume` runs its
# candidate again, from its last checkpoint: `trial_resume_dir`)
TRIAL_STATUSES = ("COMPLETE", "PRUNED", "FAILED", "INTERRUPTED")

Report = Callable[[dict[str, Any], "Path | None"], None]
"""How a trial reports: metrics, and a checkpoint directory (or None)."""


@dataclass(frozen=True)
class TrialSpec:
    """Everything a trial needs, by path: shared by all trials, never recomputed in them."""

    run_dir: str
    teacher_dir: str
    importance_dir: str
    train_path: str
    val_path: str
    logit_cache_dir: str | None
    candidates: tuple[str, ...]
    head_dim: int
    distill: DistillConfig
    objectives: tuple[str, ...] = ("val_kl",)
    depth_method: str = "auto"
    rescale_norms: bool = True
    cpus_per_trial: int = 1
    gpus_per_trial: float = 0.0
    scratch_dir: str | None = None  # where a trial writes its checkpoints on its node; None: the system temp dir
    # The objectives that come from a candidate's shape (params, KV bytes, FLOPs per token), by arch name: every
    # report carries them, so that Optuna and the winner selection see every objective of a trial.
    shape_objectives: dict[str, dict[str, float]] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class TrialRecord:
    """One Ray trial as the search saw it: its status, its last and first reports, and every report in order."""

    trial_id: str
    name: str | None
    status: str  # one of TRIAL_STATUSES
    error: str
    metrics: Mapping[str, Any]
    first: Mapping[str, Any]
    curve: tuple[Mapping[str, Any], ...]


def trial_result_path(run_dir: str | Path, arch_name: str) -> Path:
    """Where a finished candidate's final metrics are kept, so a re-proposal is not retrained."""
    return Path(run_dir) / "trial_results" / f"{arch_name}.json"


def trial_weights_path(run_dir: str | Path, arch_name: str) -> Path:
    """Where a finished candidate's trained student is kept (from_pretrained-loadable, with its pruning plan), as
    long as it can still be a winner; written before its result JSON."""
    return Path(run_dir) / "trial_results" / arch_name


def trial_record_path(run_dir: str | Path, trial_id: str) -> Path:
    """Where the driver keeps what it saw of one Ray trial (`search/records.py`): trials.csv is rebuilt from these,
    so a driver killed at any point loses no row."""
    return Path(run_dir) / "trial_records" / f"{trial_id}.json"


def trial_resume_dir(run_dir: str | Path, arch_name: str) -> Path:
    """The newest training checkpoint of a candidate whose trial was interrupted with its driver (a trainer
    `step-*` folder, moved here from Ray's copies by `--resume`); the candidate's next trial continues from it."""
    return Path(run_dir) / "trial_resume" / arch_name


def rung_result_path(run_dir: str | Path, rung: int, arch_name: str) -> Path:
    """Where a candidate's result at one rung of the successive-halving search is kept (written once, atomically)."""
    return Path(run_dir) / "rungs" / f"rung-{rung}" / f"{arch_name}.json"


def rung_checkpoint_dir(run_dir: str | Path, arch_name: str) -> Path:
    """A candidate's training checkpoint between rungs (one `step-*` kept, with its pruning plan beside it), in
    the run directory so that a promoted candidate continues on whichever node Ray places it; deleted when the
    candidate is stopped or the search ends."""
    return Path(run_dir) / "rungs" / "checkpoints" / arch_name


def trial_log_path(run_dir: str | Path, arch_name: str) -> Path:
    """The log file of a candidate's trials: their stdout and stderr, appended (a restarted trial keeps its lines)."""
    return Path(run_dir) / "logs" / "trials" / f"{arch_name}.log"


def trial_scratch_dir(scratch_dir: str | None, run_dir: str | Path, trial_id: str) -> Path:
    """A trial's own checkpoint directory under `scratch_dir` (default: the system temp dir of the trial's node).

    Named by the run and the trial, so that a restarted trial finds and clears what a killed attempt left behind.
    """
    run_key = hashlib.sha256(str(Path(run_dir).resolve()).encode()).hexdigest()[:12]
    root = Path(scratch_dir) if scratch_dir else Path(tempfile.gettempdir())
    return root / f"nasm-trials-{os.getuid()}" / run_key / (trial_id or f"pid-{os.getpid()}")
