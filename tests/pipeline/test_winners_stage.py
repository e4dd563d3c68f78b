"""The winners and full-distillation stages on a synthetic run directory (tests/synthetic_run.py, trials done):
a winner continues from its trial's trained weights (or is re-pruned when the trial kept none), a finished winner
is never retrained on --resume after a crash during winner 2, an unfinished one resumes from its checkpoint; the
full-distillation settings are refused in one line when they cannot work."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from cli_helpers import one_error_line, run_cli
from nas_minitron.arch import ArchConfig
from nas_minitron.atomic import write_json_atomic
from nas_minitron.data import save_sequences
from nas_minitron.distill.ray_train import FAULT_ENV
from nas_minitron.errors import UserError
from nas_minitron.families import describe_model
from nas_minitron.pipeline import stages
from nas_minitron.pipeline.run_dir import Run, read_csv
from nas_minitron.pipeline.settings import SearchSettings, resolve_settings
from nas_minitron.prune.plan import PLAN_FILE
from nas_minitron.prune.scores import ImportanceScores
from nas_minitron.prune.student import build_student
from nas_minitron.search.protocol import trial_result_path, trial_weights_path
from synthetic_run import write_synthetic_run

SEQ_LEN = 16
TRIAL_TOKENS = 640  # what the synthetic trial of winner 1 "trained"


def _settings(teacher_dir: Path, **changes: object) -> SearchSettings:
    values = dict(teacher=str(teacher_dir), winners=2, objectives=("val_loss",), seq_len=SEQ_LEN, batch_size=2,
                  full_tokens=4 * 2 * SEQ_LEN, validation_sequences=4, evals_per_trial=2, topk=0)
    values.update(changes)
    return SearchSettings(**values)  # type: ignore[arg-type]


def _run_dir(tmp_path: Path, teacher_dir: Path) -> Path:
    """A synthetic run whose trials are done, with the resolved config, token files, and the trained weights of the
    best trial only (the second winner's trial kept none)."""
    run_dir = write_synthetic_run(tmp_path / "run", teacher_dir, upto="trials")
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32)
    family, arch = describe_model(teacher)
    config = json.loads((run_dir / "config.json").read_text())
    config.update(head_dim=arch.head_dim, model_type=family.model_type, vocab_size=teacher.config.vocab_size)
    write_json_atomic(run_dir / "config.json", config)
    tokens = torch.randint(0, teacher.config.vocab_size, (24, SEQ_LEN), generator=torch.Generator().manual_seed(0))
    (run_dir / "data").mkdir()
    save_sequences(run_dir / "data" / "train.safetensors", tokens[:16])  # [16, T]
    save_sequences(run_dir / "data" / "validation.safetensors", tokens[16:])  # [8, T]
    best = min((r for r in read_csv(run_dir / "trials.csv") if r["status"] == "COMPLETE"),
               key=lambda r: float(r["val_loss"]))
    student, plan = build_student(teacher, str(teacher_dir), ArchConfig.parse(best["name"], arch.head_dim),
                                  ImportanceScores.load(run_dir / "importance"))
    with torch.no_grad():
        student.model.norm.weight.add_(0.25)  # "trained": differs from a re-pruned student
    weights = trial_weights_path(run_dir, best["name"])
    student.save_pretrained(weights)
    (weights / PLAN_FILE).write_text(json.dumps(plan.to_dict()))
    write_json_atomic(trial_result_path(run_dir, best["name"]),
                      {"arch": best["name"], "final": {"num_tokens": TRIAL_TOKENS},
                       "weights": {"path": str(weights.relative_to(run_dir)), "num_tokens": TRIAL_TOKENS}})
    return run_dir


def _files(folder: Path) -> dict[str, tuple[str, int]]:
    """name -> (sha256, mtime in ns) of every file in `folder`."""
    return {f.name: (hashlib.sha256(f.read_bytes()).hexdigest(), f.stat().st_mtime_ns)
            for f in sorted(folder.iterdir()) if f.is_file()}


