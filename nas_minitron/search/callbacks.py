"""Driver-side Ray Tune hooks of the trials: log names, lean checkpoints, trial weights, the fatal stop.

Imports ray at module top (subclasses of its Callback and Stopper): `tune.py` reaches it only through a lazy proxy,
when a search starts. Tune pickles these objects into `tuner.pkl` when an experiment is created, but no experiment
is ever restored from it (`--resume` starts a fresh one from the project's own records), so nothing here needs to
survive a pickle but its settings.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from ray import tune
from ray.tune.experiment import Trial

from nas_minitron.search.protocol import FAILED_KEY, FATAL_KEY, TrialRecord, trial_log_path, trial_weights_path
from nas_minitron.search.records import CHECKPOINT_GLOB, save_record, trial_status
from nas_minitron.search.winners import pareto_front, select_winners

__all__ = ["CheckpointCleaner", "FatalStopper", "TrialLogNames", "TrialRecorder", "WeightsKeeper",
           "delete_trial_checkpoints"]


def delete_trial_checkpoints(trial_dir: str | Path) -> int:
    """Delete the contents of Ray's copies of one trial's checkpoints (`checkpoint_*` in its folder); returns how
    many held files.

    Each folder stays, empty (Ray's experiment state may still name it while the experiment runs); a trial that
    ended needs none: a later trial of its candidate reuses its result.
    """
    emptied = 0
    for folder in (p for p in Path(trial_dir).glob(CHECKPOINT_GLOB) if p.is_dir()):
        children = list(folder.iterdir())
        for child in children:
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child, ignore_errors=True)
            else:
                child.unlink(missing_ok=True)
        emptied += bool(children)
    return emptied


class TrialLogNames(tune.Callback):
    """Prints each trial's log file when it starts (trials write their output there, not to the console)."""

    def __init__(self, run_dir: str, log: Callable[[str], None] | None = None) -> None:
        self.run_dir, self.log = run_dir, log

    def __getstate__(self) -> dict[str, Any]:
        return {"run_dir": self.run_dir, "log": None}  # the run's log function need not pickle

    def on_trial_start(self, iteration: int, trials: list[Trial], trial: Trial, **info: Any) -> None:
        config = trial.config or {}
        batch = config.get("archs")
        if batch:  # a screening batch (rung 0): one log per candidate
            folder = trial_log_path(self.run_dir, "x").parent
            (self.log or print)(f"  trial {trial.trial_id} (screening {len(batch)}: {', '.join(batch)}) started; "
                                f"logs: {folder}/<arch>.log")
            return
        arch = config.get("arch", "?")
        (self.log or print)(f"  trial {trial.trial_id} ({arch}) started; log: {trial_log_path(self.run_dir, arch)}")


class TrialRecorder(tune.Callback):
    """Keeps each trial's record (`records.save_record`) current as its reports arrive, so that a driver killed
    at any point leaves every trial it ran, with every report it received, in the run directory."""

    def __init__(self, run_dir: str) -> None:
        self.run_dir = run_dir
        self.curves: dict[str, list[dict[str, Any]]] = {}
        self.started: dict[str, float] = {}

    def __getstate__(self) -> dict[str, Any]:
        return {"run_dir": self.run_dir, "curves": {}, "started": {}}

    def _save(self, trial: Trial, status: str, error: str = "") -> None:
        curve = self.curves.setdefault(trial.trial_id, [])
        config = trial.config or {}
        save_record(self.run_dir, TrialRecord(
            trial_id=trial.trial_id, name=config.get("arch"), status=status, error=error,
            metrics=curve[-1] if curve else {}, first=curve[0] if curve else {}, curve=tuple(curve),
        ), self.started.setdefault(trial.trial_id, time.time()))

    def on_trial_start(self, iteration: int, trials: list[Trial], trial: Trial, **info: Any) -> None:
        self._save(trial, "RUNNING")

    def on_trial_result(self, iteration: int, trials: list[Trial], trial: Trial, result: dict[str, Any],
                        **info: Any) -> None:
        self.curves.setdefault(trial.trial_id, []).append(
            {k: v for k, v in result.items() if k != "config"})
        self._save(trial, "RUNNING")

    def on_trial_complete(self, iteration: int, trials: list[Trial], trial: Trial, **info: Any) -> None:
        curve = self.curves.get(trial.trial_id) or [{}]
        self._save(trial, trial_status(curve[-1], errored=False))

    def on_trial_error(self, iteration: int, trials: list[Trial], trial: Trial, **info: Any) -> None:
        self._save(trial, "FAILED", "the trial raised an error; see its log")


class CheckpointCleaner(tune.Callback):
    """Deletes a trial's checkpoints in the run directory once it has ended (finished, stopped or failed for good).

    A trial Ray will retry is not ended (`on_trial_recover`, not `on_trial_error`), and an unfinished trial of a
    killed driver never reached these hooks: both keep their last checkpoint to resume from.
    """

    def on_trial_complete(self, iteration: int, trials: list[Trial], trial: Trial, **info: Any) -> None:
        if trial.path:
            delete_trial_checkpoints(trial.path)

    def on_trial_error(self, iteration: int, trials: list[Trial], trial: Trial, **info: Any) -> None:
        if trial.path:
            delete_trial_checkpoints(trial.path)


class WeightsKeeper(tune.Callback):
    """Keeps trial weights (`trial_weights_path`) only for candidates that can still win, as trials end.

    The contenders are the best `num_winners` by the objectives (`winners.select_winners`), plus the Pareto front
    when there are several: a candidate that falls out can never come back (more results only add better rows),
    so its weights are deleted at once. Reads every finished result (`trial_results/*.json`), so a restarted driver
    sees the trials of the one before it. `shape_objectives` holds the objectives that come from the candidate's
    shape (params, KV bytes, FLOPs), by arch name (`TrialSpec.shape_objectives`).
    """

    def __init__(self, run_dir: str, objectives: Sequence[str], num_winners: int,
                 shape_objectives: Mapping[str, Mapping[str, float]]) -> None:
        self.run_dir, self.objectives, self.num_winners = run_dir, list(objectives), num_winners
        self.shape_objectives = {k: dict(v) for k, v in shape_objectives.items()}

    def rows(self) -> list[dict[str, Any]]:
        """One row per finished candidate, as `select_winners` reads trials.csv."""
        rows = []
        for path in sorted((Path(self.run_dir) / "trial_results").glob("*.json")):
            try:
                record = json.loads(path.read_text())
            except (OSError, ValueError):
                continue
            final = record.get("final") or {}
            if final.get(FAILED_KEY):
                continue
            arch = str(record.get("arch", path.stem))
            rows.append({**final, **self.shape_objectives.get(arch, {}), "name": arch, "status": "COMPLETE"})
        return rows

    def contenders(self) -> set[str]:
        rows = self.rows()
        keep = {str(r["name"]) for r in select_winners(rows, self.objectives, self.num_winners)}
        if len(self.objectives) > 1:
            keep |= {str(r["name"]) for r in pareto_front(rows, self.objectives)}
        return keep

    def prune(self) -> list[str]:
        """Delete the weights of finished candidates that can no longer win; returns their names."""
        keep = self.contenders()
        dropped = []
        for row in self.rows():
            folder = trial_weights_path(self.run_dir, row["name"])
            if row["name"] not in keep and folder.is_dir():
                shutil.rmtree(folder, ignore_errors=True)
                dropped.append(row["name"])
        return dropped

    def on_trial_complete(self, iteration: int, trials: list[Trial], trial: Trial, **info: Any) -> None:
        self.prune()


class FatalStopper(tune.Stopper):
    """Ends the whole experiment when a trial reports `fatal` (it cannot run where it was placed, nor would others)."""

    def __init__(self) -> None:
        self.message: str | None = None

    def __call__(self, trial_id: str, result: dict[str, Any]) -> bool:
        if result.get(FATAL_KEY):
            self.message = self.message or str(result[FATAL_KEY])
            return True
        return False

    def stop_all(self) -> bool:
        return self.message is not None
