"""Issue 6, evidence item 8: the compute a search spent vs distilling *every* candidate for the full short budget.

Takes a finished search run directory (e.g. `runs/default` from `bash scripts/run_default.sh`), rebuilds the exact
trial spec the search used (same teacher, importance, token stream, teacher-logit cache and distillation config;
`pipeline.stages.trial_spec`) and runs `search.worker.run_candidate` for every candidate in `candidates.csv`, without
Ray, in `--workers` processes of one torch thread each (the search's default: 2 trials at once, 1 CPU each).
Then it compares:

  compute  search trial-seconds (sum of the trials' wall times in trials.csv) and tokens
           vs exhaustive trial-seconds and tokens, as ratios
  winner   the search's winner (winners.csv rank 1) vs the exhaustive best by the same objective (final val KL),
           the search winner's rank among all candidates, and the step-0 (untrained) ranking's rank correlation with
           the final one
  repro    for candidates both ran, the difference between the search's and the exhaustive final val KL (the
           trial is deterministic on CPU float32, so this should be 0)

Writes `<run-dir>/exhaustive/results.json` and `table.csv` (atomically) and prints a markdown summary.

  .venv/bin/python benchmarks/bench_search_vs_exhaustive.py --run-dir runs/default --workers 2
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import multiprocessing
import platform
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from datetime import date
from pathlib import Path
from typing import Any

from nas_minitron.atomic import atomic_directory


def _run_one(arch_name: str, spec: Any) -> dict[str, Any]:
    """One candidate's short distillation in this (spawned) process: final metrics, curve and wall time."""
    from nas_minitron.search.worker import run_candidate

    points: list[dict[str, Any]] = []
    start = time.perf_counter()
    run_candidate(arch_name, spec, lambda metrics, _checkpoint: points.append(dict(metrics)), None)
    wall_s = time.perf_counter() - start
    return {"name": arch_name, "wall_s": wall_s, "final": points[-1] if points else {}, "curve": points}


