"""The resource plan (`pipeline/plan.py`, issue #13 item 4): hand-checked arithmetic, what can refuse a run, and
`search --dry-run` / `--json` on the tiny teacher (no run directory, no Ray), `plan.json` in a real run."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

from cli_helpers import one_error_line, search
from nas_minitron.errors import UserError
from nas_minitron.pipeline.plan import (
    GIB,
    PLAN_FILE,
    RAY_BYTES,
    RUNTIME_BYTES,
    Plan,
    StagePlan,
    StudentShape,
    make_plan,
)
from nas_minitron.pipeline.run_dir import STAGES
from nas_minitron.pipeline.settings import SearchSettings, resolve_settings

# A teacher of 4 layers, hidden 64, vocabulary 1000, described by hand (the plan needs no weights).
RESOLVED = {"teacher_arch": "L4-H64-I128-A4-KV2", "head_dim": 16, "teacher_params": 2_000_000,
            "budget_params": 1_000_000, "vocab_size": 1000}
SMALL: dict[str, Any] = dict(seq_len=32, batch_size=2, short_tokens=256, full_tokens=128, validation_sequences=4,
                             topk=16, trials=6, strategy="sample")
STUDENT = StudentShape(params=1_000_000, num_hidden_layers=4, hidden_size=64)


def _stage(plan: Plan, name: str) -> StagePlan:
    return next(s for s in plan.stages if s.stage == name)


def test_the_arithmetic_on_a_hand_checked_case() -> None:
    plan = make_plan(SearchSettings(**SMALL, gpus_per_trial=0.5), RESOLVED, [STUDENT])
    assert [s.stage for s in plan.stages] == list(STAGES)
    # data/: uint16 token streams (vocabulary 1000) of 8 short + 4 validation sequences of 32 tokens;
    # the cache: 12 sequences x 32 tokens x (int32 token + 16 x (fp16 log-prob + int32 id))
    cache = _stage(plan, "logit_cache")
    assert cache.disk_bytes == 2 * 32 * (8 + 4) + 12 * 32 * (4 + 16 * 6) == 39_168
    assert cache.tokens == 12 * 32
    # one GPU trial: CUDA context + 16 B/param + 4 layers x 64 tokens x 64 hidden x 34 B (bf16 activations)
    # + the top-k KD loss, 4 fp32 [64, 1000] tensors; 2 trials share a GPU at --gpus-per-trial 0.5
    one_trial = GIB + 16 * 1_000_000 + 4 * 64 * 64 * 34 + 4 * 64 * 1000 * 4
    assert one_trial == 1_091_322_880
    assert _stage(plan, "trials").gpu_bytes_per_device == 2 * one_trial
    # trials' disk: 2 running checkpoints (12 B/param) + the trained students that can still win (4 B/param):
    # 1 winner + 2 running, not all 6 trials (one objective)
    assert _stage(plan, "trials").disk_bytes == 2 * 12 * 1_000_000 + 3 * 4 * 1_000_000
    pareto = make_plan(SearchSettings(**SMALL, objectives=("val_kl", "params")), RESOLVED, [STUDENT])
    assert _stage(pareto, "trials").disk_bytes == 2 * 12 * 1_000_000 + 6 * 4 * 1_000_000
    totals = plan.to_dict()["totals"]
    assert totals["disk_bytes"] == sum(s.disk_bytes for s in plan.stages)
    assert totals["gpu_bytes_per_device"] == 2 * one_trial and plan.fits


def test_the_rung_search_arithmetic() -> None:
    """--strategy rungs on 8 candidates: rungs 0, 64, 256 tokens (eta 4, 64-token steps) over 8 -> 2 -> 1."""
    settings = SearchSettings(**{**SMALL, "strategy": "rungs"})
    plan = make_plan(settings, RESOLVED, [STUDENT] * 8)
    trials = _stage(plan, "trials")
    val = 4 * 32  # one validation per candidate per rung
    assert trials.tokens == 8 * (0 + val) + 2 * (64 + val) + 1 * (192 + val) == 1728
    assert "8 -> 2 -> 1" in trials.basis
    # a checkpoint per candidate alive after rung 1 (12 B/param) + the winner's exported weights (4 B/param)
    assert trials.disk_bytes == 2 * 12 * 1_000_000 + 4 * 1_000_000


def test_the_constants_it_mirrors_match_their_owners() -> None:
    """The plan uses the constants of the code it models (read from their owners, never copied)."""
    from nas_minitron.distill.config import DistillConfig
    from nas_minitron.pipeline import plan, stages

    assert plan.GRAD_CHECKPOINTING_PARAMS == stages.GRAD_CHECKPOINTING_PARAMS
    assert DistillConfig(num_tokens=1).loss_chunk_tokens == plan.LOSS_CHUNK_TOKENS


def test_time_scales_with_tokens_and_parameters() -> None:
    base = make_plan(SearchSettings(**SMALL), RESOLVED, [STUDENT])
    more = make_plan(SearchSettings(**{**SMALL, "full_tokens": 1280}), RESOLVED, [STUDENT])
    bigger = StudentShape(params=2_000_000, num_hidden_layers=4, hidden_size=64)
    slower = make_plan(SearchSettings(**SMALL), RESOLVED, [bigger])
    assert _stage(more, "distill").seconds > _stage(base, "distill").seconds
    assert _stage(slower, "trials").seconds > _stage(base, "trials").seconds


def test_the_plan_has_a_dmc_row() -> None:
    """--dmc-cr 2,4 on 2 winners: 4 retrofits in the driver; --dmc-cr none: nothing but the runtime."""
    small: dict[str, Any] = dict(seq_len=32, batch_size=2, validation_sequences=4, winners=2)
    none = _stage(make_plan(SearchSettings(**small), RESOLVED, [STUDENT]), "dmc")
    assert (none.tokens, none.disk_bytes, none.gpu_bytes_per_device, none.seconds) == (0, 0, 0, 0.0)
    # the local Ray cluster is up through every stage, and the driver keeps the fp32 teacher (2M params) for eval
    assert none.cpu_ram_bytes == RUNTIME_BYTES + RAY_BYTES + 4 * 2_000_000
    plan = make_plan(SearchSettings(**small, dmc_cr="2,4", dmc_tokens=512), RESOLVED, [STUDENT])
    row = _stage(plan, "dmc")
    assert row.tokens == 2 * 2 * 512  # winners x ratios x --dmc-tokens
    assert row.disk_bytes == 2 * 2 * 4 * 1_000_000 + 2 * 12 * 1_000_000  # 4 B/param each + 2 checkpoints
    # a KD step with a live teacher in the driver (CPU): 16 B/param + the fp32 teacher + activations + DMC's
    # explicit scores (2 fp32 [B, heads, T, T] per layer) + the full KD loss + its rows as int64
    assert row.cpu_ram_bytes == (RAY_BYTES + RUNTIME_BYTES + 16 * 1_000_000 + 4 * 2_000_000 + 4 * 64 * 64 * 68
                                 + 4 * 2 * 4 * 32 * 32 * 4 * 2 + 7 * 64 * 1000 * 4 + 8 * (512 + 4 * 32))
    assert row.seconds > 0 and "ratio(s) 2, 4" in row.basis and plan.fits


def test_on_cpu_only_disk_and_ram_can_refuse() -> None:
    settings = SearchSettings(**SMALL, gpu_memory_gib=0.001)
    assert make_plan(settings, RESOLVED, [STUDENT], gpu_memory_gib=0.001).fits  # no GPU used: its size is moot
    no_disk = make_plan(settings, RESOLVED, [STUDENT], free_disk_bytes=1000)
    assert not no_disk.fits and "free" in no_disk.problems[0] and "GiB" in no_disk.problems[0]
    no_ram = make_plan(settings, RESOLVED, [STUDENT], total_ram_bytes=GIB // 4)
    assert not no_ram.fits and any("RAM" in p for p in no_ram.problems)


def test_the_embedded_default_fits_this_kind_of_machine() -> None:
    """The default run's settings on a SmolLM2-135M-shaped teacher: far below 24 GiB of RAM, nothing on a GPU."""
    smollm2 = {"teacher_arch": "L30-H576-I1536-A9-KV3", "head_dim": 64, "teacher_params": 134_515_008,
               "budget_params": 67_257_504, "vocab_size": 49152}
    plan = make_plan(SearchSettings(), smollm2, [StudentShape(70_086_744, 30, 576)], free_disk_bytes=20 * GIB,
                     total_ram_bytes=24 * GIB)
    totals = plan.to_dict()["totals"]
    assert plan.fits and totals["gpu_bytes_per_device"] == 0
    assert totals["cpu_ram_bytes"] < 12 * GIB and totals["disk_bytes"] < 10 * GIB


