"""The stages of `nas-minitron search`, each a function of the live `Run` that writes its own outputs.

runner.py runs them in `run_dir.STAGES` order and handles resume; each stage reads what earlier stages wrote
through `Run` / run_dir.py, and returns the extra facts its stage marker records.
"""

from __future__ import annotations

import dataclasses
import math
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nas_minitron._lazy import lazy_import
from nas_minitron.arch import ArchConfig
from nas_minitron.atomic import atomic_directory
from nas_minitron.data import save_sequences, take_sequences
from nas_minitron.distill.config import DistillConfig, EvalPoint
from nas_minitron.distill.logit_cache import build_logit_cache
from nas_minitron.distill.result import save_distilled
from nas_minitron.distill.trainer import distill
from nas_minitron.errors import UserError
from nas_minitron.evaluate.harness import evaluate_model, save_eval
from nas_minitron.evaluate.speed import measure_speed
from nas_minitron.pipeline.run_dir import CURVE_COLUMNS, TRIAL_COLUMNS, WINNER_COLUMNS, Run, read_csv, write_csv
from nas_minitron.pipeline.settings import SearchSettings
from nas_minitron.prune.importance import compute_importance
from nas_minitron.prune.plan import PLAN_FILE, save_student
from nas_minitron.prune.scores import ImportanceScores
from nas_minitron.prune.student import build_student
from nas_minitron.report.page import write_report
from nas_minitron.search.protocol import TrialRecord, TrialSpec
from nas_minitron.search.tune import (
    RayOptions,
    check_resources,
    connect_ray,
    optuna_numbers,
    run_trials,
    study_storage_url,
    trial_records,
)
from nas_minitron.search.winners import select_winners
from nas_minitron.space.candidates import (
    CANDIDATE_COLUMNS,
    Candidate,
    best_pure_depth,
    best_pure_width,
    default_space,
    enumerate_candidates,
)
from nas_minitron.space.spaces import SearchSpace, load_space
from nas_minitron.teacher import DEFAULT_TEACHER, load_teacher_config, resolve_teacher_dir

if TYPE_CHECKING:
    import torch
    import transformers
    from transformers import PreTrainedModel
else:
    torch = lazy_import("torch")
    transformers = lazy_import("transformers")

__all__ = ["candidates", "distill_winners", "evaluate", "find_candidates", "importance", "logit_cache", "report",
           "start_ray", "stop_ray", "trial_spec", "trials", "validate_at_most", "winners"]

DEFAULT_CPU_SPACE = "smollm2-135m-cpu"  # the embedded default's space: few depths keep importance short on CPU


# ---- pre-flight: everything that can refuse the run before it writes or computes anything ------------------------
def find_candidates(s: SearchSettings, budget_params: int) -> tuple[SearchSpace, dict[str, Any], list[Candidate]]:
    """(space, teacher config, candidates); UserError for an unreachable budget or an empty window."""
    teacher_config = load_teacher_config(s.teacher, s.cache_dir)
    name = s.space or (DEFAULT_CPU_SPACE if s.teacher == DEFAULT_TEACHER else None)
    space = load_space(name, teacher_config) if name else default_space(teacher_config)
    return space, teacher_config, enumerate_candidates(space, teacher_config, budget_params, s.tolerance,
                                                       s.max_candidates)


def start_ray(s: SearchSettings, config: dict[str, Any], log: Callable[[str], None]) -> None:
    """Start or join Ray and check that one trial fits, before the expensive stages."""
    dashboard = connect_ray(RayOptions(address=s.ray_address))
    if dashboard:
        log(f"Ray dashboard: {dashboard}")
    # teacher weights while pruning + student weights, grads and AdamW state + logits and their grads + runtime
    vocab = int(config.get("vocab_size") or 0)
    memory = (4 * int(config["teacher_params"]) + 16 * int(config["budget_params"])
              + 12 * s.batch_size * s.seq_len * vocab + 2**30)
    check_resources(s.cpus_per_trial, s.gpus_per_trial, memory)