def load_run(run_dir: Path) -> tuple[Any, dict[str, Any]]:
    """The trial spec the search used, and its configuration."""
    from nas_minitron.pipeline.run_dir import Run
    from nas_minitron.pipeline.settings import SearchSettings, resolve_settings
    from nas_minitron.pipeline.stages import trial_spec

    config = json.loads((run_dir / "config.json").read_text())
    fields = {f.name for f in dataclasses.fields(SearchSettings)}
    settings = resolve_settings(None, {k: v for k, v in config.items() if k in fields})  # as `--resume` reads it
    run = Run(settings, run_dir, resume=True, log=print)
    return trial_spec(run), config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", type=Path, required=True, help="a finished `nas-minitron search` run directory")
    parser.add_argument("--workers", type=int, default=2, help="candidates distilled at once (1 thread each)")
    parser.add_argument("--limit", type=int, default=None, help="only the first N candidates (for a quick check)")
    args = parser.parse_args()
    run_dir = args.run_dir.resolve()
    if not (run_dir / "stages" / "trials.json").is_file():
        raise SystemExit(f"{run_dir} has no finished trials stage; run the search first.")

    import pandas as pd

    from nas_minitron.pipeline.run_dir import read_csv, write_csv
    from nas_minitron.report.plots import spearman

    spec, config = load_run(run_dir)
    objective = config["objectives"][0]
    names = [r["name"] for r in read_csv(run_dir / "candidates.csv")][: args.limit]
    search_rows = read_csv(run_dir / "trials.csv")
    search_winner = read_csv(run_dir / "winners.csv")[0]["name"]

    scratch = Path(tempfile.mkdtemp(prefix="nasm-exhaustive-"))
    spec = dataclasses.replace(spec, run_dir=str(scratch))  # its own trial_results/: nothing is reused from the search
    start = time.perf_counter()
    results: list[dict[str, Any]] = []
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=args.workers, mp_context=context) as pool:
        futures = [pool.submit(_run_one, name, spec) for name in names]
        for future in as_completed(futures):
            result = future.result()
            results.append(result)
            print(f"  {result['name']}: {objective} {result['final'].get(objective, float('nan')):.4f} "
                  f"in {result['wall_s']:.0f} s ({len(results)}/{len(names)})", flush=True)
    exhaustive_wall = time.perf_counter() - start

    by_name = {r["name"]: r for r in results}
    table = []
    for name in names:
        r = by_name[name]
        first = r["curve"][0] if r["curve"] else {}
        table.append({"name": name, "params": r["final"].get("params"), "wall_s": round(r["wall_s"], 2),
                      "num_tokens": r["final"].get("num_tokens"),
                      f"{objective}_step0": first.get(objective), objective: r["final"].get(objective),
                      "val_loss": r["final"].get("val_loss")})
    finite = [t for t in table if isinstance(t[objective], (int, float)) and math.isfinite(t[objective])]
    finite.sort(key=lambda t: t[objective])
    for rank, row in enumerate(finite, start=1):
        row["rank"] = rank
    exhaustive_best = finite[0]["name"]

    searched = [r for r in search_rows if r["status"] == "COMPLETE"]
    unique_searched = sorted({r["name"] for r in searched})
    search_trial_s = sum(float(r["wall_s"] or 0) for r in search_rows)
    search_tokens = sum(float(r["num_tokens"] or 0) for r in search_rows if r["status"] == "COMPLETE")
    exhaustive_trial_s = sum(r["wall_s"] for r in results)
    exhaustive_tokens = sum(float(r["final"].get("num_tokens") or 0) for r in results)
    repro = {r["name"]: abs(float(r[objective]) - float(by_name[r["name"]]["final"][objective]))
             for r in searched if r["name"] in by_name}
    step0 = [t for t in finite if isinstance(t[f"{objective}_step0"], (int, float))]
    summary = {
        "machine": f"{platform.machine()}, {multiprocessing.cpu_count()} cores", "date": date.today().isoformat(),
        "run_dir": str(run_dir), "objective": objective, "num_candidates": len(names),
        "short_tokens": config["short_tokens"], "search_trials": len(search_rows),
        "search_unique_candidates": len(unique_searched),
        "search_trial_s": round(search_trial_s, 1),
        "search_stage_wall_s": json.loads((run_dir / "stages" / "trials.json").read_text())["wall_s"],
        "search_tokens": search_tokens,
        "exhaustive_trial_s": round(exhaustive_trial_s, 1), "exhaustive_wall_s": round(exhaustive_wall, 1),
        "exhaustive_tokens": exhaustive_tokens, "workers": args.workers,
        "compute_ratio_trial_s": round(search_trial_s / exhaustive_trial_s, 4),
        "compute_ratio_tokens": round(search_tokens / exhaustive_tokens, 4) if exhaustive_tokens else None,
        "search_winner": search_winner, "exhaustive_best": exhaustive_best,
        "same_winner": search_winner == exhaustive_best,
        "search_winner_rank": next((t["rank"] for t in finite if t["name"] == search_winner), None),
        "searched_ranks": sorted(t["rank"] for t in finite if t["name"] in unique_searched),
        "spearman_step0_vs_final": round(spearman(pd.Series({t["name"]: t[f"{objective}_step0"] for t in step0}),
                                                  pd.Series({t["name"]: t[objective] for t in step0})), 4),
        "max_abs_diff_search_vs_rerun": max(repro.values()) if repro else None,
    }
    with atomic_directory(run_dir / "exhaustive", overwrite=True) as tmp:
        (tmp / "results.json").write_text(json.dumps({"summary": summary, "table": table, "results": results},
                                                     indent=1, default=str))
        write_csv(tmp / "table.csv", table, ["name", "params", "wall_s", "num_tokens", f"{objective}_step0", objective,
                                             "val_loss", "rank"])

    print(json.dumps(summary, indent=1))
    print(f"\n| rank | candidate | params | {objective} step 0 | {objective} end | searched |")
    print("|---|---|---|---|---|---|")
    for t in finite:
        print(f"| {t['rank']} | {t['name']} | {t['params']:,} | {t[f'{objective}_step0']:.3f} | {t[objective]:.3f} | "
              f"{'yes' if t['name'] in unique_searched else ''} |")


if __name__ == "__main__":
    main()
