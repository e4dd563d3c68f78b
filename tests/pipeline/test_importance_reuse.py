"""Importance at the papers' scale (issue #13 item 3): `search --calib-seq-len` apart from --seq-len, `search
--importance DIR` reusing scores computed before (refused, naming the fields, when made for another teacher, other
calibration data, or without the windows the candidates need), and the warning for a >= 1B teacher on CPU-sized
defaults (item 5)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from cli_helpers import TINY_SEARCH_ARGS, run_cli, search
from importance_helpers import REUSE_SETTINGS, scores_for
from nas_minitron.errors import UserError
from nas_minitron.pipeline import importance_stage, stages
from nas_minitron.pipeline.plan import LARGE_TEACHER_PARAMS, make_plan
from nas_minitron.pipeline.run_dir import Run, stage_marker
from nas_minitron.pipeline.runner import _resolve
from nas_minitron.pipeline.settings import SearchSettings, calibration_seq_len, differences, resolve_settings
from nas_minitron.prune.scores import ImportanceScores
from tiny_models import save_tiny_teacher

RESOLVED = {"teacher_arch": "L4-H64-I128-A4-KV2", "head_dim": 16, "teacher_params": 2_000_000,
            "budget_params": 1_000_000, "vocab_size": 1000}
LLAMA_8B = {"teacher_arch": "L32-H4096-I14336-A32-KV8", "head_dim": 128, "teacher_params": 8_030_261_248,
            "budget_params": 4_500_000_000, "vocab_size": 128_256}


def _settings(teacher: Path, **overrides: Any) -> SearchSettings:
    return resolve_settings(None, {"teacher": str(teacher), **REUSE_SETTINGS, **overrides})


def _depths(settings: SearchSettings) -> list[int]:
    return [c.arch.num_hidden_layers for c in stages.find_candidates(settings, _resolve(settings)["budget_params"])[2]]


# ---- --calib-seq-len ----------------------------------------------------------------------------------------------
def test_calib_seq_len_defaults_to_seq_len_and_is_checked() -> None:
    assert calibration_seq_len(SearchSettings(seq_len=64)) == 64
    assert calibration_seq_len(SearchSettings(seq_len=64, calib_seq_len=512)) == 512
    with pytest.raises(UserError, match="calib_seq_len must be >= 2"):
        resolve_settings(None, {"calib_seq_len": 1})
    assert resolve_settings(None, {"calib_seq_len": "none"}).calib_seq_len is None
    # a run directory made before these settings existed resumes: it calibrated at --seq-len and computed importance
    old = {k: v for k, v in SearchSettings().to_dict().items() if k not in ("calib_seq_len", "importance")}
    assert differences(old, SearchSettings()) == []
    assert differences(old, SearchSettings(importance="elsewhere")) == ["importance: None -> 'elsewhere'"]


def test_the_plan_calibrates_at_calib_seq_len_and_reuse_costs_no_teacher_pass() -> None:
    small = dict(seq_len=32, batch_size=2, calibration_samples=8, loss_sequences=2)
    base = make_plan(SearchSettings(**small), RESOLVED)
    longer = make_plan(SearchSettings(**small, calib_seq_len=128), RESOLVED)
    stage = {p.stage: p for p in longer.stages}["importance"]
    assert "8 x 128 = 1,024 calibration tokens" in stage.basis
    assert stage.tokens == 4 * {p.stage: p for p in base.stages}["importance"].tokens  # every pass 4x longer
    assert {p.stage: p for p in longer.stages}["logit_cache"] == {p.stage: p for p in base.stages}["logit_cache"]
    reused = {p.stage: p for p in make_plan(SearchSettings(**small, importance="x"), RESOLVED).stages}["importance"]
    assert reused.tokens == 0 and reused.gpu_bytes_per_device == 0 and "reused from x" in reused.basis


# ---- the warning ----------------------------------------------------------------------------------------------------
def test_a_large_teacher_on_cpu_sized_defaults_is_warned_about_never_refused() -> None:
    plan = make_plan(SearchSettings(), LLAMA_8B)
    assert len(plan.warnings) == 1
    warning = plan.warnings[0]
    for needle in ("8.0B parameters", "--calibration-samples 32", "--calib-seq-len 256", "--short-tokens 4,096",
                   "--full-tokens 8,192", "1024 samples x 4096 tokens", "billions of tokens"):
        assert needle in warning, warning
    papers = SearchSettings(calibration_samples=1024, calib_seq_len=4096, short_tokens=10**8, full_tokens=10**9)
    assert make_plan(papers, LLAMA_8B).warnings == ()
    assert "--calib-seq-len" not in make_plan(SearchSettings(calib_seq_len=4096), LLAMA_8B).warnings[0]
    assert make_plan(SearchSettings(), {**LLAMA_8B, "teacher_params": LARGE_TEACHER_PARAMS - 1}).warnings == ()
    assert make_plan(SearchSettings(), LLAMA_8B).to_dict()["warnings"] == [warning]


def _big_config_only_teacher(tiny: Path, out: Path) -> Path:
    """A 1.06B-parameter llama described by its config alone (no weights), with the tiny teacher's tokenizer."""
    out.mkdir()
    for item in tiny.iterdir():
        if item.name.startswith(("tokenizer", "special_tokens")):
            shutil.copy(item, out / item.name)
    config = json.loads((tiny / "config.json").read_text())
    config.update(hidden_size=2048, intermediate_size=5632, num_hidden_layers=24, num_attention_heads=32,
                  num_key_value_heads=4, head_dim=64, max_position_embeddings=4096)
    (out / "config.json").write_text(json.dumps(config))
    return out