def test_token_streams_take_2_or_4_bytes_a_token_and_the_full_stream_is_the_distill_stages() -> None:
    """2B full-distillation tokens of a 128k vocabulary: 8 GB of uint32 on disk in the distill stage, none in RAM."""
    resolved = {**RESOLVED, "vocab_size": 128_256}
    uint16 = make_plan(SearchSettings(**SMALL), RESOLVED, [STUDENT])
    small = make_plan(SearchSettings(**SMALL), resolved, [STUDENT])
    big = make_plan(SearchSettings(**{**SMALL, "full_tokens": 2_000_000_000}), resolved, [STUDENT])
    assert _stage(small, "logit_cache").disk_bytes - _stage(uint16, "logit_cache").disk_bytes == 2 * 32 * (8 + 4)
    assert _stage(big, "logit_cache").disk_bytes == _stage(small, "logit_cache").disk_bytes  # the trials' only
    full_stream = 4 * 32 * math.ceil(2_000_000_000 / 32)
    assert _stage(big, "distill").disk_bytes - _stage(small, "distill").disk_bytes == full_stream - 4 * 32 * 4
    assert _stage(big, "distill").cpu_ram_bytes == _stage(small, "distill").cpu_ram_bytes


def test_an_impossible_gpu_plan_names_the_numbers_and_what_would_fit() -> None:
    big = StudentShape(params=4_500_000_000, num_hidden_layers=32, hidden_size=4096)
    resolved = {"teacher_arch": "L32-H4096-I14336-A32-KV8", "head_dim": 128, "teacher_params": 8_030_000_000,
                "budget_params": 4_500_000_000, "vocab_size": 128_256}
    settings = SearchSettings(seq_len=4096, batch_size=8, gpus_per_trial=1, full_gpus=1, topk=64)
    plan = make_plan(settings, resolved, [big], gpu_memory_gib=80)
    assert not plan.fits
    trial = next(p for p in plan.problems if p.startswith("a trial"))
    assert "per GPU" in trial and "80.00 GiB" in trial and "--batch-size" in trial
    full = next(p for p in plan.problems if p.startswith("the full distillation"))
    assert "--full-gpus" in full
    assert json.loads(json.dumps(plan.to_dict()))["fits"] is False


