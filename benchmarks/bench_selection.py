"""Issue #14 item 6: a long-run ground truth for the search, and every selection strategy measured against it.

Phases (each writes its results under `<run-dir>/selection/` as it goes, one JSON per candidate, so an interrupted
phase resumes where it stopped):

  prep   `nas-minitron search --budget 0.5x --stop-after logit_cache` with the default settings into `--run-dir`
         (candidates, importance, token streams, top-k logit cache), then the ground truth's own data: the next
         `--long-sequences` training sequences after the search's streams (tokens the search never trains on), a
         held-out set of `--heldout-sequences` validation sequences after the search's validation set (text the
         search never validates on), and a top-k logit cache over both plus the search's validation set.
  short  every candidate distilled for the search's top rung (`--short-tokens`, the search's exact trial spec:
         `pipeline.stages.trial_spec`) with a validation point at every rung of the default rung ladder, per
         validation sequence: the full table any rung search reads (a promoted candidate continues from its
         checkpoint with the schedule over the whole top rung, so its curve is the unpromoted one: tested in
         tests/search/test_rungs_cli.py), and the "short-distill every candidate" strategy.
  long   a fixed subset (>= 10) spread over the step-0 ranking: its top 3, the top 3 after the short budget, the
         pure-width baseline, the most uniform shrink (Torch-Pruning's shape), two from the middle, two from the
         bottom, and every strategy's pick; each distilled from its pruned init for `--long-tokens` (>= 8x the top
         rung) on the ground truth's stream, validated on the held-out set.
  report the long-run ranking and, per strategy (the default rung search replayed on the short table; the old
         4-trial Optuna search replayed over 50 seeds; the step-0 choice; short-distill every candidate): the pick's
         long-run rank and regret, its parameters, the Spearman of every rung with the long run, and the compute.

  .venv/bin/python benchmarks/bench_selection.py --run-dir runs/selection --phase all --workers 2
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from datetime import date
from pathlib import Path
from typing import Any

from nas_minitron.atomic import write_json_atomic

PHASES = ("prep", "short", "long", "report")


def _load_run(run_dir: Path) -> tuple[Any, Any]:
    from nas_minitron.pipeline.run_dir import Run
    from nas_minitron.pipeline.settings import SearchSettings, resolve_settings

    config = json.loads((run_dir / "config.json").read_text())
    fields = {f.name for f in dataclasses.fields(SearchSettings)}
    settings = resolve_settings(None, {k: v for k, v in config.items() if k in fields})
    return Run(settings, run_dir, resume=True, log=print), settings


def prep(run_dir: Path, long_sequences: int, heldout_sequences: int) -> None:
    if not (run_dir / "stages" / "logit_cache.json").is_file():
        cmd = [sys.executable, "-m", "nas_minitron", "search", "--budget", "0.5x", "--run-dir", str(run_dir),
               "--stop-after", "logit_cache"]
        if (run_dir / "config.json").is_file():
            cmd.append("--resume")
        subprocess.run(cmd, check=True)
    out = run_dir / "selection" / "data"
    if (out / "done.json").is_file():
        return
    import torch

    from nas_minitron.atomic import atomic_directory
    from nas_minitron.data import save_sequences, take_sequences
    from nas_minitron.distill.logit_cache import build_logit_cache

    run, s = _load_run(run_dir)
    teacher, tokenizer = run.teacher()
    searched = torch.cat([run.tokens("train_short").tensor(), run.tokens("train_full").tensor()])  # [N, T]
    train = take_sequences(s.data, tokenizer, "train", s.seq_len, searched.shape[0] + long_sequences, s.seed)
    assert torch.equal(train[: searched.shape[0]], searched)
    long_train = train[searched.shape[0]:]
    val = run.tokens("validation").tensor()
    allval = take_sequences(s.data, tokenizer, "validation", s.seq_len, val.shape[0] + heldout_sequences, s.seed)
    assert torch.equal(allval[: val.shape[0]], val)
    heldout = allval[val.shape[0]:]
    with atomic_directory(out, overwrite=True) as tmp:
        save_sequences(tmp / "train_long.safetensors", long_train)
        save_sequences(tmp / "heldout.safetensors", heldout)
        build_logit_cache(teacher, torch.cat([long_train, heldout]), tmp / "logit_cache", s.topk, s.batch_size,
                          tokenizer=tokenizer)
        write_json_atomic(tmp / "done.json", {"long_sequences": long_sequences, "heldout_sequences": heldout_sequences})


def _run_one(arch_name: str, spec: Any, out: str) -> dict[str, Any]:
    """One candidate's distillation in this (spawned) process; its curve with per-sequence values."""
    import shutil

    from nas_minitron.search.protocol import trial_weights_path
    from nas_minitron.search.worker import run_candidate

    points: list[dict[str, Any]] = []
    start = time.perf_counter()
    run_candidate(arch_name, spec, lambda metrics, _checkpoint: points.append(dict(metrics)), None)
    wall_s = time.perf_counter() - start
    shutil.rmtree(trial_weights_path(spec.run_dir, arch_name), ignore_errors=True)  # 250 MB each: not needed
    keys = ("step", "num_tokens", "val_kl", "val_loss", "val_kl_seq", "val_loss_seq", "wall_s")
    record = {"name": arch_name, "wall_s": wall_s, "params": points[-1].get("params") if points else None,
              "curve": [{k: p.get(k) for k in keys} for p in points]}
    write_json_atomic(Path(out) / f"{arch_name}.json", record)
    return record


