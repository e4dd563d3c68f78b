"""A small synthetic-but-realistic `nas-minitron search` run directory (format: RUNDIR.md) for report/eval tests.

The teacher and the winners are real tiny models (winners materialized from the teacher by importance scores);
trial losses and curves are synthetic but shaped like short distillation runs (noisy, decreasing, rank swaps).
"""

from __future__ import annotations

import itertools
import json
import math
import random
from pathlib import Path
from typing import Any

from nas_minitron.distill.config import DistillResult, EvalPoint
from nas_minitron.distill.result import distill_record
from nas_minitron.pipeline.run_dir import CURVE_COLUMNS, STAGES, TRIAL_COLUMNS, WINNER_COLUMNS, write_csv
from nas_minitron.space.candidates import CANDIDATE_COLUMNS

NUM_STEPS = 5
TOKENS_PER_STEP = 2048


def _candidates(teacher_arch: Any, invariants: Any) -> list[Any]:
    from nas_minitron.arch import ArchConfig, prune_problems
    from nas_minitron.families import get_family

    family = get_family("llama")
    archs = []
    for layers, hidden, inter, (heads, kv) in itertools.product((3, 4), (48, 64), (64, 96, 128), ((2, 1), (4, 2))):
        arch = ArchConfig(layers, hidden, inter, heads, kv, teacher_arch.head_dim)
        if arch != teacher_arch and not prune_problems(arch, teacher_arch) and not family.loadable_problem(arch):
            archs.append(arch)
    return archs


def _trial_rows(archs: list[Any], invariants: Any, rng: random.Random, running: bool) -> tuple[list, list]:
    from nas_minitron.arch import count_params

    trials, curves = [], []
    min_params = min(count_params(a, invariants) for a in archs)
    for number, arch in enumerate(archs[:12]):
        params = count_params(arch, invariants)
        final = 6.2 - 0.8 * math.log(params / min_params) + rng.gauss(0, 0.05)
        start = final + 1.5 + rng.gauss(0, 0.4)
        status = "FAILED" if number == 7 else "PRUNED" if number == 9 else "COMPLETE"
        if running and number >= 8:
            status = "RUNNING"
        num_steps = {"FAILED": 1, "PRUNED": 2, "RUNNING": 2}.get(status, NUM_STEPS)
        trial_id = f"trial_{number:04d}"
        losses = [final + (start - final) * math.exp(-step / 1.5) + rng.gauss(0, 0.03) for step in range(num_steps + 1)]
        for step, loss in enumerate(losses):
            kl = max(0.01, loss - 4.9)
            curves.append(dict(trial_id=trial_id, name=arch.name, step=step, num_tokens=step * TOKENS_PER_STEP,
                               val_loss=round(loss, 5), val_kl=round(kl, 5)))  # fmt: skip
        done = status == "COMPLETE"
        trials.append(dict(
            trial_id=trial_id, number=number, name=arch.name, num_hidden_layers=arch.num_hidden_layers,
            hidden_size=arch.hidden_size, intermediate_size=arch.intermediate_size,
            num_attention_heads=arch.num_attention_heads, num_key_value_heads=arch.num_key_value_heads,
            params=params, status=status, wall_s=round(rng.uniform(20, 40), 2),
            num_tokens=(num_steps * TOKENS_PER_STEP) if status != "FAILED" else 0,
            val_loss=round(losses[-1], 5) if done else "", val_kl=round(max(0.01, losses[-1] - 4.9), 5) if done else "",
            val_loss_step0=round(losses[0], 5), val_kl_step0=round(max(0.01, losses[0] - 4.9), 5),
            error="RuntimeError: CUDA out of memory (synthetic)" if status == "FAILED" else "",
        ))  # fmt: skip
    return trials, curves


