"""`nas-minitron search` refuses what a later stage would refuse before it writes anything (issue #16, first part).

Settings are validated in one place with their valid ranges; the run directory, the eval tasks and `--seq-len`
are checked before the run directory exists; the lock is taken before anything is written; a run that finished
no stage can be started over by the corrected command; eval settings may change on --resume until eval has run.
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
from pathlib import Path

import pytest

from cli_helpers import one_error_line, search
from nas_minitron.cli import build_parser
from nas_minitron.errors import UserError
from nas_minitron.pipeline.run_dir import LOCK_FILE, STAGES
from nas_minitron.pipeline.runner import _check_run_dir
from nas_minitron.pipeline.settings import SearchSettings, differences, resolve_settings


@pytest.mark.parametrize(("overrides", "named"), [
    ({"gpus_per_trial": -1.0}, "gpus_per_trial must be a number >= 0"),
    ({"gpus_per_trial": float("nan")}, "gpus_per_trial must be a number >= 0"),
    ({"lr": 0.0}, "lr must be in (0, 1], but got 0.0"),
    ({"lr": 3.0}, "lr must be in (0, 1], but got 3.0"),
    ({"tolerance": 1.5}, "tolerance must be in (0, 1)"),
    ({"eval_limit": 0}, "eval_limit must be >= 1 or none, but got 0"),
    ({"max_candidates": 0}, "max_candidates must be >= 1 or none"),
    ({"topk": -1}, "topk must be >= 0, but got -1"),
    ({"trials": 0}, "trials must be >= 1, but got 0"),
    ({"dmc_tokens": 0}, "dmc_tokens must be >= 1, but got 0"),
    ({"dmc_decision_lr_scale": 0.0}, "dmc_decision_lr_scale must be > 0, but got 0.0"),
    ({"dmc_cr": "0.5"}, "dmc_cr '0.5': target compression ratio 0.5 is invalid: it must be a finite number >= 1"),
])
def test_every_numeric_setting_is_checked_with_its_range(overrides: dict[str, object], named: str) -> None:
    with pytest.raises(UserError) as caught:
        resolve_settings(None, overrides)
    assert named in str(caught.value)


def test_problems_are_reported_together() -> None:
    with pytest.raises(UserError) as caught:
        resolve_settings(None, {"gpus_per_trial": -1.0, "lr": 0.0, "eval_limit": 0})
    assert all(key in str(caught.value) for key in ("gpus_per_trial", "lr", "eval_limit"))


def test_eval_limit_none_unsets_it_from_the_command_line(tmp_path: Path) -> None:
    args = build_parser().parse_args(["search", "--eval-limit", "none", "--max-candidates", "null"])
    settings = resolve_settings(None, {"eval_limit": args.eval_limit, "max_candidates": args.max_candidates})
    assert settings.eval_limit is None and settings.max_candidates is None
    assert resolve_settings(None, {"eval_limit": "12"}).eval_limit == 12
    yaml_file = tmp_path / "run.yaml"
    yaml_file.write_text("eval_limit: 5\n")
    assert resolve_settings(yaml_file, {}).eval_limit == 5
    assert resolve_settings(yaml_file, {"eval_limit": args.eval_limit}).eval_limit is None  # the flag unsets YAML's
    with pytest.raises(UserError, match="trials must be a int"):  # `none` only unsets optional settings
        resolve_settings(None, {"trials": "none"})


def test_eval_settings_may_change_on_resume_until_eval_has_run() -> None:
    saved = SearchSettings().to_dict()
    changed = SearchSettings(eval_limit=None, eval_tasks="other")
    before_eval = [s for s in STAGES if s not in ("eval", "report")]
    assert differences(saved, changed, before_eval) == []
    assert differences(saved, changed, STAGES) == ["eval_limit: 40 -> None", "eval_tasks: 'pydoc_next_sentence' -> "
                                                                            "'other'"]
    assert differences(saved, SearchSettings(trials=5), before_eval) == ["trials: 4 -> 5"]


def test_a_run_that_finished_nothing_can_be_started_over(tmp_path: Path) -> None:
    settings = SearchSettings()
    run_dir = tmp_path / "run"
    assert _check_run_dir(run_dir, False, settings)  # new
    run_dir.mkdir()
    (run_dir / LOCK_FILE).write_text("123")
    assert _check_run_dir(run_dir, False, settings)  # only the lock of a refused start
    (run_dir / "config.json").write_text(json.dumps({**settings.to_dict(), "trials": 9}))
    assert _check_run_dir(run_dir, False, settings)  # failed before its first stage: the fixed command reruns it
    assert _check_run_dir(run_dir, True, settings)  # ... and so does --resume with other settings
    (run_dir / "stages").mkdir()
    (run_dir / "stages" / "candidates.json").write_text("{}")
    with pytest.raises(UserError, match="already exists; pass --resume"):
        _check_run_dir(run_dir, False, settings)
    with pytest.raises(UserError, match="trials: 9 -> 4"):
        _check_run_dir(run_dir, True, settings)
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="holds no search"):
        _check_run_dir(other, False, settings)


def test_bad_run_dirs_eval_tasks_and_seq_len_are_refused_before_any_output(
    tiny_teacher_dir: Path, tmp_path: Path
) -> None:
    a_file = tmp_path / "file"
    a_file.write_text("x")
    assert "is a file" in one_error_line(search(tiny_teacher_dir, a_file, cwd=tmp_path))
    assert "is not a writable directory" in one_error_line(search(tiny_teacher_dir, a_file / "run", cwd=tmp_path))
    run_dir = tmp_path / "run"
    line = one_error_line(search(tiny_teacher_dir, run_dir, "--eval-tasks", "pydoc_next_sentense"))
    assert "'pydoc_next_sentense'" in line and "pydoc_next_sentence" in line  # the typo and the close match
    assert not run_dir.exists()
    line = one_error_line(search(tiny_teacher_dir, run_dir, "--seq-len", "100000"))
    assert "--seq-len 100000" in line and "max_position_embeddings (256)" in line
    assert not run_dir.exists()
    line = one_error_line(search(tiny_teacher_dir, run_dir, "--gpus-per-trial", "-1"))  # hung before
    assert "gpus_per_trial" in line and "-1" in line
    assert not run_dir.exists()


def test_a_second_driver_is_refused_before_it_writes(tiny_teacher_dir: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    with (run_dir / LOCK_FILE).open("a+") as held:  # another driver holds the new directory
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        held.write("4242")
        held.flush()
        line = one_error_line(search(tiny_teacher_dir, run_dir))
    assert "in use by another search (pid 4242)" in line
    assert not (run_dir / "config.json").exists() and not (run_dir / "summary.json").exists()


def test_stop_after_runs_up_to_a_stage_and_leaves_later_checks_to_the_resume(
    tiny_teacher_dir: Path, tmp_path: Path
) -> None:
    run_dir = tmp_path / "run"
    stopped = search(tiny_teacher_dir, run_dir, "--stop-after", "candidates", "--eval-tasks", "no_such_task")
    assert stopped.returncode == 0, stopped.stderr[-2000:]
    assert "stopped after stage 'candidates'" in stopped.stdout
    done = sorted(p.stem for p in (run_dir / "stages").glob("*.json"))
    assert done == ["candidates"] and (run_dir / "candidates.csv").is_file()
    # the run that would evaluate checks the eval tasks before it does anything
    line = one_error_line(search(tiny_teacher_dir, run_dir, "--resume", "--eval-tasks", "no_such_task"))
    assert "no_such_task" in line
    assert sorted(p.stem for p in (run_dir / "stages").glob("*.json")) == ["candidates"]
    bad = one_error_line(search(tiny_teacher_dir, tmp_path / "other", "--stop-after", "nothing"))
    assert "--stop-after" in bad and "candidates" in bad and not (tmp_path / "other").exists()


def test_the_winners_stream_is_left_to_the_distill_stage_beyond_the_scan_limit(
    tiny_teacher_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Pre-flight tokenizes at most EXACT_SCAN_TOKENS of the train split: past that, only the trials' part is checked
    here and the winners' part by the stage that tokenizes it (which refuses a split that runs out)."""
    from nas_minitron.data import iter_sequences
    from nas_minitron.pipeline import runner
    from nas_minitron.teacher import load_teacher_tokenizer

    lines = [json.dumps({"text": f"document {i}: " + "some words of text " * 40}) for i in range(60)]
    data = tmp_path / "data.jsonl"
    data.write_text("\n".join(lines) + "\n")
    tokenizer = load_teacher_tokenizer(str(tiny_teacher_dir))
    have = sum(1 for _ in iter_sequences(str(data), tokenizer, "train", 32, 0))
    assert have >= 4
    s = SearchSettings(teacher=str(tiny_teacher_dir), data=str(data), seq_len=32, batch_size=2, calibration_samples=1,
                       validation_sequences=1, short_tokens=2 * 32, full_tokens=have * 32)  # short fits, both do not
    with pytest.raises(UserError, match=r"train split holds .* needs .* \(--short-tokens \+ --full-tokens\)"):
        runner._check_data(s, tmp_path / "run", STAGES)
    monkeypatch.setattr(runner, "EXACT_SCAN_TOKENS", 32)
    notes = runner._check_data(s, tmp_path / "run", STAGES)
    assert len(notes) == 1 and f"winners' {have:,} more" in notes[0] and "distill stage" in notes[0]
    too_short = dataclasses.replace(s, short_tokens=(have + 1) * 32)
    with pytest.raises(UserError, match=r"\(--short-tokens\)"):  # the trials' part is always checked
        runner._check_data(too_short, tmp_path / "run", STAGES)
