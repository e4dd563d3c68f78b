"""The analysis half of bench_selection.py: selection strategies replayed on the measured tables, against the long run.

Replays are exact, not simulated: a trial is deterministic on CPU float32 and a promoted candidate's curve equals
its unpromoted one (tests/pipeline/test_rungs_cli.py), so the rung search's decisions on the full short table
(every candidate validated at every 1,024 tokens, per validation sequence) are the decisions a real search makes;
the default run in RESULTS.md is checked against it.
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Any

OLD_TRIALS = 4
OLD_SEEDS = 50


def _read(folder: Path) -> dict[str, dict[str, Any]]:
    return {p.stem: json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))}


def _at(record: dict[str, Any], tokens: int) -> dict[str, Any] | None:
    return next((p for p in record["curve"] if p.get("num_tokens") == tokens), None)


def short_table(run_dir: Path) -> dict[str, dict[str, Any]]:
    return _read(run_dir / "selection" / "short")


def _rows(table: dict[str, dict[str, Any]], tokens: int, names: list[str]) -> list[dict[str, Any]]:
    rows = []
    for name in names:
        point = _at(table[name], tokens) or {}
        rows.append({"name": name, "status": "COMPLETE", "val_kl": point.get("val_kl", math.nan),
                     "val_kl_seq": point.get("val_kl_seq") or [], "params": table[name].get("params")})
    return rows


def _costs(record: dict[str, Any]) -> tuple[float, float]:
    """(seconds to build the student + validate at step 0, seconds per training token incl. validation)."""
    curve = record["curve"]
    overhead = float(record["wall_s"]) - float(curve[-1]["wall_s"])
    step0 = overhead + float(curve[0]["wall_s"])
    tokens = float(curve[-1]["num_tokens"]) or 1.0
    return step0, (float(curve[-1]["wall_s"]) - float(curve[0]["wall_s"])) / tokens


def replay_rungs(table: dict[str, dict[str, Any]], rungs: tuple[int, ...], eta: int, baselines: list[str],
                 seed: int = 0, intervals: bool = True) -> dict[str, Any]:
    """The rung search's decisions on the table: survivors per rung, the pick, tokens and estimated trial-seconds."""
    from nas_minitron.search.rungs import promote

    names = [*[b for b in baselines if b in table], *[n for n in sorted(table) if n not in baselines]]
    current = names
    tokens_spent = 0
    seconds = sum(_costs(table[n])[0] for n in names)
    history = [list(current)]
    for rung, tokens in enumerate(rungs):
        if rung > 0:
            tokens_spent += (tokens - rungs[rung - 1]) * len(current)
            seconds += sum(_costs(table[n])[1] * (tokens - rungs[rung - 1]) for n in current)
            seconds += sum(_costs(table[n])[0] for n in current) if rung == 1 else 0.0  # rung 1 builds again
        rows = _rows(table, tokens, current)
        if rung == len(rungs) - 1:
            pick = min(rows, key=lambda r: r["val_kl"])["name"]
            return {"pick": pick, "survivors": history, "tokens": tokens_spent, "trial_s": seconds}
        decision = promote(rows, ["val_kl"], eta, seed=seed + rung, seq_key="val_kl_seq" if intervals else None)
        current = list(decision.promoted)
        history.append(current)
    raise AssertionError("no rungs")


def replay_old(table: dict[str, dict[str, Any]], run_dir: Path, baselines: list[str], top: int) -> list[str]:
    """The old default: 4 Optuna (TPE) trials at the top rung, over OLD_SEEDS seeds (its picks, one per seed)."""
    from bench_sampler_simulation import replay

    from nas_minitron.arch import ArchConfig
    from nas_minitron.search.tune import make_sampler

    head_dim = int(json.loads((run_dir / "config.json").read_text()).get("head_dim", 64) or 64)
    archs = [ArchConfig.parse(n, head_dim) for n in sorted(table)]
    values = {n: float((_at(table[n], top) or {}).get("val_kl", math.inf)) for n in table}
    base = [ArchConfig.parse(b, head_dim) for b in baselines if b in table]
    picks = []
    for seed in range(OLD_SEEDS):
        names = replay(values, archs, base, make_sampler("tpe", 1, seed, OLD_TRIALS), OLD_TRIALS)
        picks.append(min(set(names), key=lambda n: values[n]))
    return picks


