"""Distillation speed ratios and a short distillation, SmolLM2-135M -> a magnitude-pruned ~90M student, builtin data.

Prints, measured in this one run (median step time over `--steps` steps after one warm-up, best of `--rounds`):
  KD step / (plain student training step + teacher forward)        target <= 1.10
  cached-logit KD step / plain student training step                target <= 1.15
where a "step" is the trainer's whole optimizer step (forward, backward, clip, AdamW) at batch B x T, and then
the validation curves of a short full-logit KD run and a cached top-k KD run from the same student.

  PYTHONPATH=. python benchmarks/bench_distill.py --part all
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time
from pathlib import Path

import torch

from nas_minitron.arch import ArchConfig
from nas_minitron.data import take_sequences
from nas_minitron.distill.logit_cache import build_logit_cache
from nas_minitron.distill.trainer import DistillConfig, distill
from nas_minitron.families import describe_model
from nas_minitron.prune.baselines import magnitude_scores
from nas_minitron.prune.keep import keep_from_scores
from nas_minitron.prune.surgery import materialize
from nas_minitron.teacher import load_teacher


def pruned_student(teacher, arch_name: str):  # type: ignore[no-untyped-def]
    _family, t_arch = describe_model(teacher)
    target = ArchConfig.parse(arch_name, t_arch.head_dim)
    keep = keep_from_scores(magnitude_scores(teacher), t_arch, target)
    return materialize(teacher, target, keep), keep.layers


def median_step_s(student, train, val, config, **kwargs) -> float:  # type: ignore[no-untyped-def]
    """Median wall time of the trainer's optimizer steps 2..N (step 1 warms up)."""
    stamps: list[float] = []
    distill(copy.deepcopy(student), train, val, config, on_step=lambda info: stamps.append(time.perf_counter()),
            **kwargs)
    return statistics.median(b - a for a, b in zip(stamps, stamps[1:], strict=False))


def teacher_forward_s(teacher, train, batch_size: int, steps: int) -> float:  # type: ignore[no-untyped-def]
    times = []
    with torch.no_grad():
        for i in range(steps + 1):
            tokens = train[i * batch_size : (i + 1) * batch_size]
            start = time.perf_counter()
            teacher(input_ids=tokens)
            times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def speed(teacher, student, train, val, args) -> None:  # type: ignore[no-untyped-def]
    tokens = args.batch_size * args.seq_len * (args.steps + 1)
    base = dict(num_tokens=tokens, seq_len=args.seq_len, batch_size=args.batch_size, lr=1e-5, num_val_sequences=1)
    with tempfile.TemporaryDirectory() as tmp:
        cache = build_logit_cache(teacher, torch.cat([train, val]), Path(tmp) / "cache", topk=args.topk,
                                  batch_size=args.batch_size)
        best: dict[str, float] = {}
        for _ in range(args.rounds):  # interleaved rounds: a load spike from elsewhere hits one round, not one kind
            runs = {
                "plain": median_step_s(student, train, val, DistillConfig(**base, kd_weight=0, lm_weight=1)),
                "teacher_fwd": teacher_forward_s(teacher, train, args.batch_size, args.steps),
                "kd": median_step_s(student, train, val, DistillConfig(**base), teacher=teacher),
                "cached": median_step_s(student, train, val, DistillConfig(**base, topk=args.topk),
                                        logit_cache=cache),
            }
            best = {k: min(v, best.get(k, float("inf"))) for k, v in runs.items()}
    per = args.batch_size * args.seq_len
    for kind, seconds in best.items():
        print(f"{kind:12s} {seconds:7.3f} s/step  {per / seconds:7.1f} tok/s")
    print(f"KD step / (plain step + teacher fwd) = {best['kd'] / (best['plain'] + best['teacher_fwd']):.3f}"
          f"   (target <= 1.10)")
    print(f"cached top-{args.topk} KD step / plain step = {best['cached'] / best['plain']:.3f}   (target <= 1.15)")


def curves(teacher, student, train, val, layers, args) -> None:  # type: ignore[no-untyped-def]
    config = DistillConfig(num_tokens=args.curve_tokens, seq_len=args.seq_len, batch_size=args.batch_size,
                           lr=args.lr, warmup_steps=2, eval_every_tokens=args.curve_tokens // 4,
                           num_val_sequences=val.shape[0])
    with tempfile.TemporaryDirectory() as tmp:
        cache = build_logit_cache(teacher, train, Path(tmp) / "cache", topk=args.topk, batch_size=args.batch_size)
        results = {
            "full-logit KD": distill(copy.deepcopy(student), train, val, config, teacher=teacher),
            # the teacher here only measures the validation KL (full); training reads the cache
            f"cached top-{args.topk} KD": distill(copy.deepcopy(student), train, val,
                                                  DistillConfig(**{**config.to_dict(), "topk": args.topk}),
                                                  teacher=teacher, logit_cache=cache),
        }
    for label, result in results.items():
        print(f"{label}: step num_tokens val_loss val_kl(full) train_loss wall_s")
        for p in result.curve:
            print(f"  {p.step:4d} {p.num_tokens:8d} {p.val_loss:8.4f} {p.val_kl:8.4f} {p.train_loss:8.4f} "
                  f"{p.wall_s:7.1f}")
    full, cached = results.values()
    print(f"final val_kl: full-logit {full.val_kl:.4f}, cached {cached.val_kl:.4f}, "
          f"difference {cached.val_kl - full.val_kl:+.4f} ({(cached.val_kl / full.val_kl - 1) * 100:+.1f}%)")
    print(f"final val_loss: full-logit {full.val_loss:.4f}, cached {cached.val_loss:.4f}, "
          f"difference {cached.val_loss - full.val_loss:+.4f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=("speed", "curve", "all"), default="all")
    parser.add_argument("--arch", default="L18-H576-I1536-A9-KV3")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--steps", type=int, default=4, help="timed steps per kind (after one warm-up)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--topk", type=int, default=64)
    parser.add_argument("--curve-tokens", type=int, default=2 * 256 * 32)
    parser.add_argument("--val-sequences", type=int, default=8)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's own choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    teacher, tokenizer = load_teacher("smollm2-135m")
    student, layers = pruned_student(teacher, args.arch)
    num_params = sum(p.numel() for p in student.parameters())
    print(f"student {args.arch}: {num_params / 1e6:.1f}M parameters, kept layers {list(layers)}; "
          f"torch threads {torch.get_num_threads()}; batch {args.batch_size}x{args.seq_len}")
    num_train = max(args.curve_tokens // args.seq_len, args.batch_size * (args.steps + 2))
    train = take_sequences("builtin", tokenizer, "train", args.seq_len, num_train)
    val = take_sequences("builtin", tokenizer, "validation", args.seq_len, args.val_sequences)
    if args.part in ("speed", "all"):
        speed(teacher, student, train, val, args)
    if args.part in ("curve", "all"):
        curves(teacher, student, train, val, layers, args)


if __name__ == "__main__":
    main()
