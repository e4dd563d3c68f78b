"""The successive-halving search: screen candidates untrained, then distill the best further, rung by rung.

The driver's loop (`run_halving`): each rung is one Ray Tune experiment (`tune.run_rung_trials`) over the
candidates still in the race; after it, the promotion rule (`rungs.promote`) picks who continues and the others are
stopped (their checkpoints deleted, their Optuna trials PRUNED). Every decision is a pure function of the rung
results kept in the run directory (`protocol.rung_result_path`), so a driver killed in the middle of a rung, started
again, recomputes the same promotions, redoes no finished rung and reruns only the unfinished candidates of the
rung it died in, from their checkpoints of the rung before. Nothing Ray pickled is read back.

`--screen N` below the number of candidates lets the Optuna sampler choose which N to screen at rung 0, in batches
of `--max-concurrent`, on the rung-0 objectives (the enqueued baselines first); re-proposals cost nothing.
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nas_minitron.arch import ArchConfig
from nas_minitron.search.protocol import (
    FAILED_KEY,
    TrialRecord,
    TrialSpec,
    rung_checkpoint_dir,
    rung_result_path,
    trial_weights_path,
)
from nas_minitron.search.rungs import RungStats, bootstrap_interval, promote, rung_stats, stable
from nas_minitron.search.winners import finite_objectives, pareto_front, select_winners

__all__ = ["HalvingPlan", "HalvingResult", "RungRow", "run_halving"]

SEQ_KEYS = {"val_kl": "val_kl_seq", "val_loss": "val_loss_seq"}  # objectives with per-sequence values


@dataclass(frozen=True)
class HalvingPlan:
    rungs: tuple[int, ...]  # token budgets, 0 first; the top one is the schedule's whole budget
    eta: int = 4
    screen: int | None = None  # candidates rung 0 scores; None: all
    stop_when_stable: bool = False
    num_winners: int = 1
    seed: int = 0


@dataclass
class RungRow:
    """One candidate at one rung."""

    rung: int
    tokens: int
    name: str
    metrics: dict[str, Any]
    status: str  # COMPLETE (scored) or FAILED
    ci_low: float = math.nan
    ci_high: float = math.nan
    rank: int | None = None
    promoted: bool | None = None  # None at the last rung run
    tied: bool = False

    def objective_row(self, objectives: Sequence[str]) -> dict[str, Any]:
        row = {"name": self.name, "status": self.status, **{k: self.metrics.get(k) for k in objectives},
               "ci_low": None if math.isnan(self.ci_low) else self.ci_low,
               "ci_high": None if math.isnan(self.ci_high) else self.ci_high}
        for key in SEQ_KEYS.values():
            row[key] = self.metrics.get(key) or []
        if self.status != "COMPLETE":
            row.update({k: math.nan for k in objectives})
        return row


@dataclass
class HalvingResult:
    rows: list[RungRow] = field(default_factory=list)
    stats: list[RungStats] = field(default_factory=list)
    records: list[TrialRecord] = field(default_factory=list)  # Ray's view, for placement and errors
    final_rung: int = 0
    stopped_early: bool = False
    winners: list[str] = field(default_factory=list)
    fatal: str | None = None

    def last_rows(self) -> list[RungRow]:
        return [r for r in self.rows if r.rung == self.final_rung]


def _read_rung(spec: TrialSpec, rung: int, tokens: int, names: Sequence[str], objectives: Sequence[str],
               records: Sequence[TrialRecord], seed: int) -> list[RungRow]:
    errors = {r.name: r.error for r in records if r.error}
    rows = []
    for name in names:
        path = rung_result_path(spec.run_dir, rung, name)
        metrics: dict[str, Any] = {}
        if path.is_file():
            metrics = dict(json.loads(path.read_text())["metrics"])
        failed = not metrics or bool(metrics.get(FAILED_KEY))
        if not metrics:
            metrics = {"arch": name, "error": errors.get(name) or "the trial ended without a result"}
        elif not failed and finite_objectives(metrics, objectives) is None:
            failed = True
            metrics = {**metrics, "error": f"non-finite {', '.join(objectives)} at rung {rung}"}
        row = RungRow(rung, tokens, name, metrics, "FAILED" if failed else "COMPLETE")
        seq = metrics.get(SEQ_KEYS.get(objectives[0], "")) or []
        if seq and not failed:
            row.ci_low, row.ci_high = bootstrap_interval([float(v) for v in seq], seed=seed + rung)
        rows.append(row)
    return rows


def _screen_with_sampler(spec: TrialSpec, options: Any, plan: HalvingPlan, archs: Sequence[ArchConfig],
                         baselines: Sequence[str], run: Callable[[list[str]], None],
                         objectives: Sequence[str]) -> list[str]:
    """Rung 0 on `plan.screen` candidates the sampler chooses; returns them in the order screened."""
    from nas_minitron.search import tune

    target = int(plan.screen or len(archs))
    study = tune.screening_study(objectives, options, target)
    screened: list[str] = []

    def values(name: str) -> list[float] | None:
        path = rung_result_path(spec.run_dir, 0, name)
        if not path.is_file():
            return None
        metrics = json.loads(path.read_text())["metrics"]
        vals = None if metrics.get(FAILED_KEY) else finite_objectives(metrics, objectives)
        return vals if vals is not None else [math.inf] * len(objectives)

    names = [a.name for a in archs]
    for name in names:  # a resumed driver: what was screened is told first (in candidate order: deterministic)
        known = values(name)
        if known is not None:
            screened.append(name)
            tune.told_screen(study, archs, name, known)
    pending = [b for b in baselines if b not in screened]
    asks = 0
    while len(screened) < target and asks < 4 * target:
        batch = list(pending[: options.max_concurrent])
        pending = pending[len(batch):]
        trials: list[tuple[Any, str]] = []
        while len(batch) < min(options.max_concurrent, target - len(screened)) and asks < 4 * target:
            trial, name = tune.propose(study, archs)
            asks += 1
            if name in screened or name in batch:
                known = values(name)
                study.tell(trial, known if known and len(known) > 1 else (known[0] if known else None),
                           state=None if known else tune.optuna.trial.TrialState.FAIL)
                continue
            trials.append((trial, name))
            batch.append(name)
        if not batch:
            continue
        run(batch)
        for name in batch:
            screened.append(name)
            known = values(name) or [math.inf] * len(objectives)
            match = next((t for t, n in trials if n == name), None)
            if match is not None:
                study.tell(match, known if len(known) > 1 else known[0])
            else:
                tune.told_screen(study, archs, name, known)
    return screened


def run_halving(spec: TrialSpec, options: Any, plan: HalvingPlan, baselines: Sequence[str], *,
                log: Callable[[str], None] = print) -> HalvingResult:
    """Screen, promote, continue; returns every candidate's rung rows, the per-rung stability and the winners.

    The winners (the best `num_winners` of the last rung, plus its Pareto set with several objectives) get their
    trial weights exported from their checkpoints (`worker.export_rung_weights`); every rung checkpoint is deleted
    at the end.
    """
    from nas_minitron.search import tune
    from nas_minitron.search.worker import export_rung_weights

    objectives = list(spec.objectives)
    storage = tune.study_storage_url(spec.run_dir, options.storage_url)
    archs = [ArchConfig.parse(name, spec.head_dim) for name in spec.candidates]
    result = HalvingResult()
    by_rung: dict[int, dict[str, float]] = {}

    def run(rung: int, names: list[str]) -> None:
        todo = [n for n in names if not rung_result_path(spec.run_dir, rung, n).is_file()]
        if not todo:
            return
        log(f"  rung {rung} ({plan.rungs[rung]:,} tokens): {len(todo)} candidate(s) to run"
            + (f", {len(names) - len(todo)} already done" if len(todo) < len(names) else ""))
        records = tune.run_rung_trials(spec, options, rung, plan.rungs[rung], todo, log=log)
        result.records.extend(records)
        fatal = tune.fatal_message(records)
        if fatal:
            result.fatal = fatal
            raise _Fatal(fatal)

    screen_all = plan.screen is None or plan.screen >= len(archs)
    try:
        if screen_all:
            order = [*[b for b in baselines if b in spec.candidates],
                     *[n for n in spec.candidates if n not in baselines]]
            run(0, order)
            current = order
        else:
            current = _screen_with_sampler(spec, options, plan, archs, baselines, lambda batch: run(0, batch),
                                           objectives)
    except _Fatal:
        return result
    for rung, tokens in enumerate(plan.rungs):
        if rung > 0:
            try:
                run(rung, current)
            except _Fatal:
                return result
        rows = _read_rung(spec, rung, tokens, current, objectives, result.records, plan.seed)
        result.rows.extend(rows)
        result.final_rung = rung
        tune.record_rung(storage, archs, objectives, tokens, [r.objective_row(objectives) for r in rows])
        values = {r.name: float(r.metrics.get(objectives[0], math.nan)) if r.status == "COMPLETE" else math.nan
                  for r in rows}
        by_rung[rung] = values
        last = rung == len(plan.rungs) - 1
        decision = promote([r.objective_row(objectives) for r in rows], objectives, plan.eta,
                           keep_at_least=plan.num_winners, seed=plan.seed + rung,
                           seq_key=SEQ_KEYS.get(objectives[0]) if len(objectives) == 1 else None)
        for row in rows:
            row.rank = (decision.ranks or {}).get(row.name)
        result.stats.append(rung_stats(rung, tokens, values, by_rung.get(rung - 1), decision.quota))
        done = last or (plan.stop_when_stable and stable(result.stats))
        if done:
            result.stopped_early = not last
            break
        for row in rows:
            row.promoted = row.name in decision.promoted
            row.tied = row.name in decision.tied
        for name in decision.stopped:
            shutil.rmtree(rung_checkpoint_dir(spec.run_dir, name), ignore_errors=True)
        log(f"  rung {rung}: promoted {len(decision.promoted)} of {len(rows)} (quota {decision.quota}"
            + (f", +{len(decision.tied)} not separable from the cut" if decision.tied else "") + "): "
            + ", ".join(decision.promoted))
        current = list(decision.promoted)
    final_rows = [r.objective_row(objectives) for r in result.last_rows()]
    keep = {str(r["name"]) for r in select_winners(final_rows, objectives, plan.num_winners)}
    if len(objectives) > 1:
        keep |= {str(r["name"]) for r in pareto_front(final_rows, objectives)}
    result.winners = [str(r["name"]) for r in select_winners(final_rows, objectives, plan.num_winners)]
    final_tokens = plan.rungs[result.final_rung]
    if final_tokens > 0:
        for name in sorted(keep):
            if not (trial_weights_path(spec.run_dir, name) / "config.json").is_file():  # not exported before a crash
                export_rung_weights(spec.run_dir, name, result.final_rung, final_tokens)
    outcome: dict[str, tuple[str, list[float] | None]] = {}
    for row in result.rows:
        vals = [float(row.metrics[k]) for k in objectives] if row.status == "COMPLETE" else None
        if row.status == "FAILED":
            outcome[row.name] = ("FAIL", None)
        elif row.rung == result.final_rung:
            outcome[row.name] = ("COMPLETE", vals)
        elif row.promoted is False:
            outcome[row.name] = ("PRUNED", None)
    tune.finish_study(storage, objectives, outcome)
    shutil.rmtree(Path(spec.run_dir) / "rungs" / "checkpoints", ignore_errors=True)
    return result


class _Fatal(RuntimeError):
    pass

