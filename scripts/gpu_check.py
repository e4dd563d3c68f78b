"""The prepared GPU check (issue #12 item 9): what only a CUDA machine can show, in about 5 minutes on one GPU.

1. A tiny-teacher search (the default successive-halving strategy) with `--gpus-per-trial 0.5 --full-gpus 1
   --cache-gpus 1 --stop-after distill`: the logit cache must have been built by one GPU Ray worker in bf16, every
   trial must have trained on CUDA with fp32 parameters (master weights) and bf16 compute, and each winner's full
   distillation too.
2. A ~1.2B-parameter random-weight Llama (Llama-3.2-1B's config): a half-size student cut from its bf16 files onto
   the GPU in fp32, a few short-distillation steps against the bf16 teacher (chunked KD), and one FSDP2 step in a
   one-rank NCCL group with the bf16/fp32 policy; peak GPU memory per stage.

Writes `$OUT/gpu_check.json` (or ./gpu_check.json) and exits 1 when any check fails. Run through
`bash scripts/gpu_check.sh`, which installs the carried wheels first (scripts/gpu_wheels.sh).
"""

from __future__ import annotations

import csv
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import torch  # noqa: E402

RESULTS: dict[str, Any] = {"torch": torch.__version__, "cuda": torch.version.cuda, "checks": {}}


OUT = Path(os.environ.get("OUT") or ".")


def record(name: str, ok: bool, **facts: Any) -> None:
    """Print a check's result and rewrite gpu_check.json at once: a run stopped by its time limit keeps what it had."""
    RESULTS["checks"][name] = {"ok": ok, **facts}
    print(f"[{'PASS' if ok else 'FAIL'}] {name}: {json.dumps(facts, default=str)}", flush=True)
    (OUT / "gpu_check.json").write_text(json.dumps(RESULTS, indent=1, default=str) + "\n")


def peak_gib() -> float:
    return round(torch.cuda.max_memory_allocated() / 2**30, 3)


def tiny_search(work: Path) -> None:
    from cli_helpers import TINY_RUNG_ARGS  # type: ignore[import-not-found]  # tests/ is on sys.path above
    from tiny_models import save_tiny_teacher  # type: ignore[import-not-found]

    teacher = save_tiny_teacher(work / "teacher", "llama")
    run_dir = work / "run"
    args = [sys.executable, "-m", "nas_minitron", "search", "--teacher", str(teacher), *TINY_RUNG_ARGS,
            "--gpus-per-trial", "0.5", "--full-gpus", "1", "--cache-gpus", "1", "--stop-after", "distill",
            "--run-dir", str(run_dir)]
    started = time.perf_counter()
    proc = subprocess.run(args, capture_output=True, text=True, timeout=150, cwd=work)
    wall = round(time.perf_counter() - started, 1)
    if proc.returncode != 0:
        record("tiny_search", False, wall_s=wall, rc=proc.returncode, stderr=proc.stderr[-3000:])
        return
    with (run_dir / "trials.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    done = [r for r in rows if r["status"] == "COMPLETE"]
    placements = [(r["name"], r["device"], r["param_dtype"], r["compute_dtype"]) for r in rows]
    trials_ok = bool(done) and all(d.startswith("cuda") and p == "float32" and c == "bfloat16"
                                   for _, d, p, c in placements)
    winners = {p.parent.name: json.loads(p.read_text()) for p in (run_dir / "winners").glob("*/distill.json")}
    winner_facts = {name: {k: rec.get(k) for k in ("device", "param_dtype", "compute_dtype")}
                    for name, rec in winners.items()}
    winners_ok = bool(winners) and all(str(f["device"]).startswith("cuda") and f["param_dtype"] == "float32"
                                       for f in winner_facts.values())
    cache = json.loads((run_dir / "stages" / "logit_cache.json").read_text())
    cache_ok = cache.get("cache_dtype") == "bf16" and cache.get("cache_workers") == 1
    record("tiny_search", trials_ok and winners_ok and cache_ok, wall_s=wall, trials=placements,
           winners=winner_facts, cache={k: v for k, v in cache.items() if k.startswith("cache_")})


LLAMA_1B = dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                num_attention_heads=32, num_key_value_heads=8, head_dim=64, max_position_embeddings=4096,
                tie_word_embeddings=True, rope_theta=500000.0)
STUDENT = "L12-H1536-I4096-A24-KV8"


