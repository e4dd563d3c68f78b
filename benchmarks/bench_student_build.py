"""Peak memory of building a student: loading the teacher + `materialize` vs slicing the teacher's files (#12).

Each measurement runs in a fresh subprocess and reports `resource.getrusage(RUSAGE_SELF).ru_maxrss` minus the same
figure of an idle interpreter that imported torch, transformers and nas_minitron.prune (the baseline, measured
the same way). "floor" is what any builder must hold: the plan and an empty student (modeling code imported,
every parameter written once), no teacher read. Both ways build the same student (same plan from the same
seeded random scores; the subprocesses print `weights_fingerprint` of their student, the table says whether they
match).

Teachers: SmolLM2-135M (the embedded default, its converted float32 safetensors cache) cut to a ~half-size arch,
and a ~1.1B-parameter random-weight Llama (TinyLlama's shape, untied, bf16) written once to /tmp as safetensors,
cut to ~half, and deleted at the end. The point: the sliced peak tracks the student's size, not the teacher's.

  flock /tmp/nasm-heavy.lock python benchmarks/bench_student_build.py
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

SMOL_ARCH = "L20-H432-I1024-A9-KV3"
BIG_ARCH = "L18-H1536-I4096-A24-KV4"
BIG_CONFIG = dict(  # TinyLlama-1.1B's shape
    model_type="llama", vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
    num_attention_heads=32, num_key_value_heads=4, head_dim=64, max_position_embeddings=2048,
    tie_word_embeddings=False,
)


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _child(mode: str, teacher_dir: str, arch_name: str) -> None:
    """One measurement (runs in its own interpreter); prints one JSON line."""
    import torch
    import transformers

    import nas_minitron.prune  # noqa: F401  (the baseline imports what the builds import)

    _ = transformers.AutoModelForCausalLM  # resolve transformers' lazy module like the builds do
    if mode == "baseline":
        print(json.dumps({"rss_mib": _rss_mib()}))
        return
    from nas_minitron.arch import ArchConfig
    from nas_minitron.families import describe
    from nas_minitron.prune.baselines import random_scores
    from nas_minitron.prune.plan import plan_for
    from nas_minitron.prune.sliced import TeacherFiles
    from nas_minitron.prune.student import build_student
    from nas_minitron.prune.surgery import empty_student
    from nas_minitron.teacher import read_teacher_config, weights_fingerprint

    config = read_teacher_config(teacher_dir)
    t_arch = describe(config)[1]
    target = ArchConfig.parse(arch_name, t_arch.head_dim)
    scores = random_scores(t_arch, 0)
    dtype = TeacherFiles(teacher_dir).dtype("model.embed_tokens.weight")
    start = time.perf_counter()
    if mode == "floor":  # what any builder holds: the plan and the student, every parameter written once
        plan = plan_for(config, teacher_dir, target, scores)
        student = empty_student(describe(config)[0], config, target, plan.keep, dtype, "cpu")
        with torch.no_grad():
            for param in student.parameters():
                param.zero_()
    elif mode == "load":
        teacher = transformers.AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=dtype)
        student, plan = build_student(teacher, teacher_dir, target, scores)
    else:
        student, plan = build_student(teacher_dir, teacher_dir, target, scores, dtype=dtype)
    wall_s = time.perf_counter() - start
    rss = _rss_mib()
    params = sum(p.numel() for p in student.parameters())
    print(json.dumps({"rss_mib": rss, "wall_s": wall_s, "params": params, "plan_params": plan.params,
                      "student_mib": params * torch.finfo(dtype).bits / 8 / 2**20, "dtype": str(dtype),
                      "fingerprint": weights_fingerprint(student)}))


def _measure(mode: str, teacher_dir: str, arch_name: str) -> dict[str, Any]:
    out = subprocess.run([sys.executable, __file__, "--child", mode, teacher_dir, arch_name], check=True,
                         capture_output=True, text=True)
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"  {mode:8s} {result}", flush=True)
    return result


def _write_big_teacher(directory: Path) -> None:
    """A random-weight ~1.1B Llama in bf16 safetensors (its own process: freed before any measurement)."""
    code = (
        "import sys, torch, transformers, json\n"
        "config = transformers.AutoConfig.for_model(**json.loads(sys.argv[2]))\n"
        "torch.manual_seed(0)\n"
        "model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)\n"
        "model.save_pretrained(sys.argv[1])\n"
    )
    subprocess.run([sys.executable, "-c", code, str(directory), json.dumps(BIG_CONFIG)], check=True)


def _teacher_params(teacher_dir: str) -> tuple[int, float]:
    from safetensors import safe_open

    total, size = 0, 0.0
    for file in Path(teacher_dir).glob("*.safetensors"):
        size += file.stat().st_size / 2**20
        with safe_open(str(file), framework="pt") as handle:
            for name in handle.keys():  # noqa: SIM118
                shape = handle.get_slice(name).get_shape()
                count = 1
                for dim in shape:
                    count *= dim
                total += count
    return total, size


def main() -> None:
    from nas_minitron.teacher import DEFAULT_TEACHER, resolve_teacher_dir

    rows = []
    scratch = Path(tempfile.mkdtemp(prefix="nasm_bench_student_", dir="/tmp"))
    try:
        cases = [("SmolLM2-135M (float32 files)", resolve_teacher_dir(DEFAULT_TEACHER), SMOL_ARCH)]
        big = scratch / "llama-1b"
        print("writing the random ~1.1B Llama ...", flush=True)
        _write_big_teacher(big)
        cases.append(("random Llama ~1.1B (bf16 files)", str(big), BIG_ARCH))
        baseline = _measure("baseline", cases[0][1], SMOL_ARCH)["rss_mib"]
        for label, teacher_dir, arch in cases:
            print(label, flush=True)
            t_params, t_mib = _teacher_params(teacher_dir)
            floor = _measure("floor", teacher_dir, arch)
            load = _measure("load", teacher_dir, arch)
            sliced = _measure("slice", teacher_dir, arch)
            rows.append((label, arch, t_params, t_mib, floor, load, sliced, baseline))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    print(f"\nbaseline (idle interpreter, torch + transformers imported): {baseline:.0f} MiB peak RSS")
    print("| teacher | student arch | teacher params / file MiB | student params / MiB | floor MiB | "
          "load+materialize peak MiB (s) | sliced peak MiB (s) | sliced / load | sliced - floor MiB | same student |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for label, arch, t_params, t_mib, floor, load, sliced, base in rows:
        floor_peak, load_peak, slice_peak = (r["rss_mib"] - base for r in (floor, load, sliced))
        print(f"| {label} | {arch} | {t_params / 1e6:,.1f}M / {t_mib:,.0f} | {sliced['params'] / 1e6:,.1f}M / "
              f"{sliced['student_mib']:,.0f} | {floor_peak:,.0f} | {load_peak:,.0f} ({load['wall_s']:.1f}) | "
              f"{slice_peak:,.0f} ({sliced['wall_s']:.1f}) | {slice_peak / load_peak:.2f} | "
              f"{slice_peak - floor_peak:,.0f} | {'yes' if load['fingerprint'] == sliced['fingerprint'] else 'NO'} |")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--child", nargs=3, metavar=("MODE", "TEACHER_DIR", "ARCH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(*args.child)
    else:
        main()
