"""Does activation importance pick better units than weight magnitude and random choice? (no retraining)

Scores SmolLM2-135M on `builtin` calibration sequences, prunes one axis at a time with each criterion, and prints the
validation LM loss of every pruned model next to the teacher's (lower is better). Width axes: activation vs
magnitude vs random (3 seeds); the embedding axis also with and without RMSNorm rescaling; depth: block importance
vs LM-loss drop vs best contiguous block (plus magnitude and random). Optionally the four aggregation choices.

    PYTHONPATH=$PWD python benchmarks/bench_importance_quality.py --calib 64 --val 32 --json out.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from typing import Any

WIDTH_AXES = {
    "mlp": "L30-H576-I768-A9-KV3",
    "embedding": "L30-H432-I1536-A9-KV3",
    "heads": "L30-H576-I1536-A6-KV3",
}
DEPTH_ARCH = "L20-H576-I1536-A9-KV3"
RANDOM_SEEDS = (0, 1, 2)


def _val_loss(teacher: Any, scores: Any, target_name: str, val: Any, depth_method: str = "auto",
              rescale_norms: bool = True) -> float:
    from nas_minitron.arch import ArchConfig
    from nas_minitron.families import describe_model
    from nas_minitron.prune.keep import keep_from_scores
    from nas_minitron.prune.lm_loss import lm_loss
    from nas_minitron.prune.surgery import materialize

    _, t_arch = describe_model(teacher)
    target = ArchConfig.parse(target_name, t_arch.head_dim)
    keep = keep_from_scores(scores, t_arch, target, depth_method)
    student = materialize(teacher, target, keep, rescale_norms=rescale_norms)
    return lm_loss(student, val, batch_size=8)


def _row(label: str, losses: list[float], teacher_loss: float) -> dict[str, Any]:
    mean = statistics.fmean(losses)
    spread = statistics.stdev(losses) if len(losses) > 1 else 0.0
    print(f"  {label:<34} {mean:7.3f}" + (f" ± {spread:.3f} (n={len(losses)})" if len(losses) > 1 else "")
          + f"   Δ teacher {mean - teacher_loss:+.3f}", flush=True)
    return {"criterion": label, "val_loss": mean, "std": spread, "runs": losses}


def _dump(path: str | None, results: dict[str, Any]) -> None:
    if path:
        with open(path, "w") as handle:
            json.dump(results, handle, indent=2)


def _scores(teacher: Any, calib: Any, args: argparse.Namespace, results: dict[str, Any], depth: bool,
            window: int = 1) -> Any:
    """Activation scores (width only, or with layer metrics), cached in --scores-dir across runs."""
    from pathlib import Path

    from nas_minitron.prune.importance import compute_importance
    from nas_minitron.prune.scores import ImportanceScores

    cache = Path(args.scores_dir) / ("depth" if depth else "width") if args.scores_dir else None
    if cache is not None and (cache / "scores.json").is_file():
        return ImportanceScores.load(cache)
    start = time.perf_counter()
    scores = compute_importance(teacher, calib, batch_size=8, layer_metrics=depth, window_sizes=(1, window),
                                loss_sequences=args.loss_samples, progress=True)
    wall_s = time.perf_counter() - start
    results[f"importance_{'depth' if depth else 'width'}_wall_s"] = wall_s
    print(f"importance ({'with layer metrics' if depth else 'width only'}) on {calib.shape[0]}x{calib.shape[1]} "
          f"tokens: {wall_s:.0f} s", flush=True)
    if cache is not None:
        cache.mkdir(parents=True, exist_ok=True)
        scores.save(cache)
    return scores


def main() -> None:
    import contextlib

    import torch

    args = _parser().parse_args()
    with torch.autocast("cpu", dtype=torch.bfloat16) if args.bf16 else contextlib.nullcontext():
        _run(args)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", default="smollm2-135m")
    parser.add_argument("--calib", type=int, default=64, help="calibration sequences")
    parser.add_argument("--val", type=int, default=32, help="validation sequences")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--loss-samples", type=int, default=16, help="sequences for layer-removal losses")
    parser.add_argument("--axes", default="mlp,embedding,heads,depth")
    parser.add_argument("--agg-ablation", action="store_true", help="also compare the 4 aggregation choices")
    parser.add_argument("--json", default=None, help="write all numbers here (rewritten after every axis)")
    parser.add_argument("--depth-calib", type=int, default=16, help="calibration sequences for the depth scores")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast on CPU too (same for every criterion)")
    parser.add_argument("--scores-dir", default=None, help="save/reuse the activation scores here")
    return parser


def _run(args: argparse.Namespace) -> None:
    import torch

    from nas_minitron.arch import ArchConfig
    from nas_minitron.data import take_sequences
    from nas_minitron.families import describe_model
    from nas_minitron.prune.baselines import magnitude_scores, random_scores
    from nas_minitron.prune.importance import compute_importance
    from nas_minitron.prune.lm_loss import lm_loss
    from nas_minitron.teacher import load_teacher

    torch.manual_seed(0)
    teacher, tokenizer = load_teacher(args.teacher)
    _, t_arch = describe_model(teacher)
    calib = take_sequences("builtin", tokenizer, "calibration", args.seq_len, args.calib)
    val = take_sequences("builtin", tokenizer, "validation", args.seq_len, args.val)
    axes = args.axes.split(",")
    results: dict[str, Any] = {"bf16_autocast": args.bf16, "depth_calib": args.depth_calib, "teacher": t_arch.name,
                               "calib_sequences": args.calib, "val_sequences": args.val,
                               "seq_len": args.seq_len, "loss_samples": args.loss_samples, "axes": {}}
    start = time.perf_counter()
    teacher_loss = lm_loss(teacher, val, batch_size=8)
    results["teacher_val_loss"] = teacher_loss
    print(f"teacher {t_arch.name}: validation loss {teacher_loss:.3f} on {args.val}x{args.seq_len} tokens "
          f"({time.perf_counter() - start:.0f} s)", flush=True)

    drop = t_arch.num_hidden_layers - ArchConfig.parse(DEPTH_ARCH, t_arch.head_dim).num_hidden_layers
    width = _scores(teacher, calib, args, results, depth=False)
    magnitude = magnitude_scores(teacher)
    randoms = [random_scores(t_arch, seed) for seed in RANDOM_SEEDS]

    for axis in (a for a in axes if a in WIDTH_AXES):
        target = WIDTH_AXES[axis]
        print(f"{axis} axis: {t_arch.name} -> {target}", flush=True)
        rescales = (True, False) if axis == "embedding" else (True,)
        rows = []
        for rescale in rescales:
            suffix = "" if len(rescales) == 1 else f" (rescale_norms={rescale})"
            rows.append(_row("activation" + suffix, [_val_loss(teacher, width, target, val,
                                                               rescale_norms=rescale)], teacher_loss))
            rows.append(_row("magnitude" + suffix, [_val_loss(teacher, magnitude, target, val,
                                                              rescale_norms=rescale)], teacher_loss))
            rows.append(_row("random" + suffix, [_val_loss(teacher, r, target, val, rescale_norms=rescale)
                                                 for r in randoms], teacher_loss))
        results["axes"][axis] = {"target": target, "rows": rows}
        _dump(args.json, results)

    if "depth" in axes:
        activation = _scores(teacher, calib[: args.depth_calib], args, results, depth=True, window=drop)
        print(f"depth: {t_arch.name} -> {DEPTH_ARCH}", flush=True)
        rows = [_row(f"activation ({method})", [_val_loss(teacher, activation, DEPTH_ARCH, val, method)],
                     teacher_loss) for method in ("block_importance", "loss_drop", "contiguous")]
        rows.append(_row("magnitude", [_val_loss(teacher, magnitude, DEPTH_ARCH, val, "magnitude")], teacher_loss))
        rows.append(_row("random", [_val_loss(teacher, r, DEPTH_ARCH, val, "random") for r in randoms],
                         teacher_loss))
        results["axes"]["depth"] = {"target": DEPTH_ARCH, "rows": rows}
        _dump(args.json, results)

    if args.agg_ablation:
        print("aggregations (batch_agg/seq_agg) on every width axis:", flush=True)
        table = {}
        for batch_agg in ("l2", "mean"):
            for seq_agg in ("mean", "l2"):
                scores = compute_importance(teacher, calib, batch_size=8, batch_agg=batch_agg, seq_agg=seq_agg,
                                            layer_metrics=False)
                for axis, target in WIDTH_AXES.items():
                    loss = _val_loss(teacher, scores, target, val)
                    table[f"{batch_agg}/{seq_agg}/{axis}"] = loss
                    print(f"  batch {batch_agg:<4} seq {seq_agg:<4} {axis:<9} {loss:7.3f}", flush=True)
        results["aggregations"] = table

    _dump(args.json, results)
    print("done", file=sys.stderr)


if __name__ == "__main__":
    main()
