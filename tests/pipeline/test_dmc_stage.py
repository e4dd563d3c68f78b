"""`nas-minitron search --dmc-cr` (issue #15 item 5): the dmc stage after distill on a tiny teacher, its resume
per (winner, ratio), its refusals before any run directory, and its settings (its plan row: test_plan.py)."""

from __future__ import annotations

import csv
import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from cli_helpers import TINY_SEARCH_ARGS, one_error_line, run_in_process, search
from nas_minitron.errors import UserError
from nas_minitron.pipeline.settings import SearchSettings, differences, dmc_ratios, resolve_settings

# One trial, one winner: the cheapest search that reaches the dmc stage (4 retrofit steps of 2 x 32 tokens).
FAST = ("--trials", "1", "--max-concurrent", "1", "--dmc-tokens", "256")


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open() as handle:
        return list(csv.DictReader(handle))


def _mtimes(folder: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}


@pytest.fixture(scope="module")
def dmc_run(tiny_teacher_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny search up to its dmc stage with --dmc-cr 2 (one trial, one winner)."""
    run_dir = tmp_path_factory.mktemp("dmc") / "run"
    result = search(tiny_teacher_dir, run_dir, *FAST, "--dmc-cr", "2", "--stop-after", "dmc")
    assert result.returncode == 0, result.stderr[-3000:]
    (run_dir.parent / "stdout.txt").write_text(result.stdout)
    return run_dir


def test_search_writes_dmc_csv_and_loadable_dmc_models(dmc_run: Path) -> None:
    from nas_minitron.dmc import load_dmc_model

    assert not (dmc_run / "eval").exists()  # stopped after dmc: eval not run
    winner = _rows(dmc_run / "winners.csv")[0]["name"]
    [row] = _rows(dmc_run / "dmc.csv")
    assert row["winner"] == winner and float(row["target_cr"]) == 2.0 and row["path"] == f"dmc/{winner}-cr2"
    achieved = float(row["achieved_cr"])
    assert achieved >= 1.0 and int(row["tokens"]) == 256
    kv = float(next(c for c in _rows(dmc_run / "candidates.csv") if c["name"] == winner)["kv_bytes_per_token"])
    assert float(row["kv_bytes_per_token"]) == kv
    assert float(row["kv_bytes_per_token_compressed"]) == pytest.approx(kv / achieved)
    assert float(row["val_loss"]) > 0 and float(row["val_kl"]) >= 0
    assert f"{winner}-cr2: achieved CR" in (dmc_run.parent / "stdout.txt").read_text()
    model, record = load_dmc_model(dmc_run / row["path"])
    assert record.target_cr == 2.0 and record.achieved_cr == pytest.approx(achieved)
    assert record.training["source_model"] == f"winners/{winner}" and record.training["split"] == "train_full"
    assert not (dmc_run / "checkpoints").exists()  # a finished retrofit leaves no checkpoints
    marker = json.loads((dmc_run / "stages" / "dmc.json").read_text())
    assert marker["ratios"] == [2.0] and marker["retrofitted"] == [f"{winner}-cr2"]
    plan = json.loads((dmc_run / "plan.json").read_text())
    assert next(s for s in plan["stages"] if s["stage"] == "dmc")["tokens"] == 256
    # a finished dmc stage fixes its settings
    changed = run_in_process("search", "--teacher", json.loads((dmc_run / "config.json").read_text())["teacher"],
                             *TINY_SEARCH_ARGS, *FAST, "--run-dir", str(dmc_run), "--dmc-cr", "8", "--resume")
    assert "dmc_cr: '2' -> '8'" in one_error_line(changed)


def test_a_cut_short_retrofit_continues_from_its_checkpoint(dmc_run: Path, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """The dmc stage stopped by a crash after a retrofit's step-2 checkpoint: the next one continues from there (in
    this process, on a copy of the run directory) and ends where the uninterrupted retrofit ended."""
    from nas_minitron.pipeline import dmc_stage
    from nas_minitron.pipeline.run_dir import Run

    run_dir = tmp_path / "run"
    shutil.copytree(dmc_run, run_dir)
    [done] = _rows(run_dir / "dmc.csv")
    shutil.rmtree(run_dir / done["path"])
    (run_dir / "stages" / "dmc.json").unlink()
    config = json.loads((run_dir / "config.json").read_text())
    fields = {f.name for f in dataclasses.fields(SearchSettings)}
    settings = resolve_settings(None, {k: v for k, v in config.items() if k in fields})
    logged: list[str] = []
    run = Run(settings, run_dir, resume=True, log=logged.append)
    real = dmc_stage.retrofit

    def crash_after_two_steps(*args: Any, **kwargs: Any) -> Any:
        real(*args, **kwargs, stop_after_steps=2)
        raise RuntimeError("injected crash after the step-2 checkpoint")

    monkeypatch.setattr(dmc_stage, "retrofit", crash_after_two_steps)
    with pytest.raises(RuntimeError, match="injected crash"):
        dmc_stage.dmc(run)
    name = Path(done["path"]).name
    assert (run_dir / "checkpoints" / name / "step-00000002").is_dir() and not (run_dir / done["path"]).exists()
    monkeypatch.setattr(dmc_stage, "retrofit", real)
    dmc_stage.dmc(run)
    assert f"  {name}: continuing from its checkpoint checkpoints/{name}/step-00000002" in logged
    [again] = _rows(run_dir / "dmc.csv")
    assert again["tokens"] == done["tokens"]
    for key in ("achieved_cr", "val_loss", "val_kl"):
        assert float(again[key]) == pytest.approx(float(done[key]), rel=1e-4), key
    assert not (run_dir / "checkpoints").exists()
    # --dmc-tokens may change before the dmc stage has finished, but a finished retrofit made with others is refused
    other = Run(dataclasses.replace(settings, dmc_tokens=512), run_dir, resume=True, log=logged.append)
    with pytest.raises(UserError, match=f"{name}' was retrofitted with other settings"):
        dmc_stage.dmc(other)


def test_resume_keeps_a_finished_ratio_and_retrofits_an_added_one(tiny_teacher_dir: Path, dmc_run: Path,
                                                                  tmp_path: Path) -> None:
    """The dmc stage cut short after its first (winner, ratio), resumed with the ratio 4 added (--dmc-cr may change
    until the dmc stage has finished): the finished one is kept as it is, the new one retrofitted."""
    run_dir = tmp_path / "run"
    shutil.copytree(dmc_run, run_dir)
    winner = _rows(run_dir / "winners.csv")[0]["name"]
    folder = run_dir / "dmc" / f"{winner}-cr2"
    before = _mtimes(folder)
    (run_dir / "stages" / "dmc.json").unlink()
    second = search(tiny_teacher_dir, run_dir, *FAST, "--dmc-cr", "2,4", "--stop-after", "dmc", "--resume")
    assert second.returncode == 0, second.stderr[-3000:]
    assert f"{winner}-cr2: retrofitted earlier, skipped" in second.stdout
    assert f"{winner}-cr4: achieved CR" in second.stdout
    assert "[distill] done earlier, skipped" in second.stdout
    assert _mtimes(folder) == before
    assert [(r["winner"], r["target_cr"]) for r in _rows(run_dir / "dmc.csv")] == [(winner, "2.0"), (winner, "4.0")]
    assert json.loads((run_dir / "stages" / "dmc.json").read_text())["retrofitted"] == [f"{winner}-cr4"]


def test_a_run_directory_from_before_the_dmc_stage_resumes_with_only_its_marker(dmc_run: Path,
                                                                               tmp_path: Path) -> None:
    """No dmc marker, no dmc settings in config.json: --resume runs the dmc stage as --dmc-cr none (its marker only)
    and changes nothing else."""
    run_dir = tmp_path / "run"
    shutil.copytree(dmc_run, run_dir)
    for path in (run_dir / "dmc", run_dir / "dmc.csv", run_dir / "stages" / "dmc.json"):
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    config = json.loads((run_dir / "config.json").read_text())
    for key in ("dmc_cr", "dmc_tokens"):
        del config[key]
    (run_dir / "config.json").write_text(json.dumps(config))
    winners = _mtimes(run_dir / "winners" / _rows(run_dir / "winners.csv")[0]["name"])
    result = run_in_process("search", "--teacher", config["teacher"], *TINY_SEARCH_ARGS, *FAST[:4], "--run-dir",
                            str(run_dir), "--resume", "--stop-after", "dmc")  # no --dmc-* flag
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("done earlier, skipped") == 6 and "[dmc] done in" in result.stdout
    marker = json.loads((run_dir / "stages" / "dmc.json").read_text())
    assert marker["ratios"] == [] and not (run_dir / "dmc.csv").exists() and not (run_dir / "dmc").exists()
    assert _mtimes(run_dir / "winners" / _rows(run_dir / "winners.csv")[0]["name"]) == winners


def test_a_bad_ratio_is_refused_in_one_line_before_the_run_dir(tiny_teacher_dir: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    for ratio, named in (("0.5", "target compression ratio 0.5 is invalid: it must be a finite number >= 1"),
                         ("2,x", "'x' is not a number"), ("2,2", "lists the ratio 2 twice"),
                         ("2,2.0000001", "lists the ratio 2 twice")):
        line = one_error_line(run_in_process("search", "--teacher", str(tiny_teacher_dir), "--run-dir",
                                             str(run_dir), "--dmc-cr", ratio))
        assert line.startswith(f"nas-minitron search: error: dmc_cr '{ratio}'") and named in line, line
    assert not run_dir.exists()


def test_a_teacher_dmc_cannot_support_is_refused_in_pre_flight(tmp_path: Path) -> None:
    from tiny_models import save_tiny_teacher

    teacher = save_tiny_teacher(tmp_path / "mistral", "mistral", sliding_window=16)  # < max_position_embeddings
    run_dir = tmp_path / "run"
    line = one_error_line(run_in_process("search", "--teacher", str(teacher), "--run-dir", str(run_dir),
                                         "--budget", "0.6x", "--space", "tiny", "--dmc-cr", "2", "--dry-run"))
    assert "--dmc-cr" in line and "sliding-window attention is not supported" in line, line
    assert not run_dir.exists()
    # without --dmc-cr the same teacher plans fine: the check is the dmc stage's alone
    assert run_in_process("search", "--teacher", str(teacher), "--run-dir", str(run_dir), "--budget", "0.6x",
                          "--space", "tiny", "--dry-run").returncode == 0


def test_dmc_settings_parse_validate_and_may_change_until_the_dmc_stage(tmp_path: Path) -> None:
    assert dmc_ratios(SearchSettings()) == () and dmc_ratios(SearchSettings(dmc_cr="4, 2,1.5")) == (4.0, 2.0, 1.5)
    yaml_file = tmp_path / "run.yaml"
    yaml_file.write_text("dmc_cr: [2, 4]\n")
    assert resolve_settings(yaml_file, {}).dmc_cr == "2,4"
    yaml_file.write_text("dmc_cr: 3\n")
    assert resolve_settings(yaml_file, {}).dmc_cr == "3"
    assert resolve_settings(yaml_file, {"dmc_cr": "none"}).dmc_cr is None
    with pytest.raises(UserError, match=r"dmc_tokens \(10\) is less than one retrofit step of seq_len x batch_size"):
        resolve_settings(None, {"dmc_cr": "2", "dmc_tokens": 10})
    resolve_settings(None, {"dmc_tokens": 10})  # unused without --dmc-cr
    saved = SearchSettings().to_dict()  # also a config.json from before these settings existed
    legacy = {k: v for k, v in saved.items() if not k.startswith("dmc_")}
    later = SearchSettings(dmc_cr="2", dmc_tokens=8192)
    assert differences(legacy, SearchSettings(), ["distill"]) == []
    assert differences(saved, later, ["candidates", "distill"]) == []
    assert differences(saved, later, ["distill", "dmc"]) == ["dmc_cr: None -> '2'", "dmc_tokens: 4096 -> 8192"]


def test_the_eval_stage_scores_the_dmc_variants_with_lm_eval(dmc_run: Path, tmp_path: Path) -> None:
    """Resumed through eval: results.json has the teacher, the winner and its CR-2 retrofit (its own scores, from
    the hard-decision DMC forward); speed.csv has no row for the retrofit."""
    run_dir = tmp_path / "run"
    shutil.copytree(dmc_run, run_dir)
    teacher = json.loads((run_dir / "config.json").read_text())["teacher"]
    result = run_in_process("search", "--teacher", teacher, *TINY_SEARCH_ARGS, *FAST, "--run-dir", str(run_dir),
                            "--dmc-cr", "2", "--resume", "--stop-after", "eval")
    assert result.returncode == 0, result.stderr[-3000:]
    winner = _rows(run_dir / "winners.csv")[0]["name"]
    assert f"{winner}-cr2 (DMC): " in result.stdout
    results = json.loads((run_dir / "eval" / "results.json").read_text())
    by_label = results["models"]
    assert set(by_label) == {"teacher", winner, f"{winner}-cr2"}
    variant = by_label[f"{winner}-cr2"]
    assert variant["tasks"] and all(variant["tasks"].values())
    assert {r["model"] for r in _rows(run_dir / "eval" / "speed.csv")} == {"teacher", winner}
    marker = json.loads((run_dir / "stages" / "eval.json").read_text())
    assert marker["models"] == ["teacher", winner, f"{winner}-cr2"]