def test_dry_run_warns_about_a_large_teacher_on_cpu_sized_defaults(tiny_teacher_dir: Path, tmp_path: Path) -> None:
    big = _big_config_only_teacher(tiny_teacher_dir, tmp_path / "big")
    result = run_cli("search", "--teacher", str(big), "--budget", "0.5x", "--max-candidates", "4", "--device", "cuda",
                     "--run-dir", str(tmp_path / "run"), "--dry-run", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    warnings = [line for line in result.stdout.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "1.1B parameters" in warnings[0] and "--calibration-samples 32" in warnings[0]
    assert "1024 samples x 4096 tokens" in warnings[0]
    assert not (tmp_path / "run").exists()


# ---- --importance DIR: checked before work ---------------------------------------------------------------------------
def test_reused_scores_are_checked_against_teacher_data_and_windows(tiny_teacher_dir: Path, tmp_path: Path) -> None:
    settings = _settings(tiny_teacher_dir, importance=str(tmp_path / "ok"))
    resolved, depths = _resolve(settings), _depths(settings)
    assert sorted(set(depths)) == [1, 2, 3]  # the windows needed: 1 and 2 layers dropped
    scores_for(tiny_teacher_dir, tmp_path / "ok", settings)
    assert sorted(importance_stage.check_reused(settings, resolved, depths).windows) == [1, 2]

    def refusal(settings: SearchSettings) -> str:
        with pytest.raises(UserError) as caught:
            importance_stage.check_reused(settings, _resolve(settings), depths)
        return str(caught.value)

    # other calibration data: another seed and fewer samples; each field named with the flag that sets it
    line = refusal(_settings(tiny_teacher_dir, importance=str(tmp_path / "ok"), seed=1, calibration_samples=3))
    assert "data_fingerprint expected" in line and "seed expected 1 (--seed), found 0" in line, line
    assert "num_sequences expected 3 (--calibration-samples), found 4" in line and "weights_fingerprint" not in line
    # another teacher of the same shape (other weights): its fingerprint, read from its files
    other = save_tiny_teacher(tmp_path / "other-teacher", "llama", seed=1)
    line = refusal(_settings(other, importance=str(tmp_path / "ok")))
    assert "weights_fingerprint expected" in line and "teacher_arch" not in line, line
    # a record that does not say which teacher it is of
    scores_for(tiny_teacher_dir, tmp_path / "anonymous", settings, weights_fingerprint=None)
    assert "found None" in refusal(_settings(tiny_teacher_dir, importance=str(tmp_path / "anonymous")))
    # the windows the candidates' depths need
    scores_for(tiny_teacher_dir, tmp_path / "no-windows", settings, windows=(1,))
    line = refusal(_settings(tiny_teacher_dir, importance=str(tmp_path / "no-windows")))
    assert "window_sizes expected [1, 2]" in line and "found [1]: missing [2]" in line, line
    assert "--window-sizes 1,2" in line and "--seq-len 16" in line  # how to recompute it


def test_the_stage_links_the_scores_without_the_teacher(tiny_teacher_dir: Path, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    source = tmp_path / "computed"
    settings = _settings(tiny_teacher_dir, importance=str(source))
    scores_for(tiny_teacher_dir, source, settings)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.json").write_text(json.dumps(_resolve(settings)))
    logged: list[str] = []
    run = Run(settings, run_dir, False, logged.append)
    stages.candidates(run)

    def no_teacher(self: Run) -> None:
        raise AssertionError("the teacher was loaded")

    monkeypatch.setattr(Run, "teacher", no_teacher)
    marker = importance_stage.importance(run)
    assert marker["reused_from"] == str(source.resolve()) and marker["window_sizes"] == [1, 2]
    assert marker["num_tokens"] == 4 * 16
    for name in ("scores.safetensors", "scores.json"):
        assert (run_dir / "importance" / name).read_bytes() == (source / name).read_bytes()
    assert ImportanceScores.load(run_dir / "importance").meta == ImportanceScores.load(source).meta
    assert any("no teacher pass" in line for line in logged)


# ---- end to end: one run computes at --calib-seq-len, a second reuses its importance/ --------------------------------
def test_calib_seq_len_reaches_the_stage_and_a_second_run_reuses_it(tiny_teacher_dir: Path, tmp_path: Path) -> None:
    first = tmp_path / "first"
    computed = search(tiny_teacher_dir, first, "--calib-seq-len", "16", "--stop-after", "importance")
    assert computed.returncode == 0, computed.stderr[-3000:]
    assert "--seq-len" in TINY_SEARCH_ARGS and "--calibration-samples" in TINY_SEARCH_ARGS  # 32 and 8
    marker = json.loads(stage_marker(first, "importance").read_text())
    assert marker["num_tokens"] == 8 * 16 and marker["seq_len"] == 16 and "reused_from" not in marker
    meta = json.loads((first / "importance" / "scores.json").read_text())
    assert meta["seq_len"] == 16 and meta["num_sequences"] == 8
    assert meta["weights_fingerprint"] and meta["data_fingerprint"]  # what a reuse is checked against
    second = tmp_path / "second"
    reused = search(tiny_teacher_dir, second, "--calib-seq-len", "16", "--importance", str(first / "importance"),
                    "--stop-after", "importance")
    assert reused.returncode == 0, reused.stderr[-3000:]
    assert "reused importance from" in reused.stdout and "no teacher pass" in reused.stdout
    marker = json.loads(stage_marker(second, "importance").read_text())
    assert marker["reused_from"] == str((first / "importance").resolve()) and marker["num_tokens"] == 8 * 16
    for name in ("scores.safetensors", "scores.json"):
        assert (second / "importance" / name).read_bytes() == (first / "importance" / name).read_bytes()
    # resuming with another --importance is a settings difference, refused like any other
    again = search(tiny_teacher_dir, second, "--calib-seq-len", "16", "--importance", str(tmp_path), "--resume",
                   "--stop-after", "importance")
    assert again.returncode == 2 and "importance: " in again.stderr and "different settings" in again.stderr
