"""The driver's trial records and what `--resume` builds from them: no Ray restore, nothing unpickled."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from nas_minitron.errors import UserError
from nas_minitron.search.protocol import TrialRecord, trial_record_path, trial_resume_dir
from nas_minitron.search.records import carry_checkpoints, load_records, save_record, trial_status


def _record(trial_id: str, status: str, name: str = "L2-H64", curve: tuple = ()) -> TrialRecord:  # type: ignore[type-arg]
    return TrialRecord(trial_id=trial_id, name=name, status=status, error="", metrics=curve[-1] if curve else {},
                       first=curve[0] if curve else {}, curve=curve)


def test_status_rule() -> None:
    assert trial_status({"final": True}, errored=False) == "COMPLETE"
    assert trial_status({"final": True}, errored=True) == "FAILED"
    assert trial_status({"failed": True, "final": True}, errored=False) == "FAILED"
    assert trial_status({"step": 2}, errored=False) == "PRUNED"


def test_records_round_trip_in_start_order_and_running_reads_as_interrupted(tmp_path: Path) -> None:
    curve = ({"step": 0, "val_kl": 1.5}, {"step": 4, "val_kl": math.nan, "final": True})
    save_record(tmp_path, _record("b", "RUNNING", curve=curve[:1]), started=2.0)
    save_record(tmp_path, _record("a", "COMPLETE", curve=curve), started=1.0)
    save_record(tmp_path, _record("b", "RUNNING", curve=curve))  # rewritten: keeps its start time
    loaded = load_records(tmp_path)
    assert [r.trial_id for r in loaded] == ["a", "b"]
    assert loaded[1].status == "INTERRUPTED" and len(loaded[1].curve) == 2
    assert loaded[0].curve[1]["val_kl"] is None  # NaN kept as JSON null, not as invalid JSON
    assert loaded[0].first == {"step": 0, "val_kl": 1.5}


def test_a_damaged_record_is_one_line_naming_it(tmp_path: Path) -> None:
    save_record(tmp_path, _record("a", "COMPLETE"))
    path = trial_record_path(tmp_path, "a")
    path.write_text("{not json")
    with pytest.raises(UserError, match=r"cannot read trial record .*a\.json.*not valid JSON"):
        load_records(tmp_path)
    path.write_text("[1, 2]")
    with pytest.raises(UserError, match="not a JSON object"):
        load_records(tmp_path)


def _ray_trial(experiment: Path, name: str, arch: str, steps: list[int]) -> None:
    folder = experiment / name
    folder.mkdir(parents=True)
    (folder / "params.json").write_text(json.dumps({"arch": arch}))
    for i, step in enumerate(steps):
        checkpoint = folder / f"checkpoint_{i:06d}"
        checkpoint.mkdir()
        (checkpoint / "state.json").write_text(json.dumps({"step": step}))
        (checkpoint / "weights.bin").write_bytes(b"x" * step)


def test_carry_checkpoints_keeps_the_newest_per_candidate(tmp_path: Path) -> None:
    run = tmp_path / "run"
    experiment = run / "ray" / "trials"
    _ray_trial(experiment, "t1", "A", [2, 4])
    _ray_trial(experiment, "t2", "A", [3])  # an earlier attempt of the same candidate
    _ray_trial(experiment, "t3", "B", [2])
    _ray_trial(experiment, "t4", "C", [2])  # C finished: its result is reused, no checkpoint needed
    (run / "trial_results").mkdir(parents=True)
    (run / "trial_results" / "C.json").write_text("{}")
    (experiment / "t5").mkdir()  # a trial folder without params (never started)
    (experiment / "t6").mkdir()
    (experiment / "t6" / "params.json").write_text(json.dumps({"arch": "D"}))
    (experiment / "t6" / "checkpoint_000000").mkdir()  # emptied by the cleaner: nothing to continue from
    assert carry_checkpoints(run, experiment) == ["A", "B"]
    assert json.loads((trial_resume_dir(run, "A") / "state.json").read_text())["step"] == 4
    assert (trial_resume_dir(run, "A") / "weights.bin").stat().st_size == 4
    assert not trial_resume_dir(run, "C").exists()
    # a later resume with an older checkpoint of A keeps the newer one carried before
    _ray_trial(run / "ray" / "again", "t7", "A", [1])
    assert carry_checkpoints(run, run / "ray" / "again") == ["A", "B"]
    assert json.loads((trial_resume_dir(run, "A") / "state.json").read_text())["step"] == 4


def test_reopen_unfinished_asks_cut_short_trials_again_once(tmp_path: Path) -> None:
    import optuna

    from nas_minitron.search.tune import STUDY_NAME, reopen_unfinished, study_storage_url

    url = study_storage_url(tmp_path, None)
    assert reopen_unfinished(url, pruned_is_final=False) is None  # no study yet: a fresh search
    study = optuna.create_study(study_name=STUDY_NAME, storage=url)
    dist = optuna.distributions.FloatDistribution(0.0, 1.0)

    def add(u: float, state: optuna.trial.TrialState, **attrs: object) -> None:
        study.add_trial(optuna.trial.create_trial(params={"u": u}, distributions={"u": dist}, state=state,
                                                  value=1.0 if state == optuna.trial.TrialState.COMPLETE else None,
                                                  user_attrs=dict(attrs)))

    add(0.1, optuna.trial.TrialState.COMPLETE)
    add(0.2, optuna.trial.TrialState.FAIL)  # failed for good (a NaN loss): finished
    add(0.3, optuna.trial.TrialState.FAIL, fatal=True)  # stopped by a fatal trial: asked again
    add(0.4, optuna.trial.TrialState.PRUNED)  # no scheduler prunes: interrupted, asked again
    running = study.ask({"u": dist})  # its driver died
    assert reopen_unfinished(url, pruned_is_final=False) == (2, 3)
    trials = optuna.load_study(study_name=STUDY_NAME, storage=url).trials
    assert trials[running.number].state.name == "FAIL" and trials[running.number].user_attrs["interrupted"]
    waiting = [t for t in trials if t.state.name == "WAITING"]
    assert sorted(t.user_attrs["retry_of"] for t in waiting) == [2, 3, running.number]
    # a second resume before any of them ran enqueues nothing twice
    assert reopen_unfinished(url, pruned_is_final=False) == (2, 0)
    # under ASHA a PRUNED trial is a decision, not an interruption
    assert reopen_unfinished(url, pruned_is_final=True) == (3, 0)
