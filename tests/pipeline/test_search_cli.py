"""`nas-minitron search` end to end on a tiny teacher with a real local Ray cluster and a real Optuna study."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cli_helpers import TINY_SEARCH_ARGS, assert_streams_continue, search
from nas_minitron.pipeline.run_dir import STAGES


def rows(path: Path) -> list[dict[str, str]]:
    with path.open() as handle:
        return list(csv.DictReader(handle))


def study_trials(run_dir: Path) -> list:  # type: ignore[type-arg]
    import optuna

    study = optuna.load_study(study_name="nas-minitron", storage=f"sqlite:///{run_dir / 'optuna.db'}")
    return study.trials


@pytest.mark.slow  # --strategy sample; CI runs the default strategy end to end (test_rungs_cli.py)
def test_search_end_to_end(tiny_teacher_dir: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    run_dir = tmp_path / "run"
    result = search(tiny_teacher_dir, run_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Ray dashboard: http://127.0.0.1:" in result.stdout
    for name in ("config.json", "candidates.csv", "trials.csv", "trial_curves.csv", "winners.csv",
                 "importance/scores.safetensors", "logit_cache", "eval/results.json", "eval/table.csv",
                 "summary.json"):
        assert (run_dir / name).exists(), name
    trials = rows(run_dir / "trials.csv")
    assert len(trials) == 3 and all(t["status"] == "COMPLETE" for t in trials)
    candidates = {r["name"] for r in rows(run_dir / "candidates.csv")}
    assert {t["name"] for t in trials} <= candidates  # Optuna only proposes in-budget candidates
    # One Optuna trial per Ray trial, in real storage, with the same objective values
    study = study_trials(run_dir)
    assert sorted(t.user_attrs["ray_trial_id"] for t in study) == sorted(t["trial_id"] for t in trials)
    by_id = {t["trial_id"]: float(t["val_kl"]) for t in trials}
    assert all(abs(t.value - by_id[t.user_attrs["ray_trial_id"]]) < 1e-9 for t in study)
    # where each trial ran, and its log file (named in the console); no checkpoint left once the trials ended;
    # trial weights kept only for the winner (--winners 1)
    assert all((t["device"], t["param_dtype"], t["compute_dtype"]) == ("cpu", "float32", "float32") for t in trials)
    assert all(f"log: {run_dir.resolve() / t['log']}" in result.stdout for t in trials)
    assert all(f"trial {t['trial_id']} of {t['name']}" in (run_dir / t["log"]).read_text() for t in trials)
    assert not [p for p in (run_dir / "ray" / "trials").glob("*/checkpoint_*/**/*") if p.is_file()]
    marker = json.loads((run_dir / "stages" / "trials.json").read_text())
    assert marker["devices"] == ["cpu"] and marker["param_dtypes"] == ["float32"]
    kept = {p.name for p in (run_dir / "trial_results").iterdir() if p.is_dir()}
    assert kept <= {w["name"] for w in rows(run_dir / "winners.csv")}
    # the winners' stream follows the trials': a winner that continues from its trial never sees its data again
    assert_streams_continue(run_dir, full_tokens=128)
    # curves start at step 0 (the untrained ranking) and end at the last step
    curves = rows(run_dir / "trial_curves.csv")
    assert {c["step"] for c in curves} >= {"0", "4"}
    winner = rows(run_dir / "winners.csv")[0]
    best = min(trials, key=lambda t: float(t["val_kl"]))
    assert winner["name"] == best["name"]
    model = AutoModelForCausalLM.from_pretrained(run_dir / winner["path"])
    assert sum(p.numel() for p in model.parameters()) == int(winner["params"])
    distilled = json.loads((run_dir / winner["path"] / "distill.json").read_text())
    assert distilled["num_tokens"] >= 128 and distilled["curve"][0]["step"] == 0
    report = Path(json.loads((run_dir / "stages" / "report.json").read_text())["path"])
    assert report.is_file() and report.stat().st_size > 100_000
    # every stage is skipped on --resume
    again = search(tiny_teacher_dir, run_dir, "--resume")
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("done earlier, skipped") == len(STAGES) and "Ray dashboard" not in again.stdout


@pytest.mark.slow  # --strategy sample; the default strategy's resume is tested in test_rungs_cli.py
def test_nan_trial_fails_once_and_killed_trial_resumes(tiny_teacher_dir: Path, tmp_path: Path) -> None:
    from transformers import AutoConfig

    from nas_minitron.space.candidates import best_pure_width
    from nas_minitron.space.spaces import load_space

    config = AutoConfig.from_pretrained(tiny_teacher_dir).to_dict()
    baseline = best_pure_width(load_space("tiny", config), config, int(0.6 * 223_680)).name
    run_dir = tmp_path / "run"
    env = {"NAS_MINITRON_FAULT_NAN": baseline, "NAS_MINITRON_FAULT_KILL": "first"}
    result = search(tiny_teacher_dir, run_dir, "--max-concurrent", "1", env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    trials = rows(run_dir / "trials.csv")
    nan = [t for t in trials if t["name"] == baseline]
    assert len(nan) == 1 and nan[0]["status"] == "FAILED" and "step 1" in nan[0]["error"]
    assert baseline not in {w["name"] for w in rows(run_dir / "winners.csv")}
    states = {t.user_attrs["ray_trial_id"]: t.state.name for t in study_trials(run_dir)}
    assert states[nan[0]["trial_id"]] == "FAIL"
    # the NaN trial ran once: Ray recorded no failure for it, so it was not retried
    assert not (run_dir / "ray" / "trials" / _trial_dir(run_dir, nan[0]["trial_id"]) / "error.txt").exists()
    # the killed trial was restarted by Ray from its last checkpoint and finished
    assert (run_dir / "trial_results" / ".killed").exists()
    finished = [json.loads(p.read_text()) for p in (run_dir / "trial_results").glob("*.json")]
    resumed = [f for f in finished if f["final"]["resumed_from_step"] > 0]
    assert len(resumed) == 1 and resumed[0]["final"]["num_tokens"] == 256
    killed = [t for t in trials if t["name"] == resumed[0]["arch"]]
    assert killed[0]["status"] == "COMPLETE"
    assert (run_dir / "ray" / "trials" / _trial_dir(run_dir, killed[0]["trial_id"]) / "error.txt").exists()


def _trial_dir(run_dir: Path, trial_id: str) -> str:
    return next(p.name for p in (run_dir / "ray" / "trials").iterdir() if trial_id in p.name)


class _Crafted:
    """A pickle that writes a file when loaded: planted in the run directory, it must never be unpickled."""

    def __init__(self, target: Path) -> None:
        self.target = target

    def __reduce__(self) -> tuple:  # type: ignore[type-arg]
        return (Path.write_text, (self.target, "unpickled\n"))


@pytest.mark.slow  # --strategy sample; the default strategy's resume is tested in test_rungs_cli.py
def test_driver_killed_mid_search_is_finished_by_resume(tiny_teacher_dir: Path, tmp_path: Path) -> None:
    import hashlib
    import pickle
    import shutil

    run_dir = tmp_path / "run"
    command = [sys.executable, "-m", "nas_minitron", "search", "--teacher", str(tiny_teacher_dir), *TINY_SEARCH_ARGS,
               "--run-dir", str(run_dir), "--max-concurrent", "1"]
    # One trial finishes; the next stops after its first checkpoint (a test hook); then the driver is killed.
    driver = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
                              cwd=tmp_path, env={**os.environ, "NAS_MINITRON_FAULT_HANG": "after_one_result"})
    hung = run_dir / "trial_results" / ".hung"
    deadline = time.monotonic() + 1800  # an event, with a generous cap: the wait ends when the file appears
    while time.monotonic() < deadline and not hung.exists() and driver.poll() is None:
        time.sleep(0.5)
    assert hung.exists(), f"the second trial never reached its first checkpoint (driver exit {driver.poll()})"
    os.killpg(driver.pid, signal.SIGKILL)  # the driver and the Ray cluster it started
    driver.wait()
    assert not (run_dir / "stages" / "trials.json").exists()
    # The run directory is copied and the copy resumed, with a crafted pickle planted in Ray's experiment folder.
    moved = tmp_path / "moved"
    shutil.copytree(run_dir, moved, symlinks=True)
    original = run_dir / "optuna.db"
    digest = hashlib.sha256(original.read_bytes()).hexdigest()
    planted = tmp_path / "planted"
    for name in ("tuner.pkl", "searcher-state-crafted.pkl"):
        (moved / "ray" / "trials" / name).write_bytes(pickle.dumps(_Crafted(planted)))
    first = sorted((moved / "trial_results").glob("*.json"))
    assert len(first) == 1
    mtimes = {p.name: p.stat().st_mtime_ns for p in first}
    result = search(tiny_teacher_dir, moved, "--max-concurrent", "1", "--resume")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "1 trials finished before; 1 cut short are asked again (1 continue from a checkpoint); 2 to run" \
        in result.stdout
    assert not planted.exists()  # nothing from the run directory was unpickled
    assert hashlib.sha256(original.read_bytes()).hexdigest() == digest  # the original's study is untouched
    assert {p.name: p.stat().st_mtime_ns for p in first} == mtimes  # finished trials were not re-run
    trials = rows(moved / "trials.csv")
    statuses = sorted(t["status"] for t in trials)
    assert statuses == ["COMPLETE", "COMPLETE", "COMPLETE", "INTERRUPTED"], statuses
    interrupted = next(t for t in trials if t["status"] == "INTERRUPTED")
    again = [t for t in trials if t["name"] == interrupted["name"] and t["status"] == "COMPLETE"]
    assert again  # asked again first (a later proposal of the same candidate reuses its result)
    record = json.loads((moved / "trial_results" / f"{interrupted['name']}.json").read_text())
    assert record["final"]["resumed_from_step"] > 0  # it continued from the killed driver's checkpoint
    # no row lost: the interrupted trial's reports and the step-0 values of the trial that continued it
    curves = rows(moved / "trial_curves.csv")
    assert {c["step"] for c in curves if c["trial_id"] == interrupted["trial_id"]} >= {"0"}
    assert again[0]["val_kl_step0"] == interrupted["val_kl_step0"] != ""
    assert not (moved / "trial_resume").exists()
    # the Optuna study (in the moved run directory): 3 complete, the interrupted one FAIL, asked again once
    study = study_trials(moved)
    states = sorted(t.state.name for t in study)
    assert states == ["COMPLETE", "COMPLETE", "COMPLETE", "FAIL"], states
    failed = next(t for t in study if t.state.name == "FAIL")
    assert failed.user_attrs.get("interrupted")
    assert [t.user_attrs.get("retry_of") for t in study].count(failed.number) == 1


def test_bad_inputs_refused_before_any_output(tiny_teacher_dir: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    low = search(tiny_teacher_dir, run_dir, "--budget", "1000")
    assert low.returncode == 2 and "below the smallest candidate" in low.stderr and not run_dir.exists()
    ray = search(tiny_teacher_dir, run_dir, "--ray-address", "127.0.0.1:9")
    assert ray.returncode == 2 and "cannot reach the Ray cluster" in ray.stderr and not run_dir.exists()
    many = search(tiny_teacher_dir, run_dir, "--gpus-per-trial", "1")
    assert many.returncode == 2 and "GPUs" in many.stderr and not run_dir.exists()


def test_resume_with_other_settings_names_them(tiny_teacher_dir: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    saved = {"teacher": str(tiny_teacher_dir), "trials": 5, "seed": 1}
    (run_dir / "config.json").write_text(json.dumps(saved))
    (run_dir / "stages").mkdir()  # it finished a stage (a run that finished none may be started over)
    (run_dir / "stages" / "candidates.json").write_text("{}")
    result = search(tiny_teacher_dir, run_dir, "--resume")
    assert result.returncode == 2
    assert "trials: 5 -> 3" in result.stderr and "seed: 1 -> 0" in result.stderr


def _descendants(pid: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def _listening(pids: set[int]) -> list[str]:
    inodes: set[str] = set()
    for pid in pids:
        try:
            for fd in Path(f"/proc/{pid}/fd").iterdir():
                target = os.readlink(fd)
                if target.startswith("socket:["):
                    inodes.add(target[8:-1])
        except OSError:
            continue
    addresses = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            parts = line.split()
            if parts[3] == "0A" and parts[9] in inodes:  # 0A = LISTEN
                addresses.append(parts[1].split(":")[0])
    return addresses


_LISTENERS = """
import os, sys
from nas_minitron.search.tune import RayOptions, connect_ray
url = connect_ray(RayOptions(num_cpus=1))
import ray
sys.path[:0] = [sys.argv[1], os.path.dirname(sys.argv[1])]  # this file, and tests/ for cli_helpers
from test_search_cli import _descendants, _listening
print(url)
print(" ".join(_listening(_descendants(os.getpid()))))
ray.shutdown()
"""


@pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="needs Linux /proc")
def test_local_ray_listens_on_loopback_only() -> None:
    # A fresh interpreter: Ray reads its binding settings when it is first imported.
    result = subprocess.run([sys.executable, "-c", _LISTENERS, str(Path(__file__).parent)], capture_output=True,
                            text=True, timeout=300, check=True)
    url, addresses = result.stdout.strip().splitlines()[-2:]
    assert url.startswith("http://127.0.0.1:")
    found = set(addresses.split())
    assert found, "found no Ray listeners to check"
    # 127.0.0.1 as /proc/net/tcp writes it, and as tcp6 writes ::ffff:127.0.0.1 and ::1
    loopback = {"0100007F", "0000000000000000FFFF00000100007F", "00000000000000000000000001000000"}
    assert found <= loopback, found


@pytest.mark.slow  # --strategy sample only (ASHA crashed on every use until this test existed)
def test_asha_stops_losers_early_and_they_never_win(tiny_teacher_dir: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    result = search(tiny_teacher_dir, run_dir, "--asha", "--trials", "4", "--max-concurrent", "1",
                    "--evals-per-trial", "4")
    assert result.returncode == 0, result.stderr[-3000:]
    trials = rows(run_dir / "trials.csv")
    stopped = [t for t in trials if t["status"] == "PRUNED"]
    complete = [t for t in trials if t["status"] == "COMPLETE"]
    assert len(trials) == 4 and stopped and complete  # ASHA stopped at least one trial before its last step
    assert all(int(t["num_tokens"]) < 256 for t in stopped) and all(int(t["num_tokens"]) == 256 for t in complete)
    assert rows(run_dir / "winners.csv")[0]["name"] in {t["name"] for t in complete}
    states = {t.user_attrs["ray_trial_id"]: t.state.name for t in study_trials(run_dir)}  # one per Ray trial
    assert states == {t["trial_id"]: "PRUNED" if t["status"] == "PRUNED" else "COMPLETE" for t in trials}