def big_model(work: Path) -> None:
    import transformers

    from nas_minitron.distill.config import DistillConfig
    from nas_minitron.distill.trainer import distill
    from nas_minitron.families import describe
    from nas_minitron.prune.baselines import random_scores
    from nas_minitron.prune.plan import plan_for, target_arch
    from nas_minitron.prune.sliced import slice_student

    teacher_dir = work / "llama-1b"
    config = transformers.AutoConfig.for_model("llama", **LLAMA_1B)
    with torch.device("cuda"):
        teacher = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    teacher.save_pretrained(teacher_dir)
    teacher_config = json.loads((teacher_dir / "config.json").read_text())
    params = sum(p.numel() for p in teacher.parameters())
    del teacher
    torch.cuda.empty_cache()
    _, t_arch = describe(teacher_config)
    plan = plan_for(teacher_config, str(teacher_dir), target_arch(teacher_config, STUDENT), random_scores(t_arch, 0))

    torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    student = slice_student(teacher_dir, plan.arch, plan.keep, dtype=torch.float32, device="cuda")
    record("slice_1b_student", next(student.parameters()).is_cuda, teacher_params=params, student_params=plan.params,
           seconds=round(time.perf_counter() - started, 2), peak_gib=peak_gib())

    teacher = transformers.AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.bfloat16)
    teacher.to("cuda")  # type: ignore[arg-type]  # transformers' wrapped `to`
    seq_len, batch, vocab = 2048, 4, int(LLAMA_1B["vocab_size"])
    data = torch.randint(0, vocab, (batch * 4, seq_len))  # [16, 2048]: 4 steps
    val = torch.randint(0, vocab, (2, seq_len))
    cfg = DistillConfig(num_tokens=batch * seq_len * 4, seq_len=seq_len, batch_size=batch, lr=1e-4,
                        num_val_sequences=2, dtype="bf16", eval_every_tokens=batch * seq_len * 4)
    torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    result = distill(student, data, val, cfg, teacher=teacher)
    wall = time.perf_counter() - started
    record("short_distill_1b", result.param_dtype == "float32" and str(result.device).startswith("cuda"),
           tokens=result.num_tokens, seconds=round(wall, 1), tokens_per_s=round(result.num_tokens / wall),
           peak_gib=peak_gib(), param_dtype=result.param_dtype, compute_dtype=result.compute_dtype,
           val_kl=[round(p.val_kl, 4) for p in result.curve])
    del student
    torch.cuda.empty_cache()
    fsdp_step(teacher_dir, plan, teacher, data[:batch], val)


def fsdp_step(teacher_dir: Path, plan: Any, teacher: Any, data: torch.Tensor, val: torch.Tensor) -> None:
    import torch.distributed as dist

    from nas_minitron.distill.config import DistillConfig
    from nas_minitron.distill.fsdp import shard_student
    from nas_minitron.distill.trainer import distill
    from nas_minitron.prune.sliced import slice_student

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1,
                            device_id=torch.device("cuda:0"))
    try:
        student = slice_student(teacher_dir, plan.arch, plan.keep, dtype=torch.float32, device="cuda")
        shard_student(student, "cuda", bf16=True)
        cfg = DistillConfig(num_tokens=data.numel(), seq_len=data.shape[1], batch_size=data.shape[0], lr=1e-4,
                            num_val_sequences=2, dtype="bf16", eval_every_tokens=data.numel())
        torch.cuda.reset_peak_memory_stats()
        started = time.perf_counter()
        result = distill(student, data, val, cfg, teacher=teacher)
        record("fsdp2_step_1b", result.num_steps == 1, seconds=round(time.perf_counter() - started, 1),
               peak_gib=peak_gib(), param_dtype=result.param_dtype, val_kl=[round(p.val_kl, 4) for p in result.curve])
    finally:
        dist.destroy_process_group()


def main() -> int:
    if not torch.cuda.is_available():
        record("cuda_visible", False, reason="torch sees no CUDA device")
    else:
        RESULTS["device"] = torch.cuda.get_device_name(0)
        with tempfile.TemporaryDirectory(prefix="nasm-gpu-") as tmp:
            for name, check in (("tiny_search", tiny_search), ("big_model", big_model)):
                try:
                    check(Path(tmp))
                except Exception as err:  # every check reports, none hides another
                    record(name, False, error=f"{type(err).__name__}: {err}", traceback=traceback.format_exc()[-3000:])
    (OUT / "gpu_check.json").write_text(json.dumps(RESULTS, indent=1, default=str) + "\n")
    return 0 if RESULTS["checks"] and all(c["ok"] for c in RESULTS["checks"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
