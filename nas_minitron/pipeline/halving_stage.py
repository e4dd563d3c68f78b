"""The trials stage of `--strategy rungs`: successive halving (`search.halving`) and its tables in the run directory.

Writes, beside the tables every strategy writes (trials.csv: one row per candidate, its last rung; trial_curves.csv:
its value at every rung it reached):
- rungs.csv: one row per candidate and rung (value, bootstrap interval over validation sequences, rank, promoted);
- rung_stats.csv: one row per rung (candidates, the rank correlation with the rung before, top-1 / top-k agreement,
  distillation tokens and trial-seconds spent).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from nas_minitron.errors import UserError
from nas_minitron.pipeline.run_dir import CURVE_COLUMNS, TRIAL_COLUMNS, Run, write_csv
from nas_minitron.pipeline.settings import search_rungs
from nas_minitron.pipeline.stages import trial_spec
from nas_minitron.search.halving import HalvingPlan, HalvingResult, RungRow, run_halving
from nas_minitron.search.protocol import PLACEMENT_KEYS, TrialSpec, trial_log_path
from nas_minitron.search.tune import RayOptions

__all__ = ["RUNG_COLUMNS", "RUNG_STATS_COLUMNS", "halving_spec", "rung_trials"]

RUNG_COLUMNS = ("rung", "tokens", "name", "params", "status", "val_kl", "val_loss", "ci_low", "ci_high", "rank",
                "promoted", "tied", "wall_s", "device", "error")
RUNG_STATS_COLUMNS = ("rung", "tokens", "num", "promoted", "spearman", "kendall", "top1_same", "topk_agreement", "k",
                      "new_tokens", "trial_s", "best")


def halving_spec(run: Run) -> TrialSpec:
    """The trial spec of the rungs: the schedule spans the top rung; validation only where a rung ends."""
    spec = trial_spec(run)
    rungs = search_rungs(run.settings)
    distill = dataclasses.replace(spec.distill, num_tokens=max(rungs[-1], spec.distill.tokens_per_step()),
                                  eval_every_tokens=0, keep_last_k=1)
    return dataclasses.replace(spec, distill=distill)


def _plan(run: Run) -> HalvingPlan:
    s = run.settings
    return HalvingPlan(rungs=search_rungs(s), eta=s.eta, screen=s.screen, stop_when_stable=s.stop_when_stable,
                       num_winners=s.winners, seed=s.seed)


def _num(value: Any) -> Any:
    return "" if value is None or (isinstance(value, float) and not math.isfinite(value)) else value


def _write_tables(run: Run, result: HalvingResult) -> None:
    shapes = {r["name"]: r for r in run.candidate_rows()}
    rung_rows = []
    for row in result.rows:
        m = row.metrics
        rung_rows.append({"rung": row.rung, "tokens": row.tokens, "name": row.name, "params": m.get("params", ""),
                          "status": row.status, "val_kl": _num(m.get("val_kl")), "val_loss": _num(m.get("val_loss")),
                          "ci_low": _num(row.ci_low), "ci_high": _num(row.ci_high), "rank": _num(row.rank),
                          "promoted": "" if row.promoted is None else row.promoted, "tied": row.tied,
                          "wall_s": _num(m.get("rung_wall_s")), "device": m.get("device", ""),
                          "error": m.get("error", "") if row.status == "FAILED" else ""})
    write_csv(run.path("rungs.csv"), rung_rows, RUNG_COLUMNS)
    last: dict[str, RungRow] = {}
    first: dict[str, RungRow] = {}
    wall: dict[str, float] = {}
    for row in result.rows:
        last[row.name] = row
        first.setdefault(row.name, row)
        wall[row.name] = wall.get(row.name, 0.0) + float(row.metrics.get("rung_wall_s") or 0.0)
    table, curves = [], []
    for name, row in last.items():
        m = row.metrics
        status = "FAILED" if row.status == "FAILED" else ("COMPLETE" if row.rung == result.final_rung else "PRUNED")
        table.append({"trial_id": f"rung{row.rung}-{name}", "number": "", "name": name, **shapes.get(name, {}),
                      "status": status, "wall_s": wall[name], "num_tokens": row.tokens,
                      "val_loss": _num(m.get("val_loss")), "val_kl": _num(m.get("val_kl")),
                      "val_loss_step0": _num(first[name].metrics.get("val_loss")),
                      "val_kl_step0": _num(first[name].metrics.get("val_kl")),
                      **{key: m.get(key, "") for key in PLACEMENT_KEYS}, "log": str(trial_log_path(".", name)),
                      "error": m.get("error", "") if row.status == "FAILED" else "", "rung": row.rung,
                      "ci_low": _num(row.ci_low), "ci_high": _num(row.ci_high)})
    for row in result.rows:
        if row.status == "COMPLETE":
            curves.append({"trial_id": f"rung{row.rung}-{row.name}", "name": row.name, "step": row.metrics.get("step"),
                           "num_tokens": row.tokens, "val_loss": row.metrics.get("val_loss"),
                           "val_kl": row.metrics.get("val_kl")})
    write_csv(run.path("trials.csv"), table, (*TRIAL_COLUMNS, "rung", "ci_low", "ci_high"))
    write_csv(run.path("trial_curves.csv"), curves, CURVE_COLUMNS)
    stats = []
    previous_tokens = 0
    for stat in result.stats:
        rows = [r for r in result.rows if r.rung == stat.rung]
        done = [r for r in rows if r.status == "COMPLETE"]
        best = min(done, key=lambda r: float(r.metrics.get(run.settings.objectives[0], math.inf)), default=None)
        stats.append({**{k: _num(v) for k, v in stat.to_dict().items()},
                      "promoted": sum(bool(r.promoted) for r in rows),
                      "new_tokens": (stat.tokens - previous_tokens) * len(rows),
                      "trial_s": round(sum(float(r.metrics.get("rung_wall_s") or 0.0) for r in rows), 3),
                      "best": best.name if best else ""})
        previous_tokens = stat.tokens
    write_csv(run.path("rung_stats.csv"), stats, RUNG_STATS_COLUMNS)


def rung_trials(run: Run) -> dict[str, Any]:
    """Screen, then successive halving; the tables above; the winners' trial weights exported for `winners`."""
    s = run.settings
    run.verify_shared()  # --verify: what every trial reads by path, hashed once here (trials check sizes)
    if run.release_teacher():
        run.log("  released the driver's teacher for the trials")
    spec = halving_spec(run)
    plan = _plan(run)
    options = RayOptions(address=s.ray_address, max_concurrent=s.max_concurrent, sampler=s.sampler, seed=s.seed,
                         storage_url=s.storage)
    baselines = run.stage_info("candidates").get("baselines", [])
    run.log(f"  rungs (tokens): {', '.join(f'{t:,}' for t in plan.rungs)}; eta {plan.eta}; screening "
            f"{'all ' + str(len(spec.candidates)) if plan.screen is None else plan.screen} candidates")
    result = run_halving(spec, options, plan, baselines, log=run.log)
    if result.fatal:
        raise UserError(result.fatal)
    _write_tables(run, result)
    final = result.last_rows()
    done = [r for r in final if r.status == "COMPLETE"]
    if not done:
        raise UserError(f"no candidate finished the last rung; see the errors in {run.path('rungs.csv')}.")
    devices = sorted({str(r.metrics.get("device")) for r in result.rows if r.metrics.get("device")})
    run.log(f"  {len({r.name for r in result.rows})} candidates screened, {len(done)} finished rung "
            f"{result.final_rung} ({plan.rungs[result.final_rung]:,} tokens)"
            + (" (stopped early: the ranking was stable)" if result.stopped_early else "")
            + f"; best {', '.join(result.winners)}; on {', '.join(devices) or '?'}")
    tokens = sum((stat.tokens - (result.stats[i - 1].tokens if i else 0)) * stat.num
                 for i, stat in enumerate(result.stats))
    return {"strategy": "rungs", "rungs": list(plan.rungs), "eta": plan.eta, "final_rung": result.final_rung,
            "stopped_early": result.stopped_early, "num_screened": len({r.name for r in result.rows}),
            "num_complete": len(done), "winners": result.winners, "distill_tokens": tokens,
            "trial_s": round(sum(float(r.metrics.get("rung_wall_s") or 0.0) for r in result.rows), 3),
            "devices": devices, "logs": "logs/trials"}