def test_dry_run_prints_the_plan_and_creates_nothing(tiny_teacher_dir: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    result = search(tiny_teacher_dir, run_dir, "--dry-run")
    assert result.returncode == 0, result.stderr[-2000:]
    assert all(stage in result.stdout for stage in STAGES) and "total" in result.stdout
    assert not run_dir.exists()
    as_json = search(tiny_teacher_dir, run_dir, "--dry-run", "--json", "--eval-limit", "none")
    assert as_json.returncode == 0, as_json.stderr[-2000:]
    plan = json.loads(as_json.stdout)
    assert set(plan) == {"stages", "totals", "gpu_memory_bytes", "fits", "problems", "warnings"} and plan["fits"]
    assert plan["warnings"] == []  # a tiny teacher: its CPU-sized settings are what it needs
    eval_basis = next(s["basis"] for s in plan["stages"] if s["stage"] == "eval")
    assert "x 1000 items" in eval_basis  # --eval-limit none: every item (plan.EVAL_ITEMS_UNLIMITED assumed)
    assert [s["stage"] for s in plan["stages"]] == list(STAGES)
    keys = {"stage", "tokens", "cpu_ram_bytes", "gpu_bytes_per_device", "disk_bytes", "seconds", "estimated", "basis"}
    assert all(set(s) == keys for s in plan["stages"])
    assert plan["totals"]["cpu_ram_bytes"] < 4 * GIB and plan["totals"]["disk_bytes"] < GIB  # the tiny search
    assert not run_dir.exists()


def test_an_impossible_plan_is_refused_in_one_line_before_ray_and_the_run_dir(
    tiny_teacher_dir: Path, tmp_path: Path
) -> None:
    run_dir = tmp_path / "run"
    gpu = ("--gpus-per-trial", "1", "--gpu-memory-gib", "0.001")
    dry = search(tiny_teacher_dir, run_dir, "--dry-run", *gpu)
    line = one_error_line(dry)
    assert "does not fit" in line and "0.00 GiB" in line and "per GPU" in line
    assert "a trial" in dry.stdout  # the table came first, with the problem
    # a real run is refused the same way, before it would start Ray (no Ray log, nothing written)
    real = search(tiny_teacher_dir, run_dir, *gpu)
    assert "does not fit" in one_error_line(real) and "Ray" not in real.stdout + real.stderr
    assert not run_dir.exists()


def test_a_run_saves_its_plan(tiny_teacher_dir: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    result = search(tiny_teacher_dir, run_dir, "--stop-after", "candidates")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "plan (plan.json)" in result.stdout
    saved = json.loads((run_dir / PLAN_FILE).read_text())
    assert saved["fits"] and [s["stage"] for s in saved["stages"]] == ["candidates"]


@pytest.mark.parametrize("value", [0.0, -1.0, float("nan")])
def test_gpu_memory_gib_must_be_positive(value: float) -> None:
    with pytest.raises(UserError, match="gpu_memory_gib must be a number > 0"):
        resolve_settings(None, {"gpu_memory_gib": value})


def test_the_logit_cache_on_gpu_workers_divides_the_time_and_holds_a_bf16_teacher_per_gpu() -> None:
    resolved = {"teacher_arch": "L32-H4096-I14336-A32-KV8", "head_dim": 128, "teacher_params": 8_030_000_000,
                "budget_params": 4_500_000_000, "vocab_size": 128_256}
    base: dict[str, Any] = dict(seq_len=4096, batch_size=2, short_tokens=50_000_000, topk=64, device="cuda")
    one = _stage(make_plan(SearchSettings(**base), resolved, [], gpu_memory_gib=80), "logit_cache")
    eight = _stage(make_plan(SearchSettings(**base, cache_gpus=8, cache_batch_size=16), resolved, [],
                             gpu_memory_gib=80), "logit_cache")
    assert eight.tokens == one.tokens and eight.disk_bytes == one.disk_bytes
    assert eight.seconds == pytest.approx(one.seconds / 8 + 30.0, rel=1e-6)  # + the workers' load
    # per GPU: CUDA context + bf16 teacher + the chunked head (2 fp32 [1024, V]) + 16 fp32 [16 x 4096, H] buffers
    expected = GIB + 2 * 8_030_000_000 + 2 * 1024 * 128_256 * 4 + 16 * 16 * 4096 * 4096 * 4
    assert eight.gpu_bytes_per_device == expected
    assert "8 GPU Ray workers" in eight.basis


def test_the_llama_preset_fits_8_gpus_of_80_gib(tmp_path: Path) -> None:
    from cli_helpers import run_cli
    from nas_minitron.space.presets import load_preset

    teacher = tmp_path / "llama-3.1-8b"  # its config.json only: the plan reads no weights and no tokenizer
    teacher.mkdir()
    (teacher / "config.json").write_text(json.dumps(load_preset("llama-3.1-8b")))
    result = run_cli("search", "--config", "llama-3.1-8b-8gpu", "--teacher", str(teacher), "--run-dir",
                     str(tmp_path / "run"), "--dry-run", "--json", cwd=tmp_path)
    plan = json.loads(result.stdout)
    stages = {s["stage"]: s for s in plan["stages"]}
    assert all(s["gpu_bytes_per_device"] <= 80 * GIB for s in plan["stages"]), plan["stages"]
    assert stages["trials"]["gpu_bytes_per_device"] > 40 * GIB  # a 4.5B student with its AdamW state on one GPU
    assert "1024 x 4096" in stages["importance"]["basis"] and "8 GPU Ray workers" in stages["logit_cache"]["basis"]
    assert "8 Ray Train worker(s) on cuda" in stages["distill"]["basis"]
    # only this machine's disk can refuse it (the run writes ~1 TiB: checkpoints of the rung-1 candidates)
    assert all(p.startswith("the run writes") for p in plan["problems"]), plan["problems"]
    assert plan["totals"]["disk_bytes"] < 2 * 2**40 and plan["warnings"] == []
    assert not (tmp_path / "run").exists()


def test_an_unknown_config_names_the_presets(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"--config 'llama-8gpu': no such file, and not a shipped run preset; "
                                        r"presets: llama-3.1-8b-8gpu"):
        resolve_settings(Path("llama-8gpu"), {})
    assert resolve_settings(Path("llama-3.1-8b-8gpu"), {"budget": "4B"}).budget == "4B"  # flags override it