def stop_ray() -> None:
    """Shut Ray down if this process started or joined it (never imports ray only to stop it)."""
    if "ray" in sys.modules:
        sys.modules["ray"].shutdown()


# ---- candidates ----------------------------------------------------------------------------------------------
def candidates(run: Run) -> dict[str, Any]:
    s = run.settings
    budget = run.resolved.budget_params
    space, teacher_config, found = find_candidates(s, budget)
    write_csv(run.path("candidates.csv"), [c.row() for c in found], CANDIDATE_COLUMNS)
    names = {c.name for c in found}
    baselines = []
    for pick in (best_pure_width, best_pure_depth):
        best = pick(space, teacher_config, budget, s.tolerance)
        if best is not None and best.name in names:  # enqueue only what the candidate list can decode
            baselines.append(best.name)
    run.log(f"  {len(found)} candidates within the budget window; baselines: {', '.join(baselines) or 'none'}")
    return {"num_candidates": len(found), "baselines": baselines}


# ---- importance ------------------------------------------------------------------------------------------------
def importance(run: Run) -> dict[str, Any]:
    s = run.settings
    teacher, tokenizer = run.teacher()
    layers = run.resolved.teacher().num_hidden_layers
    drops = sorted({layers - int(r["num_hidden_layers"]) for r in run.candidate_rows()} - {0})
    batches = take_sequences(s.data, tokenizer, "calibration", s.seq_len, s.calibration_samples, s.seed)
    scores = compute_importance(teacher, batches, batch_size=s.batch_size, layer_metrics=True,
                                layer_loss=bool(drops), window_sizes=tuple(drops) or (1,),
                                loss_sequences=s.loss_sequences, progress=True)
    with atomic_directory(run.path("importance"), overwrite=True) as tmp:
        scores.save(tmp)
    return {"num_tokens": int(batches.numel()), "window_sizes": drops}


# ---- teacher-logit cache ------------------------------------------------------------------------------------------
def _num_train_sequences(run: Run, num_tokens: int) -> int:
    s = run.settings
    return max(s.batch_size, math.ceil(num_tokens / s.seq_len))


def logit_cache(run: Run) -> dict[str, Any]:
    """The token streams (data/) and, with --topk, the teacher's top-k logits for the short stream + validation."""
    s = run.settings
    teacher, tokenizer = run.teacher()
    num_train = _num_train_sequences(run, max(s.short_tokens, s.full_tokens))
    train = take_sequences(s.data, tokenizer, "train", s.seq_len, num_train, s.seed)  # [N, T]
    val = take_sequences(s.data, tokenizer, "validation", s.seq_len, s.validation_sequences, s.seed)  # [V, T]
    short = train[: _num_train_sequences(run, s.short_tokens)]  # the trials' stream: what the logit cache covers
    with atomic_directory(run.path("data"), overwrite=True) as tmp:
        save_sequences(tmp / "train.safetensors", train)
        save_sequences(tmp / "train_short.safetensors", short)
        save_sequences(tmp / "validation.safetensors", val)
    if s.topk <= 0:
        return {"topk": 0}
    # Trials read teacher targets for their training stream and their validation KL from here: no teacher needed.
    build_logit_cache(teacher, torch.cat([short, val]), run.path("logit_cache"), s.topk, s.batch_size,
                      tokenizer=tokenizer, overwrite=True)
    return {"topk": s.topk, "num_sequences": int(short.shape[0] + val.shape[0])}


# ---- trials --------------------------------------------------------------------------------------------------------
def validate_at_most(config: DistillConfig, evals: int) -> DistillConfig:
    """`config` validating at step 0 and at most `evals` times after it (fewer when it has fewer optimizer steps);
    the trainer always validates the last step."""
    every_steps = max(1, math.ceil(config.num_steps() / evals))
    return dataclasses.replace(config, eval_every_tokens=every_steps * config.tokens_per_step())


def _short_distill_config(run: Run) -> DistillConfig:
    s = run.settings
    config = DistillConfig(
        num_tokens=s.short_tokens, seq_len=s.seq_len, batch_size=s.batch_size, lr=s.lr,
        num_val_sequences=s.validation_sequences, seed=s.seed, topk=s.topk if s.topk > 0 else 0,
        dtype="bf16" if s.gpus_per_trial > 0 else "float32",
    )
    return validate_at_most(config, s.evals_per_trial)