@pytest.mark.usefixtures("one_torch_thread")
def test_winner_continues_from_its_trial_and_resume_after_a_crash_in_winner_2_keeps_winner_1(
    tiny_teacher_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run_dir = _run_dir(tmp_path, tiny_teacher_dir)
    lines: list[str] = []
    run = Run(_settings(tiny_teacher_dir), run_dir, False, lines.append)
    stages.winners(run)
    rows = read_csv(run_dir / "winners.csv")
    assert [r["source"] for r in rows] == ["trial", "pruned"]
    assert [int(r["tokens_seen"]) for r in rows] == [TRIAL_TOKENS, 0]
    first, second = (run_dir / r["path"] for r in rows)
    trained = AutoModelForCausalLM.from_pretrained(trial_weights_path(run_dir, rows[0]["name"]))
    for name, folder in (("first", first), ("second", second)):
        assert (folder / "tokenizer.json").is_file() and (folder / PLAN_FILE).is_file(), name
    continued = AutoModelForCausalLM.from_pretrained(first)
    assert all(torch.equal(a, b) for a, b in zip(continued.parameters(), trained.parameters(), strict=True))
    teacher = AutoModelForCausalLM.from_pretrained(tiny_teacher_dir, dtype=torch.float32)
    arch = ArchConfig.parse(rows[1]["name"], run.resolved.head_dim)
    pruned, _ = build_student(teacher, str(tiny_teacher_dir), arch, ImportanceScores.load(run_dir / "importance"))
    saved = AutoModelForCausalLM.from_pretrained(second)
    assert all(torch.equal(a, b) for a, b in zip(saved.parameters(), pruned.parameters(), strict=True))

    # winner 2 crashes after its first checkpoint: winner 1 is distilled and marked, winner 2's folder is as it was
    before_second = _files(second)
    monkeypatch.setenv(FAULT_ENV, rows[1]["name"])
    with pytest.raises(RuntimeError, match="injected fault"):
        stages.distill_winners(run)
    monkeypatch.delenv(FAULT_ENV)
    assert (first / "distill.json").is_file() and not (second / "distill.json").is_file()
    assert _files(second) == before_second
    assert [p.name for p in (run_dir / "checkpoints").iterdir()] == [rows[1]["name"]]  # winner 1's were deleted
    steps = sorted(p.name for p in (run_dir / "checkpoints" / rows[1]["name"]).iterdir())
    assert steps == ["step-00000002"]
    after_first = _files(first)

    resumed_lines: list[str] = []
    info = stages.distill_winners(Run(_settings(tiny_teacher_dir), run_dir, True, resumed_lines.append))
    assert _files(first) == after_first  # not rewritten: same bytes, same mtimes
    assert f"  {rows[0]['name']}: distilled earlier, skipped" in resumed_lines
    assert not any(line.startswith(f"  {rows[0]['name']} step") for line in resumed_lines)  # no training of it
    assert info["results"][rows[0]["name"]]["skipped"] and not info["results"][rows[1]["name"]]["skipped"]
    record = json.loads((second / "distill.json").read_text())
    assert record["resumed_from_step"] == 2 and record["num_steps"] == 4
    assert not (run_dir / "checkpoints").exists()
    assert (second / "tokenizer.json").is_file() and (second / PLAN_FILE).is_file()  # carried over
    full = json.loads((first / "distill.json").read_text())["num_tokens"]
    assert [int(r["total_tokens"]) for r in read_csv(run_dir / "winners.csv")] == [TRIAL_TOKENS + full, full]


def test_full_distillation_settings_are_validated() -> None:
    resolve_settings(None, {"global_batch_tokens": 4 * 256 * 4})  # 4 micro-batches of 4 x 256 on one worker
    cases = [
        ({"global_batch_tokens": 1000}, "multiple of seq_len x batch_size x workers = 256 x 4 x 1 = 1024"),
        ({"global_batch_tokens": 2048, "full_workers": 4}, "= 256 x 4 x 4 = 4096"),
        ({"global_batch_tokens": 4096 * 4, "full_tokens": 8192}, "exceeds full_tokens"),
        ({"full_gpus": -1}, "full_gpus must be >= 0"),
        ({"full_workers": 0}, "full_workers must be >= 1"),
        ({"full_gpus": 2, "full_workers": 2}, "with full_gpus 2 the workers are the GPUs"),
        ({"checkpoint_minutes": 0}, "checkpoint_minutes must be > 0"),
    ]
    for overrides, message in cases:
        with pytest.raises(UserError) as caught:
            resolve_settings(None, overrides)
        assert message in str(caught.value), (overrides, str(caught.value))


def test_full_distill_config_accumulates_to_the_global_batch(tiny_teacher_dir: Path, tmp_path: Path) -> None:
    run = Run(_settings(tiny_teacher_dir, full_workers=2, global_batch_tokens=8 * SEQ_LEN, full_tokens=64 * SEQ_LEN),
              tmp_path, False, print)
    where = stages._full_placement(run)
    assert (where.workers, where.on_gpus, where.in_driver, where.strategy) == (2, False, False, "fsdp")
    small = stages._full_config(run, 10**6, where)
    assert small.grad_accum == 2 and small.tokens_per_step(2) == 8 * SEQ_LEN and not small.grad_checkpointing
    assert small.num_steps(2) == 8 and small.eval_every_tokens == 4 * 8 * SEQ_LEN  # 2 validations after step 0
    assert stages._full_config(run, stages.GRAD_CHECKPOINTING_PARAMS, where).grad_checkpointing
    driver = stages._full_placement(Run(_settings(tiny_teacher_dir), tmp_path, False, print))
    assert driver.in_driver and driver.workers == 1


def test_global_batch_not_a_multiple_is_refused_in_one_line(tmp_path: Path) -> None:
    line = one_error_line(run_cli("search", "--global-batch-tokens", "1000", "--run-dir", str(tmp_path / "r")))
    assert "global_batch_tokens" in line and "1000" in line and "1024" in line
    assert not (tmp_path / "r").exists()


@pytest.mark.slow  # a Ray cluster and two Ray Train jobs: ~1 min on 2 cores
def test_winners_distilled_with_fsdp_on_two_cpu_workers(tiny_teacher_dir: Path, tmp_path: Path) -> None:
    from nas_minitron.distill.ray_train import check_cluster

    run_dir = _run_dir(tmp_path, tiny_teacher_dir)
    run = Run(_settings(tiny_teacher_dir, full_workers=2, global_batch_tokens=4 * SEQ_LEN, full_tokens=16 * SEQ_LEN,
                        cpus_per_trial=1), run_dir, False, print)
    stages.winners(run)
    try:
        info = stages.distill_winners(run)
        with pytest.raises(UserError, match=r"--full-gpus 1 but the Ray cluster has 0 GPUs"):
            check_cluster(1, True, "--full-gpus")
    finally:
        stages.stop_ray()
    assert info["workers"] == 2 and "FSDP2" in info["placement"]
    for row in read_csv(run_dir / "winners.csv"):
        folder = run_dir / row["path"]
        record = json.loads((folder / "distill.json").read_text())
        assert record["num_tokens"] == 16 * SEQ_LEN and record["config"]["grad_accum"] == 1
        assert int(row["total_tokens"]) == int(row["tokens_seen"]) + 16 * SEQ_LEN
        student = AutoModelForCausalLM.from_pretrained(folder)  # the gathered, unsharded student
        assert sum(p.numel() for p in student.parameters()) == int(row["params"])
        assert (folder / "tokenizer.json").is_file() and (folder / PLAN_FILE).is_file()
    assert not (run_dir / "checkpoints").exists()


@pytest.mark.slow  # two tiny searches: ~2 min on 2 cores
def test_search_resumed_after_a_crash_in_winner_2_does_not_retrain_winner_1(
    tiny_teacher_dir: Path, tmp_path: Path
) -> None:
    from cli_helpers import search

    run_dir = tmp_path / "run"
    crashed = search(tiny_teacher_dir, run_dir, "--winners", "2", env={FAULT_ENV: "winner-2"})
    assert crashed.returncode != 0 and "injected fault" in crashed.stderr, crashed.stderr[-2000:]
    rows = read_csv(run_dir / "winners.csv")
    first, second = (run_dir / r["path"] for r in rows)
    assert (first / "distill.json").is_file() and not (second / "distill.json").is_file()
    before = _files(first)
    resumed = search(tiny_teacher_dir, run_dir, "--winners", "2", "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"  {rows[0]['name']}: distilled earlier, skipped" in resumed.stdout
    assert f"  {rows[0]['name']} step" not in resumed.stdout  # winner 1 not trained again
    assert _files(first) == before
    assert json.loads((second / "distill.json").read_text())["resumed_from_step"] == 1
    final = read_csv(run_dir / "winners.csv")
    assert [r["source"] for r in final] == ["trial", "trial"]  # both continued from their trials' weights
    assert [int(r["tokens_seen"]) for r in final] == [256, 256]  # --short-tokens
    assert [int(r["total_tokens"]) for r in final] == [256 + 128, 256 + 128]  # + --full-tokens
    assert not (run_dir / "checkpoints").exists()
