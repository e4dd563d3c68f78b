"""What the driver saw of each Ray trial, kept in the run directory as JSON: the source of trials.csv and of resume.

- `trial_status`: the one rule that turns a trial's last report (and whether Ray saw it error) into a status.
- `save_record` / `load_records`: one JSON per Ray trial (`trial_record_path`), written by the driver as reports
  arrive (`callbacks.TrialRecorder`) and again from Ray's result grid when the experiment ends. Every driver of a
  run adds its own, so the tables are rebuilt from all of them: a driver killed at any point loses no row. A
  record still RUNNING when read by a later driver belonged to a driver that died: it reads as INTERRUPTED.
- `carry_checkpoints`: before `--resume` starts a fresh Ray experiment, the newest trainer checkpoint of each
  candidate whose trial was cut short is moved out of Ray's copies into the project's own place
  (`trial_resume_dir`); the candidate's next trial continues from it. Only JSON is read from Ray's folders
  (`params.json`, the checkpoint's own `state.json`): nothing Ray pickled is ever loaded.

Pure Python (no ray): the callbacks and `tune.py` call it.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from nas_minitron.artifacts import artifact_error, reading
from nas_minitron.atomic import write_json_atomic
from nas_minitron.search.protocol import FAILED_KEY, FINAL_KEY, TrialRecord, trial_record_path, trial_resume_dir

__all__ = ["CHECKPOINT_GLOB", "carry_checkpoints", "load_records", "save_record", "trial_status"]

CHECKPOINT_GLOB = "checkpoint_*"  # Ray's copies of a trial's checkpoints, in the trial's folder of the run directory
_RUNNING = "RUNNING"
_STATE_FILE = "state.json"  # a trainer checkpoint's record (distill/checkpoint.py), written last


def trial_status(last: Mapping[str, Any], errored: bool) -> str:
    """FAILED (Ray saw an error, or the trial reported `failed`), COMPLETE (its last report is `final`), else
    PRUNED (stopped before its last step: by the scheduler, or with the experiment)."""
    if errored or last.get(FAILED_KEY):
        return "FAILED"
    return "COMPLETE" if last.get(FINAL_KEY) else "PRUNED"


def _plain(value: Any) -> Any:
    """JSON-safe: non-finite floats as None (JSON has none), anything else unknown as text."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def save_record(run_dir: str | Path, record: TrialRecord, started: float | None = None) -> None:
    """Write (or rewrite) one trial's record; `started` orders the records of a run (default: kept, else now)."""
    path = trial_record_path(run_dir, record.trial_id)
    if started is None:
        try:
            started = float(json.loads(path.read_text())["started"])
        except (OSError, ValueError, KeyError, TypeError):
            started = time.time()
    write_json_atomic(path, _plain({
        "trial_id": record.trial_id, "name": record.name, "status": record.status, "error": record.error,
        "started": started, "metrics": dict(record.metrics), "first": dict(record.first),
        "curve": [dict(p) for p in record.curve],
    }))


def load_records(run_dir: str | Path) -> list[TrialRecord]:
    """Every trial record of the run, in the order the trials started; a record left RUNNING is INTERRUPTED."""
    folder = trial_record_path(run_dir, "x").parent
    found: list[tuple[float, TrialRecord]] = []
    hint = "delete the file to drop that trial's row, or rerun the search in a new --run-dir"
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        with reading(path, "trial record", hint, extra=(TypeError, ValueError)):
            data = json.loads(path.read_text())
            if not isinstance(data, dict):
                raise artifact_error(path, "trial record", "not a JSON object", hint)
            status = str(data["status"])
            record = TrialRecord(
                trial_id=str(data["trial_id"]), name=data.get("name"),
                status="INTERRUPTED" if status == _RUNNING else status, error=str(data.get("error") or ""),
                metrics=dict(data.get("metrics") or {}), first=dict(data.get("first") or {}),
                curve=tuple(dict(p) for p in data.get("curve") or ()))
            found.append((float(data.get("started") or 0.0), record))
    return [record for _, record in sorted(found, key=lambda item: item[0])]


def _checkpoint_step(folder: Path) -> int | None:
    """The step of a trainer checkpoint folder (its state.json), or None when it holds none."""
    try:
        return int(json.loads((folder / _STATE_FILE).read_text())["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def carry_checkpoints(run_dir: str | Path, experiment_dir: str | Path) -> list[str]:
    """Move each candidate's newest trainer checkpoint out of Ray's experiment folder into `trial_resume_dir`.

    Per candidate (`arch` in a trial folder's params.json) the checkpoint with the highest step wins, against one
    carried by an earlier `--resume` too. Candidates with a finished result need none (their result is reused) and
    are skipped. Returns the candidates that now have a checkpoint to continue from.
    """
    best: dict[str, tuple[int, Path]] = {}
    for trial_dir in sorted(p for p in Path(experiment_dir).glob("*") if p.is_dir()):
        try:
            arch = str(json.loads((trial_dir / "params.json").read_text())["arch"])
        except (OSError, ValueError, KeyError, TypeError):
            continue  # not a trial folder, or one with no candidate (never started)
        if (Path(run_dir) / "trial_results" / f"{arch}.json").is_file():
            continue
        for folder in trial_dir.glob(CHECKPOINT_GLOB):
            step = _checkpoint_step(folder)
            if step is not None and step > best.get(arch, (-1, folder))[0]:
                best[arch] = (step, folder)
    for arch, (step, folder) in best.items():
        target = trial_resume_dir(run_dir, arch)
        kept = _checkpoint_step(target)
        if kept is not None and kept >= step:
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.exists():
            shutil.rmtree(target)
        try:
            os.replace(folder, target)
        except OSError:  # another filesystem: copy
            shutil.copytree(folder, target)
    return sorted(arch for arch in {*best, *(p.name for p in trial_resume_dir(run_dir, "x").parent.glob("*"))}
                  if _checkpoint_step(trial_resume_dir(run_dir, arch)) is not None)