def trial_spec(run: Run) -> TrialSpec:
    """What every trial of this run shares, by path (also used by benchmarks/bench_search_vs_exhaustive.py).

    Reads the run directory and writes nothing."""
    s = run.settings
    return TrialSpec(
        run_dir=str(run.dir.resolve()),
        teacher_dir=resolve_teacher_dir(s.teacher, s.cache_dir),
        importance_dir=str(run.path("importance").resolve()),
        train_path=str(run.data_path("train_short").resolve()),
        val_path=str(run.data_path("validation").resolve()),
        logit_cache_dir=str(run.path("logit_cache").resolve()) if s.topk > 0 else None,
        candidates=tuple(r["name"] for r in run.candidate_rows()),
        head_dim=run.resolved.head_dim,
        distill=_short_distill_config(run),
        objectives=tuple(s.objectives),
        cpus_per_trial=s.cpus_per_trial,
        gpus_per_trial=s.gpus_per_trial,
    )


def trials(run: Run) -> dict[str, Any]:
    s = run.settings
    spec = trial_spec(run)
    options = RayOptions(address=s.ray_address, max_concurrent=s.max_concurrent, sampler=s.sampler, asha=s.asha,
                         seed=s.seed, storage_url=s.storage)
    baselines = run.stage_info("candidates").get("baselines", [])
    records = trial_records(run_trials(spec, options, s.trials, baselines, resume=run.resume))
    _write_trial_tables(run, records)
    done = sum(r.status == "COMPLETE" for r in records)
    run.log(f"  {len(records)} trials: {done} complete, {len(records) - done} failed or stopped")
    if not done:
        raise UserError(f"no search trial finished; see the errors in {run.path('trials.csv')}.")
    return {"num_trials": len(records), "num_complete": done}


def _write_trial_tables(run: Run, records: list[TrialRecord]) -> None:
    candidates_by_name = {r["name"]: r for r in run.candidate_rows()}
    numbers = optuna_numbers(study_storage_url(run.dir, run.settings.storage))
    table: list[dict[str, Any]] = []
    curves: list[dict[str, Any]] = []
    for record in records:
        metrics, first, name = record.metrics, record.first, record.name
        shape = candidates_by_name.get(name or "", {})
        table.append({
            "trial_id": record.trial_id, "number": numbers.get(record.trial_id, ""), "name": name, **shape,
            "status": record.status, "wall_s": metrics.get("time_total_s", ""), "num_tokens": metrics.get("num_tokens"),
            "val_loss": metrics.get("val_loss"), "val_kl": metrics.get("val_kl"),
            "val_loss_step0": first.get("val_loss"), "val_kl_step0": first.get("val_kl"),
            "error": record.error or metrics.get("error", ""),
        })
        seen: dict[int, dict[str, Any]] = {}
        for point in record.curve:
            if point.get("step") is not None and not point.get("failed") and not point.get("reused_from"):
                seen[int(point["step"])] = {"trial_id": record.trial_id, "name": name, **point}
        curves.extend(seen[k] for k in sorted(seen))
    write_csv(run.path("trials.csv"), table, TRIAL_COLUMNS)
    write_csv(run.path("trial_curves.csv"), curves, CURVE_COLUMNS)