def _baselines(run_dir: Path) -> list[str]:
    stage = json.loads((run_dir / "stages" / "candidates.json").read_text())
    return list(stage.get("info", stage).get("baselines", []))


def strategy_picks(run_dir: Path) -> list[str]:
    """Every pick a strategy makes on the short table (the long run must include them)."""
    table = short_table(run_dir)
    top = max(p["num_tokens"] for p in next(iter(table.values()))["curve"])
    baselines = _baselines(run_dir)
    picks = [replay_rungs(table, (0, 1024, top), 4, baselines)["pick"],
             min(table, key=lambda n: table[n]["curve"][0]["val_kl"]),
             min(table, key=lambda n: float((_at(table[n], top) or {})["val_kl"]))]
    old = replay_old(table, run_dir, baselines, top)
    picks += [n for n, _ in sorted(((n, old.count(n)) for n in set(old)), key=lambda x: -x[1])[:3]]
    return list(dict.fromkeys(picks))


def _spearman(a: list[float], b: list[float]) -> float:
    from nas_minitron.search.rungs import spearman

    return spearman(a, b)


def report(run_dir: Path) -> dict[str, Any]:
    """Every strategy against the long run; written to selection/report.json and printed as markdown."""
    from nas_minitron.atomic import write_json_atomic

    table = short_table(run_dir)
    long = _read(run_dir / "selection" / "long")
    top = max(p["num_tokens"] for p in next(iter(table.values()))["curve"])
    baselines = _baselines(run_dir)
    truth = {n: float(r["curve"][-1]["val_kl"]) for n, r in long.items()}
    order = sorted(truth, key=lambda n: truth[n])
    best = order[0]
    params = {n: int(table[n]["params"]) for n in table}

    def judge(pick: str) -> dict[str, Any]:
        if pick not in truth:
            return {"pick": pick, "params": params[pick], "long_rank": None, "regret": None}
        smaller = [n for n in truth if params[n] <= params[pick]]
        return {"pick": pick, "params": params[pick], "long_rank": order.index(pick) + 1,
                "regret": truth[pick] - truth[best],
                "regret_vs_no_larger": truth[pick] - min(truth[n] for n in smaller)}

    every_tokens = top * len(table)
    every_s = sum(float(r["wall_s"]) for r in table.values())
    out: dict[str, Any] = {"long_run": [{"name": n, "params": params[n], "val_kl": truth[n],
                                         "long_tokens": long[n]["curve"][-1]["num_tokens"]} for n in order],
                           "subset": len(long), "candidates": len(table), "strategies": {}}
    variants = {"rungs 0,1k,4k eta 4 (default)": ((0, 1024, top), 4, True),
                "rungs 0,1k,4k eta 3": ((0, 1024, top), 3, True),
                "rungs 0,1k,4k eta 3 without intervals": ((0, 1024, top), 3, False),
                "rungs 0,1k,2k,4k eta 2": ((0, 1024, 2048, top), 2, True),
                "rungs 0,4k eta 3": ((0, top), 3, True),
                "rungs 0,1k,4k eta 4 without intervals": ((0, 1024, top), 4, False)}
    for label, (rungs, eta, intervals) in variants.items():
        replayed = replay_rungs(table, rungs, eta, baselines, intervals=intervals)
        out["strategies"][label] = {**judge(replayed["pick"]), "tokens": replayed["tokens"],
                                    "trial_s_est": replayed["trial_s"], "survivors": replayed["survivors"]}
    step0 = min(table, key=lambda n: table[n]["curve"][0]["val_kl"])
    out["strategies"]["step-0 choice"] = {**judge(step0), "tokens": 0,
                                          "trial_s_est": sum(_costs(r)[0] for r in table.values())}
    every = min(table, key=lambda n: float((_at(table[n], top) or {})["val_kl"]))
    out["strategies"]["short-distill every candidate"] = {**judge(every), "tokens": every_tokens,
                                                          "trial_s_est": every_s}
    old = replay_old(table, run_dir, baselines, top)
    judged = [judge(p) for p in old]
    ranks = [j["long_rank"] for j in judged if j["long_rank"] is not None]
    regrets = [j["regret"] for j in judged if j["regret"] is not None]
    out["strategies"][f"old default: {OLD_TRIALS} TPE trials ({OLD_SEEDS} seeds)"] = {
        "pick": f"{len(set(old))} different picks", "mean_long_rank": statistics.mean(ranks) if ranks else None,
        "picks_in_subset": len(ranks), "mean_regret": statistics.mean(regrets) if regrets else None,
        "p_top2": sum(r <= 2 for r in ranks) / len(ranks) if ranks else None, "tokens": OLD_TRIALS * top}
    budget = float(json.loads((run_dir / "config.json").read_text())["budget_params"])
    out["size_aware"] = {}
    for window in (0.02,):  # a tighter window: does the search still find the best when size cannot carry it?
        inside = {n: r for n, r in table.items() if abs(params[n] / budget - 1) <= window}
        known = sorted((n for n in inside if n in truth), key=lambda n: truth[n])
        if not known:
            continue
        picks = {"rungs 0,1k,4k eta 4": replay_rungs(inside, (0, 1024, top), 4, baselines)["pick"],
                 "step-0 choice": min(inside, key=lambda n: inside[n]["curve"][0]["val_kl"]),
                 "short-distill every candidate": min(inside,
                                                      key=lambda n: float((_at(inside[n], top) or {})["val_kl"]))}
        out["size_aware"][f"+-{window:.0%}"] = {
            "candidates": len(inside), "in_long_run": known, "best": known[0],
            "picks": {k: {"pick": v, "long_rank": known.index(v) + 1 if v in known else None,
                          "regret": truth[v] - truth[known[0]] if v in truth else None} for k, v in picks.items()}}
    names = sorted(truth)
    out["rung_spearman_vs_long"] = {
        str(t): _spearman([float((_at(table[n], t) or {})["val_kl"]) for n in names], [truth[n] for n in names])
        for t in sorted({p["num_tokens"] for p in next(iter(table.values()))["curve"]})}
    out["params_spearman_vs_long"] = _spearman([float(params[n]) for n in names], [truth[n] for n in names])
    out["every_candidate"] = {"tokens": every_tokens, "trial_s": every_s}
    write_json_atomic(run_dir / "selection" / "report.json", out)
    _print(out)
    return out


