from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from nas_minitron.errors import UserError
from nas_minitron.evaluate.harness import (
    LOCAL_TASKS_DIR,
    MINITRON_PRESET,
    EvalResult,
    evaluate_model,
    read_eval,
    resolve_tasks,
    save_eval,
    wide_table,
)
from tiny_models import tiny_model, tiny_tokenizer

TASK = "pydoc_next_sentence"
ROOT = Path(__file__).resolve().parents[2]


def _cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "nas_minitron", *args], capture_output=True, text=True, cwd=cwd)


def test_resolve_tasks_expands_the_preset_and_overrides_shots() -> None:
    assert resolve_tasks("minitron") == MINITRON_PRESET
    assert resolve_tasks("minitron,pydoc_next_sentence", num_fewshot=0) == dict.fromkeys([*MINITRON_PRESET, TASK], 0)
    assert resolve_tasks(["a", " b "]) == {"a": None, "b": None}
    with pytest.raises(UserError, match="no task"):
        resolve_tasks(" , ")


def test_bundled_task_items_are_well_formed() -> None:
    lines = (LOCAL_TASKS_DIR / TASK / f"{TASK}.jsonl").read_text().splitlines()
    rows = [json.loads(line) for line in lines]
    test_rows = [r for r in rows if r["split"] == "test"]
    assert len(test_rows) >= 100 and any(r["split"] == "train" for r in rows)
    for row in rows:
        assert len(row["choices"]) == 4 and len(set(row["choices"])) == 4 and 0 <= row["label"] < 4
        assert row["context"] and row["context"] not in row["choices"]
    assert len({r["label"] for r in test_rows}) == 4  # the answer position varies


def test_bundled_task_is_reproducible_from_the_recorded_python() -> None:
    yaml_text = (LOCAL_TASKS_DIR / TASK / f"{TASK}.yaml").read_text()
    version = ".".join(map(str, sys.version_info[:3]))
    if f'python: "{version}"' not in yaml_text:
        pytest.skip(f"the task was built from another CPython's pydoc topics than {version}")
    spec = importlib.util.spec_from_file_location("build_pydoc_task", ROOT / "scripts" / "build_pydoc_task.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    from pydoc_data.topics import topics

    rows = [json.loads(line) for line in (LOCAL_TASKS_DIR / TASK / f"{TASK}.jsonl").read_text().splitlines()]
    assert module.build_items(topics) == rows


def test_evaluate_in_memory_model_gives_numeric_scores() -> None:
    result = evaluate_model(tiny_model("llama"), tiny_tokenizer(), TASK, limit=4, num_fewshot=1, label="tiny")
    assert isinstance(result, EvalResult) and result.label == "tiny" and result.num_fewshot == {TASK: 1}
    metrics = result.tasks[TASK]
    assert {"acc", "acc_norm", "acc_stderr"} <= set(metrics)
    assert all(0.0 <= metrics[m] <= 1.0 for m in ("acc", "acc_norm"))
    assert metrics["acc"] * 4 == pytest.approx(round(metrics["acc"] * 4))  # a fraction of 4 examples


def test_save_eval_merges_models_side_by_side(tmp_path: Path) -> None:
    teacher = EvalResult("teacher", 100, {"t": {"acc": 0.5, "acc_stderr": 0.1}})
    student = EvalResult("s1", 60, {"t": {"acc": 0.4, "acc_stderr": 0.1}})
    save_eval(tmp_path, [student])
    save_eval(tmp_path, [teacher])
    save_eval(tmp_path, [EvalResult("s1", 60, {"t": {"acc": 0.45}})])  # same label replaces
    results, speed = read_eval(tmp_path)
    assert [r.label for r in results] == ["teacher", "s1"] and speed.empty
    table = pd.read_csv(tmp_path / "eval" / "table.csv")
    assert list(table.columns) == ["model", "params", "task", "metric", "value"]
    wide = wide_table(table)
    assert list(wide.columns) == ["teacher", "s1"] and wide.loc[("t", "acc"), "s1"] == 0.45


def test_cli_eval_saves_results_and_speed(tiny_teacher_dir: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    proc = _cli("eval", "--model", str(tiny_teacher_dir), "--tasks", TASK, "--limit", "3", "--out", str(run_dir),
                "--label", "teacher", "--speed", "--speed-seq-len", "8", "--speed-decode-tokens", "2")  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    models = json.loads((run_dir / "eval" / "results.json").read_text())["models"]
    assert set(models) == {"teacher"} and 0 <= models["teacher"]["tasks"][TASK]["acc"] <= 1
    assert models["teacher"]["path"] == str(tiny_teacher_dir)
    speed = pd.read_csv(run_dir / "eval" / "speed.csv")
    assert list(speed["model"]) == ["teacher"] and (speed["decode_tok_s"] > 0).all()
    assert "acc" in proc.stdout and "speed teacher" in proc.stdout


def test_cli_eval_unknown_task_suggests_close_names(tiny_teacher_dir: Path) -> None:
    proc = _cli("eval", "--model", str(tiny_teacher_dir), "--tasks", "pydoc_next_sentense,hellaswagg")
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "unknown lm-eval task" in lines[0]
    assert "did you mean pydoc_next_sentence" in lines[0] and "hellaswag" in lines[0]


def test_cli_eval_refuses_a_directory_that_is_not_a_model(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("hello")
    proc = _cli("eval", "--model", str(tmp_path))
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "is not a model directory" in proc.stderr


def test_bad_include_path_is_a_user_error(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="include-path"):
        evaluate_model(tiny_model("llama"), tiny_tokenizer(), TASK, include_path=tmp_path / "nope")


@pytest.mark.slow  # indexes lm-eval's ~15k built-in tasks, then fails to reach the hub
def test_hub_task_offline_says_so_in_one_line(tiny_teacher_dir: Path) -> None:
    proc = _cli("eval", "--model", str(tiny_teacher_dir), "--tasks", "arc_challenge", "--limit", "1")
    assert proc.returncode == 2
    last = proc.stderr.strip().splitlines()[-1]
    assert "arc_challenge" in last and "offline" in last and "pydoc_next_sentence" in last