# ---- winners and their full distillation -------------------------------------------------------------------
def winners(run: Run) -> dict[str, Any]:
    """Select the winners from trials.csv and save each one, built exactly as its trial built it."""
    s = run.settings
    rows = []
    for row in read_csv(run.path("trials.csv")):
        parsed: dict[str, Any] = dict(row)
        for key in ("val_loss", "val_kl", "params", "kv_bytes_per_token", "flops_per_token"):
            parsed[key] = float(row[key]) if row.get(key) not in (None, "") else math.nan
        rows.append(parsed)
    chosen = select_winners(rows, s.objectives, s.winners)
    spec = trial_spec(run)  # the trials' own pruning options: a winner is the model its trial scored
    teacher, tokenizer = run.teacher()
    scores = ImportanceScores.load(run.path("importance"))
    table = []
    for rank, winner in enumerate(chosen, start=1):
        arch = ArchConfig.parse(winner["name"], run.resolved.head_dim)
        student, plan = build_student(teacher, s.teacher, arch, scores, depth_method=spec.depth_method,
                                      rescale_norms=spec.rescale_norms, importance_dir=str(run.path("importance")))
        with atomic_directory(run.path("winners", arch.name), overwrite=True) as tmp:
            save_student(student, tokenizer, plan, tmp)
        table.append({"rank": rank, "name": arch.name, "params": plan.params, "val_loss": winner["val_loss"],
                      "val_kl": winner["val_kl"], "path": str(Path("winners") / arch.name)})
        run.log(f"  winner {rank}: {arch.name} ({plan.params:,} parameters, val KL {winner['val_kl']:.4f})")
    write_csv(run.path("winners.csv"), table, WINNER_COLUMNS)
    return {"winners": [t["name"] for t in table]}


def _load_student(folder: Path, device: str) -> PreTrainedModel:
    student = transformers.AutoModelForCausalLM.from_pretrained(folder)
    student.to(device)  # type: ignore[arg-type]  # transformers' wrapped `to` loses torch's signature
    return student


def _log_eval(run: Run, name: str) -> Callable[[EvalPoint], None]:
    def log(point: EvalPoint) -> None:
        run.log(f"  {name} step {point.step}: val loss {point.val_loss:.4f}, val KL {point.val_kl:.4f}")

    return log


def distill_winners(run: Run) -> dict[str, Any]:
    s = run.settings
    teacher, tokenizer = run.teacher()
    device = run.device()
    config = validate_at_most(DistillConfig(
        num_tokens=s.full_tokens, seq_len=s.seq_len, batch_size=s.batch_size, lr=s.lr,
        num_val_sequences=s.validation_sequences, seed=s.seed, dtype="bf16" if device == "cuda" else "float32",
    ), s.evals_per_trial)
    results = {}
    for row in run.winner_rows():
        folder = run.path(row["path"])
        student = _load_student(folder, device)
        result = distill(student, run.sequences("train"), run.sequences("validation"), config, teacher=teacher,
                         checkpoint_dir=run.path("checkpoints", row["name"]), resume=run.resume,
                         on_eval=_log_eval(run, row["name"]))
        plan = (folder / PLAN_FILE).read_text()
        with atomic_directory(folder, overwrite=True) as tmp:
            save_distilled(tmp, student, tokenizer, result, config=config, teacher=s.teacher,
                           student_source=row["path"], data=s.data, extra_files={PLAN_FILE: plan})
        shutil.rmtree(run.path("checkpoints", row["name"]), ignore_errors=True)
        if run.path("checkpoints").is_dir() and not any(run.path("checkpoints").iterdir()):
            run.path("checkpoints").rmdir()
        results[row["name"]] = {"val_loss": result.val_loss, "val_kl": result.val_kl}
    return {"results": results}


# ---- evaluation and report ---------------------------------------------------------------------------------
def evaluate(run: Run) -> dict[str, Any]:
    s = run.settings
    teacher, tokenizer = run.teacher()
    device = run.device()
    models = [("teacher", teacher)] + [
        (row["name"], _load_student(run.path(row["path"]), device))
        for row in run.winner_rows()
    ]
    results, speeds = [], []
    for label, model in models:
        results.append(evaluate_model(model, tokenizer, s.eval_tasks, limit=s.eval_limit, device=device,
                                      batch_size=s.batch_size, label=label))
        speeds.append(measure_speed(model, batch_size=1, seq_len=s.seq_len, device=device, label=label))
        run.log(f"  {label}: {results[-1].tasks}")
    save_eval(run.dir, results, speeds)
    return {"models": [label for label, _ in models]}


def report(run: Run) -> dict[str, Any]:
    path = write_report(run.dir).resolve()
    run.log(f"  report: {path}")
    return {"path": str(path)}