def _print(out: dict[str, Any]) -> None:
    print(f"\nlong-run ranking ({out['subset']} of {out['candidates']} candidates):")
    for i, row in enumerate(out["long_run"], start=1):
        print(f"| {i} | {row['name']} | {row['params']:,} | {row['val_kl']:.4f} |")
    every = out["every_candidate"]
    print("\n| strategy | pick | params | long-run rank | regret | regret vs no larger | tokens (share) | "
          "trial-s est. (share) |")
    print("|---|---|---|---|---|---|---|---|")
    for label, s in out["strategies"].items():
        if "mean_long_rank" in s:
            print(f"| {label} | {s['pick']} | | mean {s['mean_long_rank']} (P(top 2) {s['p_top2']}, "
                  f"{s['picks_in_subset']} in subset) | mean {s['mean_regret']} | | {s['tokens']:,} "
                  f"({s['tokens'] / every['tokens']:.3f}) | |")
            continue
        regret = "" if s["regret"] is None else f"{s['regret']:.4f}"
        smaller = "" if s.get("regret_vs_no_larger") is None else f"{s['regret_vs_no_larger']:.4f}"
        print(f"| {label} | {s['pick']} | {s['params']:,} | {s['long_rank']} | {regret} | {smaller} | "
              f"{s['tokens']:,} ({s['tokens'] / every['tokens']:.3f}) | {s['trial_s_est']:.0f} "
              f"({s['trial_s_est'] / every['trial_s']:.3f}) |")
    print("\nSpearman with the long run, per rung (tokens):", {k: round(v, 3) for k, v in
                                                            out["rung_spearman_vs_long"].items()})
    print("Spearman(params, long-run KL):", round(out["params_spearman_vs_long"], 3))
    print("size-aware:", json.dumps(out["size_aware"], indent=1))
