"""The trial contract: what the driver hands a trial, what a trial reports back, and the records built from it.

A leaf of `search/` with no third-party import: the driver (pipeline/), the Ray side (`tune.py`, `searcher.py`)
and the worker (`worker.py`) all import it, and nothing here imports them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nas_minitron.distill.config import DistillConfig

__all__ = ["FAILED_KEY", "FINAL_KEY", "SAMPLERS", "TRIAL_STATUSES", "Report", "TrialRecord", "TrialSpec",
           "trial_result_path"]

FAILED_KEY = "failed"  # a trial whose loss went non-finite reports this; Optuna is told FAIL
FINAL_KEY = "final"  # set on a trial's last report only; a trial stopped early never sends it
SAMPLERS = ("auto", "tpe", "nsga2", "random")  # auto: TPE for one objective, NSGA-II for several
TRIAL_STATUSES = ("COMPLETE", "PRUNED", "FAILED")

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
