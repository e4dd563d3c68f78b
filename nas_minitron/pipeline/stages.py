"""The stages of `nas-minitron search`, each a function of the live `Run` that writes its own outputs.

pipeline.py decides their order and resume; each stage reads what earlier stages wrote in the run directory.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nas_minitron.atomic import atomic_directory
from nas_minitron.errors import UserError

if TYPE_CHECKING:
    from nas_minitron.distill.config import DistillConfig
    from nas_minitron.pipeline.runner import Run
    from nas_minitron.pipeline.settings import SearchSettings
    from nas_minitron.search.tune import TrialSpec

__all__ = ["candidates", "distill_winners", "evaluate", "importance", "logit_cache", "report", "trials", "winners"]

TRIAL_COLUMNS = ("trial_id", "number", "name", "num_hidden_layers", "hidden_size", "intermediate_size",
                 "num_attention_heads", "num_key_value_heads", "params", "status", "wall_s", "num_tokens",
                 "val_loss", "val_kl", "val_loss_step0", "val_kl_step0", "kv_bytes_per_token", "flops_per_token",
                 "error")
CURVE_COLUMNS = ("trial_id", "name", "step", "num_tokens", "val_loss", "val_kl")
WINNER_COLUMNS = ("rank", "name", "params", "val_loss", "val_kl", "path")
DEFAULT_CPU_SPACE = "smollm2-135m-cpu"  # the embedded default's space: few depths keep importance short on CPU


def write_csv(path: Path, rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(columns), extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    tmp.replace(path)


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


# ---- pre-flight: everything that can refuse the run before it writes or computes anything ------------------------
def find_candidates(s: SearchSettings, budget_params: int) -> tuple[Any, dict[str, Any], list[Any]]:
    """(space, teacher config, candidates); UserError for an unreachable budget or an empty window."""
    from nas_minitron.space.candidates import default_space, enumerate_candidates
    from nas_minitron.space.spaces import load_space
    from nas_minitron.teacher import DEFAULT_TEACHER, load_teacher_config

    teacher_config = load_teacher_config(s.teacher, s.cache_dir)
    name = s.space or (DEFAULT_CPU_SPACE if s.teacher == DEFAULT_TEACHER else None)
    space = load_space(name, teacher_config) if name else default_space(teacher_config)
    return space, teacher_config, enumerate_candidates(space, teacher_config, budget_params, s.tolerance,
                                                       s.max_candidates)


def start_ray(s: SearchSettings, config: dict[str, Any], log: Callable[[str], None]) -> None:
    """Start or join Ray and check that one trial fits, before the expensive stages."""
    from nas_minitron.search.tune import RayOptions, check_resources, connect_ray

    dashboard = connect_ray(RayOptions(address=s.ray_address))
    if dashboard:
        log(f"Ray dashboard: {dashboard}")
    # teacher weights while pruning + student weights, grads and AdamW state + logits and their grads + runtime
    vocab = int(config.get("vocab_size") or 0)
    memory = (4 * int(config["teacher_params"]) + 16 * int(config["budget_params"])
              + 12 * s.batch_size * s.seq_len * vocab + 2**30)
    check_resources(s.cpus_per_trial, s.gpus_per_trial, memory)


# ---- candidates ----------------------------------------------------------------------------------------------
def candidates(run: Run) -> dict[str, Any]:
    from nas_minitron.space.candidates import CANDIDATE_COLUMNS, best_pure_depth, best_pure_width

    s = run.settings
    budget = int(run.config["budget_params"])
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


def _candidate_rows(run: Run) -> list[dict[str, str]]:
    return read_csv(run.path("candidates.csv"))


# ---- importance ------------------------------------------------------------------------------------------------
def importance(run: Run) -> dict[str, Any]:
    from nas_minitron.data import take_sequences
    from nas_minitron.prune.importance import compute_importance

    s = run.settings
    teacher, tokenizer = run.teacher()
    layers = int(run.config["teacher_arch"].split("-")[0][1:])
    drops = sorted({layers - int(r["num_hidden_layers"]) for r in _candidate_rows(run)} - {0})
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
    import torch
    from safetensors.torch import save_file

    from nas_minitron.data import take_sequences
    from nas_minitron.distill.logit_cache import build_logit_cache

    s = run.settings
    teacher, tokenizer = run.teacher()
    num_train = _num_train_sequences(run, max(s.short_tokens, s.full_tokens))
    train = take_sequences(s.data, tokenizer, "train", s.seq_len, num_train, s.seed)  # [N, T]
    val = take_sequences(s.data, tokenizer, "validation", s.seq_len, s.validation_sequences, s.seed)  # [V, T]
    with atomic_directory(run.path("data"), overwrite=True) as tmp:
        save_file({"tokens": train.contiguous()}, str(tmp / "train.safetensors"))
        save_file({"tokens": val.contiguous()}, str(tmp / "validation.safetensors"))
    if s.topk <= 0:
        return {"topk": 0}
    short = train[: _num_train_sequences(run, s.short_tokens)]
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


def _short_distill_config(run: Run) -> dict[str, Any]:
    from nas_minitron.distill.config import DistillConfig

    s = run.settings
    config = DistillConfig(
        num_tokens=s.short_tokens, seq_len=s.seq_len, batch_size=s.batch_size, lr=s.lr,
        num_val_sequences=s.validation_sequences, seed=s.seed, topk=s.topk if s.topk > 0 else 0,
        dtype="bf16" if s.gpus_per_trial > 0 else "float32",
    )
    return validate_at_most(config, s.evals_per_trial).to_dict()


def trial_spec(run: Run) -> TrialSpec:
    """What every trial of this run shares, by path (also used by benchmarks/bench_search_vs_exhaustive.py)."""
    from nas_minitron.teacher import resolve_teacher_dir
    from nas_minitron.search.tune import TrialSpec

    s = run.settings
    num_short = _num_train_sequences(run, s.short_tokens)
    return TrialSpec(
        run_dir=str(run.dir.resolve()),
        teacher_dir=resolve_teacher_dir(s.teacher, s.cache_dir),
        importance_dir=str(run.path("importance").resolve()),
        train_path=str(_short_train(run, num_short).resolve()),
        val_path=str(run.path("data", "validation.safetensors").resolve()),
        logit_cache_dir=str(run.path("logit_cache").resolve()) if s.topk > 0 else None,
        candidates=tuple(r["name"] for r in _candidate_rows(run)),
        head_dim=int(run.config["head_dim"]),
        distill=_short_distill_config(run),
        objectives=tuple(s.objectives),
        cpus_per_trial=s.cpus_per_trial,
        gpus_per_trial=s.gpus_per_trial,
    )


def trials(run: Run) -> dict[str, Any]:
    from nas_minitron.search.tune import RayOptions, run_trials, trial_rows

    s = run.settings
    spec = trial_spec(run)
    options = RayOptions(address=s.ray_address, max_concurrent=s.max_concurrent, sampler=s.sampler, asha=s.asha,
                         seed=s.seed, storage_url=s.storage)
    baselines = run.stage_info("candidates").get("baselines", [])
    rows = trial_rows(run_trials(spec, options, s.trials, baselines, resume=run.resume))
    _write_trial_tables(run, rows)
    done = sum(r["status"] == "COMPLETE" for r in rows)
    run.log(f"  {len(rows)} trials: {done} complete, {len(rows) - done} failed or stopped")
    if not done:
        raise UserError(f"no search trial finished; see the errors in {run.path('trials.csv')}.")
    return {"num_trials": len(rows), "num_complete": done}


def _short_train(run: Run, num_sequences: int) -> Path:
    """The short-distillation stream (the sequences the logit cache covers), as its own file."""
    from safetensors.torch import save_file

    path = run.path("data", "train_short.safetensors")
    if not path.is_file():
        save_file({"tokens": run.sequences("train")[:num_sequences].contiguous()}, str(path))
    return path


def _write_trial_tables(run: Run, rows: list[dict[str, Any]]) -> None:
    from nas_minitron.search.tune import optuna_numbers, study_storage_url

    candidates_by_name = {r["name"]: r for r in _candidate_rows(run)}
    numbers = optuna_numbers(study_storage_url(run.dir, run.settings.storage))
    table, curves = [], []
    for row in rows:
        metrics, first, name = row["metrics"], row["first"], row["name"]
        arch = candidates_by_name.get(name, {})
        table.append({
            "trial_id": row["trial_id"], "number": numbers.get(row["trial_id"], ""), "name": name, **arch,
            "status": row["status"], "wall_s": metrics.get("time_total_s", ""), "num_tokens": metrics.get("num_tokens"),
            "val_loss": metrics.get("val_loss"), "val_kl": metrics.get("val_kl"),
            "val_loss_step0": first.get("val_loss"), "val_kl_step0": first.get("val_kl"),
            "error": row["error"] or metrics.get("error", ""),
        })
        seen: dict[int, dict[str, Any]] = {}
        for point in row["curve"]:
            if point.get("step") is not None and not point.get("failed") and not point.get("reused_from"):
                seen[int(point["step"])] = {"trial_id": row["trial_id"], "name": name, **point}
        curves.extend(seen[k] for k in sorted(seen))
    write_csv(run.path("trials.csv"), table, TRIAL_COLUMNS)
    write_csv(run.path("trial_curves.csv"), curves, CURVE_COLUMNS)


# ---- winners and their full distillation ------------------------------------------------------------------------------
def winners(run: Run) -> dict[str, Any]:
    from nas_minitron.arch import ArchConfig
    from nas_minitron.prune.surgery import materialize
    from nas_minitron.prune.plan import plan_for, save_student
    from nas_minitron.prune.scores import ImportanceScores
    from nas_minitron.search.winners import select_winners

    s = run.settings
    rows = []
    for row in read_csv(run.path("trials.csv")):
        parsed: dict[str, Any] = dict(row)
        for key in ("val_loss", "val_kl", "params", "kv_bytes_per_token", "flops_per_token"):
            parsed[key] = float(row[key]) if row.get(key) not in (None, "") else math.nan
        rows.append(parsed)
    chosen = select_winners(rows, s.objectives, s.winners)
    teacher, tokenizer = run.teacher()
    scores = ImportanceScores.load(run.path("importance"))
    table = []
    for rank, row in enumerate(chosen, start=1):
        arch = ArchConfig.parse(row["name"], int(run.config["head_dim"]))
        plan = plan_for(teacher, s.teacher, arch, scores, importance_dir=str(run.path("importance")))
        student = materialize(teacher, arch, plan.keep, rescale_norms=plan.rescale_norms)
        with atomic_directory(run.path("winners", arch.name), overwrite=True) as tmp:
            save_student(student, tokenizer, plan, tmp)
        table.append({"rank": rank, "name": arch.name, "params": plan.params, "val_loss": row["val_loss"],
                      "val_kl": row["val_kl"], "path": str(Path("winners") / arch.name)})
        run.log(f"  winner {rank}: {arch.name} ({plan.params:,} parameters, val KL {row['val_kl']:.4f})")
    write_csv(run.path("winners.csv"), table, WINNER_COLUMNS)
    return {"winners": [t["name"] for t in table]}


def distill_winners(run: Run) -> dict[str, Any]:
    from transformers import AutoModelForCausalLM

    from nas_minitron.distill.trainer import distill
    from nas_minitron.distill.config import DistillConfig

    s = run.settings
    teacher, tokenizer = run.teacher()
    device = run.device()
    config = validate_at_most(DistillConfig(
        num_tokens=s.full_tokens, seq_len=s.seq_len, batch_size=s.batch_size, lr=s.lr,
        num_val_sequences=s.validation_sequences, seed=s.seed, dtype="bf16" if device == "cuda" else "float32",
    ), s.evals_per_trial)
    results = {}
    for row in read_csv(run.path("winners.csv")):
        folder = run.path(row["path"])
        student = AutoModelForCausalLM.from_pretrained(folder).to(device)
        result = distill(student, run.sequences("train"), run.sequences("validation"), config, teacher=teacher,
                         checkpoint_dir=run.path("checkpoints", row["name"]), resume=run.resume,
                         on_eval=lambda p, n=row["name"]: run.log(
                             f"  {n} step {p.step}: val loss {p.val_loss:.4f}, val KL {p.val_kl:.4f}"))
        plan = (folder / "pruning.json").read_text()
        with atomic_directory(folder, overwrite=True) as tmp:
            student.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            (tmp / "pruning.json").write_text(plan)
            (tmp / "distill.json").write_text(json.dumps(
                {"num_tokens": result.num_tokens, "val_loss": result.val_loss, "val_kl": result.val_kl,
                 "curve": [p.to_dict() for p in result.curve]}, indent=1) + "\n")
        shutil.rmtree(run.path("checkpoints", row["name"]), ignore_errors=True)
        if run.path("checkpoints").is_dir() and not any(run.path("checkpoints").iterdir()):
            run.path("checkpoints").rmdir()
        results[row["name"]] = {"val_loss": result.val_loss, "val_kl": result.val_kl}
    return {"results": results}


# ---- evaluation and report ---------------------------------------------------------------------------------------------
def evaluate(run: Run) -> dict[str, Any]:
    from transformers import AutoModelForCausalLM

    from nas_minitron.evaluate.harness import evaluate_model, save_eval
    from nas_minitron.evaluate.speed import measure_speed

    s = run.settings
    teacher, tokenizer = run.teacher()
    device = run.device()
    models = [("teacher", teacher)] + [
        (row["name"], AutoModelForCausalLM.from_pretrained(run.path(row["path"])).to(device))
        for row in read_csv(run.path("winners.csv"))
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
    from nas_minitron.report.page import write_report

    path = write_report(run.dir).resolve()
    run.log(f"  report: {path}")
    return {"path": str(path)}
