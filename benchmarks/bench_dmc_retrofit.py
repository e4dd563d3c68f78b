"""A real DMC retrofit of SmolLM2-135M on CPU (#15 item 6): target CR 2 and 4 against a control with the same
continued training at CR 1 (the same code path: decision channels faded out and zeroed, no pressure to merge), KD
from the uncompressed model, on the builtin corpus, measured in one run.

    python benchmarks/bench_dmc_retrofit.py [--tokens 6144] [--seq-len 128] [--batch-size 2] [--ratios 1,2,4]

Each ratio runs `nas-minitron dmc --model M --teacher M --target-cr R` (M: the embedded SmolLM2's HF directory) in
its own process and reads its `dmc.json` (achieved CR on held-out data with hard decisions, per layer; val loss;
KL to the teacher).
A CPU-sized budget: the paper retrofits with ~35B tokens per 2x; this shows what the penalty and the schedule do in
a few dozen steps on a real model, not the quality DMC reaches.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=6144)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--val-sequences", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--ratios", default="1,2,4")
    parser.add_argument("--decision-lr-scale", type=float, default=1.0)
    parser.add_argument("--penalty-weight", type=float, default=1.0)
    parser.add_argument("--reset-decision-rows", action="store_true")
    parser.add_argument("--keep", default=None, help="keep the retrofitted models in DIR/cr<ratio>/")
    args = parser.parse_args()
    print(f"machine: {platform.node()} {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.2f}; "
          f"{time.strftime('%Y-%m-%d %H:%M')}; {args.tokens} tokens of {args.seq_len}, batch {args.batch_size}, "
          f"lr {args.lr}, decision-lr-scale {args.decision_lr_scale}, penalty weight {args.penalty_weight}, "
          f"reset rows {args.reset_decision_rows}")
    from nas_minitron.teacher import DEFAULT_TEACHER, resolve_teacher_dir

    model = resolve_teacher_dir(DEFAULT_TEACHER)  # the GGUF converted once into an HF directory
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for ratio in args.ratios.split(","):
            out = Path(args.keep or tmp) / f"cr{ratio}"
            command = [sys.executable, "-m", "nas_minitron", "dmc", "--model", model, "--teacher", model,
                       "--target-cr", ratio, "--tokens", str(args.tokens), "--seq-len", str(args.seq_len),
                       "--batch-size", str(args.batch_size), "--val-sequences", str(args.val_sequences),
                       "--lr", str(args.lr), "--decision-lr-scale", str(args.decision_lr_scale),
                       "--penalty-weight", str(args.penalty_weight), "--device", "cpu", "--out", str(out)]
            if args.reset_decision_rows:
                command.append("--reset-decision-rows")
            started = time.perf_counter()
            done = subprocess.run(command, capture_output=True, text=True,
                                  env={**os.environ, "TQDM_DISABLE": "1"})
            wall = time.perf_counter() - started
            if done.returncode != 0:
                print(f"CR {ratio}: failed ({done.returncode}): {done.stderr[-1500:]}")
                continue
            record = json.loads((out / "dmc.json").read_text())
            training = record["training"]
            per_layer = record["per_layer_cr"]
            rows.append((float(ratio), record["achieved_cr"], training["val_loss"], training.get("val_kl"),
                         min(per_layer), max(per_layer), wall))
            print(f"CR {ratio}: achieved {record['achieved_cr']:.3f} (layers {min(per_layer):.2f}.."
                  f"{max(per_layer):.2f}), val loss {training['val_loss']:.4f}, val KL {training.get('val_kl')}, "
                  f"{wall:.0f} s", flush=True)
    control = next((r for r in rows if r[0] == 1.0), None)
    if control is not None:
        for r in rows:
            print(f"target {r[0]:g}: achieved CR {r[1]:.3f}, val loss {r[2]:.4f} ({r[2] - control[2]:+.4f} vs "
                  f"control), val KL {r[3]:.4f} ({r[3] - control[3]:+.4f} vs control)")


if __name__ == "__main__":
    main()
