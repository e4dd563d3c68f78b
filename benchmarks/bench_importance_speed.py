"""Importance pass cost relative to a plain forward pass over the same batches, and peak memory.

Timings alternate plain and hooked passes in one process (min of --repeats rounds each), so load from other
processes hits both alike. Peak memory: each mode runs in a fresh child process; ru_maxrss after loading the model
and after the pass are reported (the difference is what the pass itself adds).

    PYTHONPATH=$PWD python benchmarks/bench_importance_speed.py --num 16 --seq-len 256 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from typing import Any

MODES = ("plain", "plain_no_logits", "width", "block", "layer_loss")


def _setup(args: argparse.Namespace) -> tuple[Any, Any]:
    from nas_minitron.data import take_sequences
    from nas_minitron.teacher import load_teacher

    model, tokenizer = load_teacher(args.teacher)
    batches = take_sequences("builtin", tokenizer, "calibration", args.seq_len, args.num)  # [N, T]
    return model, batches


def _run_mode(mode: str, model: Any, batches: Any, args: argparse.Namespace) -> float:
    import torch

    from nas_minitron.prune.importance import compute_importance

    start = time.perf_counter()
    if mode.startswith("plain"):
        keep = 1 if mode == "plain_no_logits" else 0
        with torch.inference_mode():
            for i in range(0, batches.shape[0], args.batch_size):
                model(input_ids=batches[i : i + args.batch_size], use_cache=False, logits_to_keep=keep)
    else:
        compute_importance(model, batches, batch_size=args.batch_size, layer_metrics=mode != "width",
                           layer_loss=mode == "layer_loss", window_sizes=(1,), loss_sequences=args.loss_samples)
    return time.perf_counter() - start


def _peak(args: argparse.Namespace) -> None:
    model, batches = _setup(args)
    loaded_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    wall_s = _run_mode(args.child, model, batches, args)
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"mode": args.child, "loaded_mib": loaded_kib / 1024, "peak_mib": peak_kib / 1024,
                      "wall_s": wall_s}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", default="smollm2-135m")
    parser.add_argument("--num", type=int, default=16, help="sequences")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--loss-samples", type=int, default=8, help="sequences for the layer-removal losses")
    parser.add_argument("--no-memory", action="store_true", help="skip the fresh-process memory runs")
    parser.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _peak(args)
        return

    model, batches = _setup(args)
    _run_mode("width", model, batches[: args.batch_size], args)  # warm-up
    best = {mode: float("inf") for mode in ("plain", "plain_no_logits", "width", "block")}
    for _ in range(args.repeats):
        for mode in best:
            best[mode] = min(best[mode], _run_mode(mode, model, batches, args))
    loss_s = _run_mode("layer_loss", model, batches, args)
    tokens = batches.numel()
    print(f"SmolLM2-135M, {args.num}x{args.seq_len} tokens, batch {args.batch_size}, min of {args.repeats}:")
    for mode, wall_s in best.items():
        print(f"  {mode:<16} {wall_s:7.2f} s  {tokens / wall_s:7.0f} tok/s  ratio to plain {wall_s / best['plain']:.3f}"
              f"  to plain_no_logits {wall_s / best['plain_no_logits']:.3f}")
    print(f"  layer_loss       {loss_s:7.2f} s  (one run: block importance + {model.config.num_hidden_layers} "
          f"single-layer removals on {args.loss_samples} sequences)  ratio to plain {loss_s / best['plain']:.2f}")
    if not args.no_memory:
        base = [sys.executable, __file__, "--num", str(args.num), "--seq-len", str(args.seq_len),
                "--batch-size", str(args.batch_size), "--loss-samples", str(args.loss_samples)]
        for mode in ("plain", "width", "layer_loss"):
            out = subprocess.run([*base, "--child", mode], capture_output=True, text=True, check=True).stdout
            row = json.loads(out.strip().splitlines()[-1])
            print(f"  peak RSS {mode:<11} {row['peak_mib']:7.0f} MiB (after load {row['loaded_mib']:.0f} MiB, "
                  f"pass adds {row['peak_mib'] - row['loaded_mib']:.0f} MiB)")


if __name__ == "__main__":
    main()
