"""How many trials the search needs to find the best candidate: the real sampler and space, replayed on a table.

A search trial is deterministic on CPU float32 (same seed, same data: bench_search_vs_exhaustive.py checks the
re-run against the search to the last digit), so once *every* candidate has been distilled for the short budget
(`<run-dir>/exhaustive/results.json`), a search can be replayed without training: the real Optuna sampler
(`search.tune.make_sampler`) proposes through the real define-by-run space (`search.searcher.CandidateSpace`, with the
run's enqueued baselines first, as OptunaSearch does) and is told the measured objective of what it proposed.
A re-proposed candidate costs nothing (the search reuses `trial_results/`), so compute = distinct candidates.

For each sampler and trial count, over `--seeds` seeds: how often the search's winner is the exhaustive best, its
mean rank and regret (objective above the best), and the mean fraction of candidates distilled.

  .venv/bin/python benchmarks/bench_sampler_simulation.py --run-dir runs/default --trials 4 8 12 16 --seeds 20
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any


def replay(table: dict[str, float], archs: list[Any], baselines: list[Any], sampler: Any, num_trials: int) -> list[str]:
    """The names a search with this sampler would distill, in order (re-proposals included)."""
    import optuna

    from nas_minitron.search.proposals import encode
    from nas_minitron.search.searcher import CandidateSpace

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="minimize", sampler=sampler)
    for arch in baselines:
        study.enqueue_trial(encode(archs, arch))
    space = CandidateSpace(archs)
    names = []
    for _ in range(num_trials):
        trial = study.ask()
        name = space(trial)["arch"]
        names.append(name)
        study.tell(trial, table[name])
    return names


def _sampler(name: str, seed: int, num_trials: int) -> Any:
    import optuna

    from nas_minitron.search.tune import make_sampler

    if name.startswith("tpe:"):  # a variant of the search's TPE, for comparison
        return optuna.samplers.TPESampler(seed=seed, multivariate=True, n_startup_trials=int(name[4:]))
    return make_sampler(name, 1, seed, num_trials)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", type=Path, required=True)
    parser.add_argument("--trials", type=int, nargs="+", default=[4, 8, 12, 16])
    parser.add_argument("--seeds", type=int, default=20)
    parser.add_argument("--samplers", nargs="+", default=["tpe", "tpe:10", "tpe:2", "random"],
                        help="sampler names as in --sampler (tpe = the search's TPE, n_startup_trials from "
                             "trials.tpe_startup_trials); tpe:K = the same TPE with n_startup_trials K (Optuna: 10)")
    args = parser.parse_args()

    from nas_minitron.arch import ArchConfig
    from nas_minitron.atomic import write_json_atomic

    run_dir = args.run_dir.resolve()
    config = json.loads((run_dir / "config.json").read_text())
    objective = config["objectives"][0]
    record = json.loads((run_dir / "exhaustive" / "results.json").read_text())
    table = {t["name"]: float(t[objective]) for t in record["table"]}
    head_dim = int(config["head_dim"])
    archs = [ArchConfig.parse(name, head_dim) for name in table]
    stage = json.loads((run_dir / "stages" / "candidates.json").read_text())
    baselines = [ArchConfig.parse(name, head_dim) for name in stage.get("baselines", [])]
    ranked = sorted(table, key=table.get)
    rank = {name: i + 1 for i, name in enumerate(ranked)}
    best = table[ranked[0]]

    rows = []
    for sampler_name in args.samplers:
        for num_trials in args.trials:
            found, ranks, regrets, distinct = [], [], [], []
            for seed in range(args.seeds):
                names = replay(table, archs, baselines, _sampler(sampler_name, seed, num_trials), num_trials)
                winner = min(names, key=table.get)
                found.append(winner == ranked[0])
                ranks.append(rank[winner])
                regrets.append(table[winner] - best)
                distinct.append(len(set(names)))
            rows.append({"sampler": sampler_name, "trials": num_trials, "seeds": args.seeds,
                         "p_best": sum(found) / len(found), "mean_rank": statistics.mean(ranks),
                         "worst_rank": max(ranks), "mean_regret": statistics.mean(regrets),
                         "mean_distinct": statistics.mean(distinct),
                         "compute_fraction": statistics.mean(distinct) / len(table)})
    write_json_atomic(run_dir / "exhaustive" / "sampler_simulation.json",
                      {"objective": objective, "num_candidates": len(table), "best": ranked[0], "rows": rows})
    print(f"{len(table)} candidates, best {ranked[0]} ({objective} {best:.4f})\n")
    print("| sampler | trials | P(winner = best) | mean rank | worst rank | mean regret | distinct distilled |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['sampler']} | {r['trials']} | {r['p_best']:.2f} | {r['mean_rank']:.1f} | {r['worst_rank']} | "
              f"{r['mean_regret']:.3f} | {r['mean_distinct']:.1f} ({100 * r['compute_fraction']:.0f}%) |")


if __name__ == "__main__":
    main()
