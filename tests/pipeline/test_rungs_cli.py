"""`nas-minitron search --strategy rungs` (the default) end to end on a tiny teacher, a real local Ray cluster and a
real Optuna study: screening, successive halving with continuation, resume after a driver kill mid-rung."""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cli_helpers import TINY_RUNG_ARGS, assert_streams_continue, one_error_line, run_cli


def rows(path: Path) -> list[dict[str, str]]:
    with path.open() as handle:
        return list(csv.DictReader(handle))


def rung_search(teacher: Path, run_dir: Path, *extra: str, timeout: int = 900) -> subprocess.CompletedProcess[str]:
    return run_cli("search", "--teacher", str(teacher), *TINY_RUNG_ARGS, "--run-dir", str(run_dir), *extra,
                   timeout=timeout, cwd=run_dir.parent)


def _unpromoted_curve(run_dir: Path, arch: str, scratch: Path) -> list[dict[str, object]]:
    """The same candidate distilled for the top rung in one go (no rungs), with the search's own trial spec."""
    from nas_minitron.pipeline.halving_stage import halving_spec
    from nas_minitron.pipeline.run_dir import Run
    from nas_minitron.pipeline.settings import SearchSettings, resolve_settings
    from nas_minitron.search.worker import run_candidate

    config = json.loads((run_dir / "config.json").read_text())
    fields = {f.name for f in dataclasses.fields(SearchSettings)}
    run = Run(resolve_settings(None, {k: v for k, v in config.items() if k in fields}), run_dir, resume=True,
              log=lambda _m: None)
    spec = halving_spec(run)
    spec = dataclasses.replace(spec, run_dir=str(scratch),
                               distill=dataclasses.replace(spec.distill, eval_every_tokens=64))
    points: list[dict[str, object]] = []
    run_candidate(arch, spec, lambda metrics, _ckpt: points.append(dict(metrics)), None)
    return points


