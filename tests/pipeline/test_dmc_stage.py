"""`nas-minitron search --dmc-cr` (issue #15 item 5): the dmc stage after distill on a tiny teacher, its resume
per (winner, ratio), its refusals before any run directory, and its settings (its plan row: test_plan.py)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from cli_helpers import one_error_line, run_in_process, search
from nas_minitron.errors import UserError
from nas_minitron.pipeline.settings import SearchSettings, differences, dmc_ratios, resolve_settings

# One trial, one winner: the cheapest search that reaches the dmc stage (4 retrofit steps of 2 x 32 tokens).
FAST = ("--trials", "1", "--max-concurrent", "1", "--dmc-tokens", "256")


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open() as handle:
        return list(csv.DictReader(handle))


def _mtimes(folder: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}


def test_search_retrofits_each_winner_and_resume_redoes_none(tiny_teacher_dir: Path, tmp_path: Path) -> None:
    from nas_minitron.dmc import load_dmc_model

    run_dir = tmp_path / "run"
    first = search(tiny_teacher_dir, run_dir, *FAST, "--dmc-cr", "2", "--stop-after", "dmc")
    assert first.returncode == 0, first.stderr[-3000:]
    assert not (run_dir / "eval").exists()  # stopped after dmc: eval not run
    winner = _rows(run_dir / "winners.csv")[0]["name"]
    [row] = _rows(run_dir / "dmc.csv")
    assert row["winner"] == winner and float(row["target_cr"]) == 2.0 and row["path"] == f"dmc/{winner}-cr2"
    achieved = float(row["achieved_cr"])
    assert achieved >= 1.0 and int(row["tokens"]) == 256
    kv = float(next(c for c in _rows(run_dir / "candidates.csv") if c["name"] == winner)["kv_bytes_per_token"])
    assert float(row["kv_bytes_per_token"]) == kv
    assert float(row["kv_bytes_per_token_compressed"]) == pytest.approx(kv / achieved)
    assert float(row["val_loss"]) > 0 and float(row["val_kl"]) >= 0
    assert f"{winner}-cr2: achieved CR" in first.stdout
    folder = run_dir / row["path"]
    model, record = load_dmc_model(folder)
    assert record.target_cr == 2.0 and record.achieved_cr == pytest.approx(achieved)
    assert record.training["source_model"] == f"winners/{winner}" and record.training["split"] == "train_full"
    assert not (run_dir / "checkpoints").exists()  # a finished retrofit leaves no checkpoints
    marker = json.loads((run_dir / "stages" / "dmc.json").read_text())
    assert marker["ratios"] == [2.0] and marker["retrofitted"] == [f"{winner}-cr2"]
    plan = json.loads((run_dir / "plan.json").read_text())
    assert next(s for s in plan["stages"] if s["stage"] == "dmc")["tokens"] == 256
    before = _mtimes(folder)

    # The dmc stage cut short after its first (winner, ratio): its marker gone, the ratio 4 added (--dmc-cr may
    # change until the dmc stage has finished). The finished one is kept as it is, the new one retrofitted.
    (run_dir / "stages" / "dmc.json").unlink()
    second = search(tiny_teacher_dir, run_dir, *FAST, "--dmc-cr", "2,4", "--stop-after", "dmc", "--resume")
    assert second.returncode == 0, second.stderr[-3000:]
    assert f"{winner}-cr2: retrofitted earlier, skipped" in second.stdout
    assert f"{winner}-cr4: achieved CR" in second.stdout
    assert "[distill] done earlier, skipped" in second.stdout
    assert _mtimes(folder) == before
    assert [(r["winner"], r["target_cr"]) for r in _rows(run_dir / "dmc.csv")] == [(winner, "2.0"), (winner, "4.0")]
    assert json.loads((run_dir / "stages" / "dmc.json").read_text())["retrofitted"] == [f"{winner}-cr4"]

    # a finished dmc stage is skipped whole, and its settings may no longer change
    third = search(tiny_teacher_dir, run_dir, *FAST, "--dmc-cr", "2,4", "--stop-after", "dmc", "--resume")
    assert third.returncode == 0 and "[dmc] done earlier, skipped" in third.stdout
    assert _mtimes(folder) == before
    changed = search(tiny_teacher_dir, run_dir, *FAST, "--dmc-cr", "8", "--stop-after", "dmc", "--resume")
    assert "dmc_cr: '2,4' -> '8'" in one_error_line(changed)


def test_a_bad_ratio_is_refused_in_one_line_before_the_run_dir(tiny_teacher_dir: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    for ratio, named in (("0.5", "target compression ratio 0.5 is invalid: it must be a finite number >= 1"),
                         ("2,x", "'x' is not a number"), ("2,2", "lists the ratio 2 twice")):
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