def _pool(names: list[str], spec: Any, out: Path, workers: int) -> None:
    import multiprocessing

    todo = [n for n in names if not (out / f"{n}.json").is_file()]
    out.mkdir(parents=True, exist_ok=True)
    print(f"{len(todo)} of {len(names)} candidates to distill into {out}", flush=True)
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = {pool.submit(_run_one, n, spec, str(out)): n for n in todo}
        for future in as_completed(futures):
            record = future.result()
            last = record["curve"][-1] if record["curve"] else {}
            print(f"  {record['name']}: {record['wall_s']:.0f} s, val_kl {last.get('val_kl')}", flush=True)


def short_spec(run_dir: Path, rung_tokens: int) -> Any:
    from nas_minitron.pipeline.stages import trial_spec

    run, _ = _load_run(run_dir)
    spec = trial_spec(run)
    distill = dataclasses.replace(spec.distill, eval_every_tokens=rung_tokens, keep_last_k=1)
    return dataclasses.replace(spec, run_dir=str(run_dir / "selection" / "short_run"), distill=distill)


def long_spec(run_dir: Path, long_tokens: int, evals: int) -> Any:
    from nas_minitron.pipeline.stages import trial_spec

    run, _ = _load_run(run_dir)
    spec = trial_spec(run)
    data = run_dir / "selection" / "data"
    from nas_minitron.data import load_sequences

    num_val = load_sequences(data / "heldout.safetensors").shape[0]
    distill = dataclasses.replace(spec.distill, num_tokens=long_tokens, num_val_sequences=num_val,
                                  eval_every_tokens=long_tokens // evals, keep_last_k=1)
    return dataclasses.replace(spec, run_dir=str(run_dir / "selection" / "long_run"), distill=distill,
                               train_path=str(data / "train_long.safetensors"),
                               val_path=str(data / "heldout.safetensors"),
                               logit_cache_dir=str(data / "logit_cache"))


def _read(folder: Path) -> dict[str, dict[str, Any]]:
    return {p.stem: json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))}


def _candidates(run_dir: Path) -> list[dict[str, str]]:
    from nas_minitron.pipeline.run_dir import read_csv

    return read_csv(run_dir / "candidates.csv")


def _uniform(rows: list[dict[str, str]], teacher: dict[str, int]) -> str:
    """The candidate whose axes shrink most evenly (Torch-Pruning's uniform shape): least spread of the ratios."""
    import statistics

    def spread(row: dict[str, str]) -> float:
        ratios = [float(row[k]) / teacher[k] for k in teacher if row.get(k) not in (None, "")]
        return statistics.pstdev(ratios)

    return min(rows, key=spread)["name"]


def long_subset(run_dir: Path, picks: list[str], size: int = 11) -> list[str]:
    short = _read(run_dir / "selection" / "short")
    rows = _candidates(run_dir)
    step0 = sorted(short, key=lambda n: short[n]["curve"][0]["val_kl"])
    final = sorted(short, key=lambda n: short[n]["curve"][-1]["val_kl"])
    stage = json.loads((run_dir / "stages" / "candidates.json").read_text())
    baselines = list(stage.get("info", stage).get("baselines", []))
    # SmolLM2-135M's axes (the embedded teacher this benchmark runs on)
    teacher = {"num_hidden_layers": 30, "hidden_size": 576, "intermediate_size": 1536, "num_attention_heads": 9}
    mid = len(step0) // 2
    ordered = [*picks, *final[:3], *step0[:3], *baselines, _uniform(rows, teacher), step0[mid - 1], step0[mid + 1],
               step0[-1], step0[-3]]
    seen: list[str] = []
    for name in ordered:
        if name in short and name not in seen:
            seen.append(name)
    spread = [step0[round(i * (len(step0) - 1) / 10)] for i in range(11)]  # evenly over the step-0 ranking
    for name in spread:
        if len(seen) >= size:
            break
        if name not in seen:
            seen.append(name)
    return seen


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", type=Path, required=True)
    parser.add_argument("--phase", choices=(*PHASES, "all"), default="all")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--rung-tokens", type=int, default=1024, help="validation every this many tokens (short)")
    parser.add_argument("--long-tokens", type=int, default=32768)
    parser.add_argument("--long-evals", type=int, default=4)
    parser.add_argument("--long-sequences", type=int, default=128)
    parser.add_argument("--heldout-sequences", type=int, default=32)
    args = parser.parse_args()
    run_dir = args.run_dir.resolve()
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    phases = PHASES if args.phase == "all" else (args.phase,)
    started = time.time()
    if "prep" in phases:
        prep(run_dir, args.long_sequences, args.heldout_sequences)
    if "short" in phases:
        spec = short_spec(run_dir, args.rung_tokens)
        _pool([r["name"] for r in _candidates(run_dir)], spec, run_dir / "selection" / "short", args.workers)
    if "long" in phases:
        from selection_report import strategy_picks  # benchmarks/selection_report.py

        spec = long_spec(run_dir, args.long_tokens, args.long_evals)
        subset = long_subset(run_dir, strategy_picks(run_dir))
        print(f"long-run subset ({len(subset)}): {', '.join(subset)}", flush=True)
        _pool(subset, spec, run_dir / "selection" / "long", args.workers)
    if "report" in phases:
        from selection_report import report

        report(run_dir)
    meta = {"date": str(date.today()), "machine": platform.node(), "cpus": os.cpu_count(), "phases": list(phases),
            "wall_s": time.time() - started, "load": os.getloadavg(),
            "args": {k: str(v) for k, v in vars(args).items()}}
    write_json_atomic(run_dir / "selection" / f"meta-{args.phase}-{int(started)}.json", meta)
    print(json.dumps(meta), flush=True)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    main()