def test_rung_search_end_to_end(tiny_teacher_dir: Path, tmp_path: Path) -> None:
    import optuna
    from transformers import AutoModelForCausalLM

    run_dir = tmp_path / "run"
    result = rung_search(tiny_teacher_dir, run_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    candidates = [r["name"] for r in rows(run_dir / "candidates.csv")]
    rung_rows = rows(run_dir / "rungs.csv")
    by_rung: dict[int, list[dict[str, str]]] = {}
    for row in rung_rows:
        by_rung.setdefault(int(row["rung"]), []).append(row)
    # rung 0 screens every candidate untrained; eta 2 keeps ceil(n / 2) (more only when inseparable)
    assert sorted(r["name"] for r in by_rung[0]) == sorted(candidates)
    assert sorted(by_rung) == [0, 1, 2] and [by_rung[k][0]["tokens"] for k in (0, 1, 2)] == ["0", "64", "256"]
    for rung in (0, 1):
        promoted = {r["name"] for r in by_rung[rung] if r["promoted"] == "True"}
        assert promoted == {r["name"] for r in by_rung[rung + 1]}
        quota = -(-len(by_rung[rung]) // 2)
        assert quota <= len(promoted) <= 2 * quota
        # the promoted are the best of their rung
        worst_promoted = max(float(r["val_kl"]) for r in by_rung[rung] if r["name"] in promoted)
        assert all(float(r["val_kl"]) >= worst_promoted for r in by_rung[rung] if r["name"] not in promoted)
    assert all(r["ci_low"] and float(r["ci_low"]) <= float(r["val_kl"]) <= float(r["ci_high"]) for r in rung_rows)
    # trials.csv: one row per candidate; only the last rung's are COMPLETE, the stopped ones PRUNED; they never win
    trials = {t["name"]: t for t in rows(run_dir / "trials.csv")}
    assert set(trials) == set(candidates)
    finalists = {r["name"] for r in by_rung[2]}
    assert {n for n, t in trials.items() if t["status"] == "COMPLETE"} == finalists
    winners = rows(run_dir / "winners.csv")
    assert winners[0]["name"] == min(by_rung[2], key=lambda r: float(r["val_kl"]))["name"]
    assert winners[0]["source"] == "trial" and winners[0]["tokens_seen"] == "256"
    assert_streams_continue(run_dir, full_tokens=128)
    model = AutoModelForCausalLM.from_pretrained(run_dir / winners[0]["path"])
    assert sum(p.numel() for p in model.parameters()) == int(winners[0]["params"])
    # lean: no rung checkpoint left, trial weights only for the winner, nothing in Ray's folders but its state
    assert not (run_dir / "rungs" / "checkpoints").exists()
    assert {p.name for p in (run_dir / "trial_results").iterdir() if p.is_dir()} == {winners[0]["name"]}
    # one Optuna trial per candidate: rung values as intermediate values, stopped ones PRUNED
    study = optuna.load_study(study_name="nas-minitron", storage=f"sqlite:///{run_dir / 'optuna.db'}")
    by_arch = {t.user_attrs["arch"]: t for t in study.trials}
    assert set(by_arch) == set(candidates)
    for name, trial in by_arch.items():
        reached = [r for r in rung_rows if r["name"] == name]
        assert sorted(trial.intermediate_values) == sorted(int(r["tokens"]) for r in reached)
        expected = "COMPLETE" if name in finalists else "PRUNED"
        assert trial.state.name == expected, (name, trial.state)
    stats = rows(run_dir / "rung_stats.csv")
    assert [s["rung"] for s in stats] == ["0", "1", "2"] and stats[1]["spearman"] != ""
    assert sum(int(s["new_tokens"]) for s in stats) == 64 * len(by_rung[1]) + 192 * len(by_rung[2])
    # a promoted candidate's curve is the one it has when distilled for the whole top rung without rungs
    arch = winners[0]["name"]
    curve = _unpromoted_curve(run_dir, arch, tmp_path / "plain")
    at = {int(p["num_tokens"]): float(p["val_kl"]) for p in curve}  # type: ignore[arg-type]
    for rung in (1, 2):
        mine = next(r for r in by_rung[rung] if r["name"] == arch)
        assert abs(at[int(mine["tokens"])] - float(mine["val_kl"])) < 1e-6, (rung, at, mine)
    page = Path(json.loads((run_dir / "stages" / "report.json").read_text())["path"]).read_text()
    assert page.index('id="answer"') < page.index('id="summary"') and f"Pick: {arch}" in page
    assert 'id="rungs"' in page and "Rank over rungs" in page


def test_driver_killed_mid_rung_redoes_no_finished_rung(tiny_teacher_dir: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    # 4 candidates (4 -> 2 -> 1 trials): rung 1 runs one candidate at a time, so the kill lands between its two
    few = ("--max-candidates", "4", "--stop-after", "trials")
    command = [sys.executable, "-m", "nas_minitron", "search", "--teacher", str(tiny_teacher_dir), *TINY_RUNG_ARGS,
               "--run-dir", str(run_dir), "--max-concurrent", "1", *few]
    driver = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True, cwd=tmp_path)
    rung1 = run_dir / "rungs" / "rung-1"
    deadline = time.monotonic() + 1800  # a cap on an event-driven wait, several times its loaded duration
    while time.monotonic() < deadline and len(list(rung1.glob("*.json"))) < 1 and driver.poll() is None:
        time.sleep(0.3)
    os.killpg(driver.pid, signal.SIGKILL)  # the driver and the Ray cluster it started, in the middle of rung 1
    driver.wait()
    assert list(rung1.glob("*.json")), "rung 1 did not start before the deadline"
    finished = {p: p.read_bytes() for p in (run_dir / "rungs").glob("rung-*/*.json")}
    mtimes = {p: p.stat().st_mtime_ns for p in finished}
    result = rung_search(tiny_teacher_dir, run_dir, *few, "--resume")  # --max-concurrent may change on resume
    assert result.returncode == 0, result.stderr[-3000:]
    assert all(p.read_bytes() == finished[p] and p.stat().st_mtime_ns == mtimes[p] for p in finished)
    assert "rung 0 (" not in result.stdout  # rung 0 finished before the kill: not run again
    rung_rows = rows(run_dir / "rungs.csv")
    assert {int(r["rung"]) for r in rung_rows} == {0, 1, 2}


def test_bad_rung_settings_refused_before_any_output(tiny_teacher_dir: Path, tmp_path: Path) -> None:
    from nas_minitron.errors import UserError
    from nas_minitron.pipeline.settings import resolve_settings

    run_dir = tmp_path / "run"
    # through the CLI: one line, exit 2, no run directory (the settings check and the candidate-count check)
    for extra, words in ((("--rungs", "0,256,64"), "must increase"),
                         (("--screen", "999"), "--screen 999 must be between")):
        line = one_error_line(rung_search(tiny_teacher_dir, run_dir, *extra))
        assert words in line, (extra, line)
        assert not run_dir.exists()
    # the other refusals come from the same settings check, in process
    base = {"seq_len": 32, "batch_size": 2, "short_tokens": 256}
    for overrides, words in (({"rungs": "0,64,512"}, "above --short-tokens"), ({"eta": 1}, "eta must be >= 2"),
                             ({"screen": 0}, "screen (0) must be at least winners"),
                             ({"asha": True}, "asha belongs to --strategy sample")):
        with pytest.raises(UserError, match=re.escape(words)):
            resolve_settings(None, {**base, **overrides})


@pytest.mark.slow  # the sampler-chosen screening; the default screens every candidate
def test_screen_lets_the_sampler_choose_which_candidates_rung_0_scores(tiny_teacher_dir: Path,
                                                                       tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    result = rung_search(tiny_teacher_dir, run_dir, "--screen", "4", "--rungs", "0,64", "--stop-after", "trials")
    assert result.returncode == 0, result.stderr[-3000:]
    screened = [r["name"] for r in rows(run_dir / "rungs.csv") if r["rung"] == "0"]
    baselines = json.loads((run_dir / "stages" / "candidates.json").read_text())["baselines"]
    assert len(screened) == len(set(screened)) == 4 and set(baselines) <= set(screened)
    assert set(screened) <= {r["name"] for r in rows(run_dir / "candidates.csv")}
    promoted = len([r for r in rows(run_dir / "rungs.csv") if r["rung"] == "1"])
    assert 2 <= promoted <= 4  # ceil(4 / 2), up to twice that when the validation sequences cannot separate them


@pytest.mark.slow  # ~40 s: a search to its logit cache, then a refused resume
def test_resume_with_verify_refuses_a_cache_changed_in_place(tiny_teacher_dir: Path, tmp_path: Path) -> None:
    """The cheap size check cannot see a byte changed in place; `--verify` hashes what every trial reads, once in
    the driver, before any trial runs."""
    run_dir = tmp_path / "run"
    first = rung_search(tiny_teacher_dir, run_dir, "--stop-after", "logit_cache")
    assert first.returncode == 0, first.stderr[-3000:]
    shard = next((run_dir / "logit_cache").glob("logprobs-*.npy"))
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF
    shard.write_bytes(bytes(data))
    line = one_error_line(rung_search(tiny_teacher_dir, run_dir, "--resume", "--verify", "--stop-after", "trials"))
    assert shard.name in line and "sha256 mismatch" in line, line
    assert not (run_dir / "rungs").exists()  # no trial ran