def write_synthetic_run(run_dir: Path, teacher_dir: Path, *, upto: str = "report") -> Path:
    """Write a run directory whose stages up to and including `upto` are complete (later ones missing)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from nas_minitron.arch import count_params
    from nas_minitron.evaluate.harness import EvalResult, save_eval
    from nas_minitron.evaluate.speed import measure_speed
    from nas_minitron.families import describe_model, get_family
    from nas_minitron.prune.keep import keep_from_scores
    from nas_minitron.prune.scores import ImportanceScores
    from nas_minitron.prune.surgery import materialize

    done = STAGES[: STAGES.index(upto) + 1]
    rng = random.Random(0)
    run_dir.mkdir(parents=True)
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(teacher_dir)
    _, t_arch = describe_model(teacher)
    invariants = get_family("llama").invariants_from_config(teacher.config.to_dict())
    teacher_params = count_params(t_arch, invariants)
    config = dict(
        teacher=str(teacher_dir), budget="0.7x", budget_params=int(0.7 * teacher_params),
        teacher_params=teacher_params, teacher_arch=t_arch.name, data="pydoc", space="tiny",
        trials=12, short_tokens=NUM_STEPS * TOKENS_PER_STEP, winners=2, full_tokens=40960,
        objectives=["val_loss", "params"], seed=0, seq_len=64, teacher_val_loss=4.95,
    )  # fmt: skip
    (run_dir / "config.json").write_text(json.dumps(config, indent=2))
    (run_dir / "stages").mkdir()
    wall_s = {stage: round(rng.uniform(2, 60), 2) for stage in done if stage != "report"}
    for stage, seconds in wall_s.items():
        marker = {"stage": stage, "wall_s": seconds, "finished_at": "2026-11-20T12:00:00"}
        (run_dir / "stages" / f"{stage}.json").write_text(json.dumps(marker))

    gen = torch.Generator().manual_seed(0)
    L, A, I = t_arch.num_hidden_layers, t_arch.num_attention_heads, t_arch.intermediate_size  # noqa: E741
    scores = ImportanceScores(
        heads=torch.rand(L, A, generator=gen) * torch.linspace(0.5, 1.5, L)[:, None],
        neurons=torch.rand(L, I, generator=gen).pow(3),
        channels=torch.rand(t_arch.hidden_size, generator=gen),
        layers={"block_importance": torch.tensor([0.9, 0.2, 0.3, 0.6][:L]), "loss_drop": torch.rand(L, generator=gen)},
        windows={1: 5 + torch.rand(L, generator=gen), 2: 5.5 + torch.rand(L - 1, generator=gen)},
        meta={"criterion": "activation", "teacher": str(teacher_dir), "num_tokens": 4096},
    )
    (run_dir / "importance").mkdir()
    scores.save(run_dir / "importance")

    archs = _candidates(t_arch, invariants)
    if "candidates" in done:
        kv_per_token = {a.name: 2 * a.num_hidden_layers * a.num_key_value_heads * a.head_dim * 2 for a in archs}
        rows = [dict(a.to_dict(), name=a.name, params=count_params(a, invariants),
                     kv_bytes_per_token=kv_per_token[a.name], flops_per_token=2 * count_params(a, invariants))
                for a in archs]
        write_csv(run_dir / "candidates.csv", rows, CANDIDATE_COLUMNS)

    if "candidates" in done:  # trials start right after candidates: a partial run has RUNNING trials
        trials, curves = _trial_rows(archs, invariants, rng, running="trials" not in done)
        write_csv(run_dir / "trials.csv", trials, TRIAL_COLUMNS)
        write_csv(run_dir / "trial_curves.csv", curves, CURVE_COLUMNS)
    if "winners" not in done:
        return run_dir

    in_budget = [t for t in trials if t["status"] == "COMPLETE" and t["params"] <= config["budget_params"]]
    complete = sorted(in_budget, key=lambda t: t["val_loss"])[:2]
    winner_rows, winners = [], []
    for rank, trial in enumerate(complete, start=1):
        arch = next(a for a in archs if a.name == trial["name"])
        student = materialize(teacher, arch, keep_from_scores(scores, t_arch, arch))
        out = run_dir / "winners" / arch.name
        student.save_pretrained(out)
        tokenizer.save_pretrained(out)
        (out / "pruning.json").write_text(json.dumps({"teacher": str(teacher_dir), "arch": arch.to_dict()}))
        if "distill" in done:
            curve = tuple(EvalPoint(step=s, num_tokens=s * 8192,
                                    val_loss=round(trial["val_loss"] - 0.3 * (1 - math.exp(-s / 2)), 5),
                                    val_kl=round(trial["val_kl"] * math.exp(-s / 3), 5), train_loss=math.nan,
                                    wall_s=float(s)) for s in range(6))
            result = DistillResult(curve=curve, val_loss=curve[-1].val_loss, val_kl=curve[-1].val_kl,
                                   num_tokens=curve[-1].num_tokens, num_steps=5, wall_s=5.0)
            (out / "distill.json").write_text(json.dumps(distill_record(result), indent=2))
        winner_rows.append(dict(rank=rank, name=arch.name, params=trial["params"], val_loss=trial["val_loss"],
                                val_kl=trial["val_kl"], path=str(out)))  # fmt: skip
        winners.append((arch.name, student, trial["params"]))
    write_csv(run_dir / "winners.csv", winner_rows, WINNER_COLUMNS)

    if "eval" in done:
        results, speeds = [], []
        for label, model, params in [("teacher", teacher, teacher_params), *winners]:
            acc = round(0.25 + 0.3 * params / teacher_params + rng.uniform(-0.02, 0.02), 4)
            task = {"acc": acc, "acc_stderr": 0.04, "acc_norm": round(acc - 0.01, 4), "acc_norm_stderr": 0.04}
            results.append(EvalResult(label, params, {"pydoc_next_sentence": task},
                                      num_fewshot={"pydoc_next_sentence": 0}))
            speeds.append(measure_speed(model, 2, 32, "cpu", 4, label=label))
        save_eval(run_dir, results, speeds)
    summary = dict(teacher=str(teacher_dir), budget="0.7x", data="pydoc", started_at="2026-11-20T11:00:00",
                   finished_at="2026-11-20T12:00:00" if upto == "report" else None, stage_wall_s=wall_s)  # fmt: skip
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return run_dir
