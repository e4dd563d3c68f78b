"""`nas-minitron search`: the whole pipeline, from a teacher and a budget to distilled, evaluated winners."""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import json
import sys
from collections.abc import Callable
from pathlib import Path

from nas_minitron.errors import UserError
from nas_minitron.pipeline.plan import describe_plan
from nas_minitron.pipeline.run_dir import STAGES
from nas_minitron.pipeline.runner import plan_search, run_search
from nas_minitron.pipeline.settings import (
    NONE_WORDS,
    SearchSettings,
    optional_setting,
    resolve_settings,
    run_preset_names,
)

__all__ = ["register"]

# flag -> SearchSettings field, with its type; help text comes from the field's docstring in pipeline/settings.py.
# --teacher and --cache-dir are these fields too (not `commands.args.add_teacher_args`): their defaults are None so
# that a flag not given leaves the --config YAML's value, and search has no --trust-remote-code.
_FLAGS: dict[str, tuple[str, type]] = {
    "--budget": ("budget", str),
    "--teacher": ("teacher", str),
    "--teacher-revision": ("teacher_revision", str),
    "--data": ("data", str),
    "--space": ("space", str),
    "--tolerance": ("tolerance", float),
    "--max-candidates": ("max_candidates", int),
    "--strategy": ("strategy", str),
    "--rungs": ("rungs", str),
    "--eta": ("eta", int),
    "--screen": ("screen", int),
    "--trials": ("trials", int),
    "--short-tokens": ("short_tokens", int),
    "--winners": ("winners", int),
    "--full-tokens": ("full_tokens", int),
    "--objectives": ("objectives", str),
    "--seq-len": ("seq_len", int),
    "--batch-size": ("batch_size", int),
    "--lr": ("lr", float),
    "--calibration-samples": ("calibration_samples", int),
    "--calib-seq-len": ("calib_seq_len", int),
    "--importance": ("importance", str),
    "--loss-sequences": ("loss_sequences", int),
    "--validation-sequences": ("validation_sequences", int),
    "--evals-per-trial": ("evals_per_trial", int),
    "--topk": ("topk", int),
    "--eval-tasks": ("eval_tasks", str),
    "--eval-limit": ("eval_limit", int),
    "--sampler": ("sampler", str),
    "--gpus-per-trial": ("gpus_per_trial", float),
    "--cpus-per-trial": ("cpus_per_trial", int),
    "--tokenize-procs": ("tokenize_procs", int),
    "--max-concurrent": ("max_concurrent", int),
    "--ray-address": ("ray_address", str),
    "--storage": ("storage", str),
    "--seed": ("seed", int),
    "--cache-dir": ("cache_dir", str),
    "--device": ("device", str),
    "--scratch-dir": ("scratch_dir", str),
    "--cache-gpus": ("cache_gpus", int),
    "--cache-workers": ("cache_workers", int),
    "--cache-batch-size": ("cache_batch_size", int),
    "--full-gpus": ("full_gpus", int),
    "--full-workers": ("full_workers", int),
    "--global-batch-tokens": ("global_batch_tokens", int),
    "--checkpoint-minutes": ("checkpoint_minutes", float),
    "--gpu-memory-gib": ("gpu_memory_gib", float),
    "--host-memory-gib": ("host_memory_gib", float),
    "--dmc-cr": ("dmc_cr", str),
    "--dmc-tokens": ("dmc_tokens", int),
    "--dmc-decision-lr-scale": ("dmc_decision_lr_scale", float),
}


def _or_none(kind: type) -> Callable[[str], object]:
    """argparse type of an optional setting: `none`/`null` pass through (settings turn them into None)."""

    def parse(text: str) -> object:
        return text if text.strip().lower() in NONE_WORDS else kind(text)

    parse.__name__ = kind.__name__  # argparse names the type in its error message
    return parse


def _field_docs() -> dict[str, str]:
    """The docstring under each SearchSettings field (read from the source, as litgpt does for its CLI)."""
    docs: dict[str, str] = {}
    tree = ast.parse(inspect.getsource(SearchSettings))
    body = tree.body[0].body  # type: ignore[attr-defined]
    for node, following in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(following, ast.Expr):
            docs[node.target.id] = str(following.value.value)  # type: ignore[attr-defined,union-attr]
    return docs


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "search",
        help="search for the best pruned + distilled student at a parameter budget",
        description=(
            "Importance → candidates near the budget → short distillation of Optuna-proposed candidates as Ray Tune "
            "trials → winners fully distilled → (--dmc-cr: the winners retrofitted with DMC) → lm-eval → HTML "
            "report, all in --run-dir. With no --teacher it runs the embedded default (smollm2-135m + builtin "
            "data) with CPU-sized defaults (~15 min on 2 cores). "
            "Flags override --config YAML; the resolved settings are saved in the run directory."
        ),
    )
    defaults = SearchSettings()
    docs = _field_docs()
    for flag, (field, kind) in _FLAGS.items():
        default = getattr(defaults, field)
        shown = ",".join(default) if isinstance(default, tuple) else default
        suffix = "" if default is None else f" (default: {shown})"  # a None default is described in the docstring
        optional = optional_setting(field)
        parser.add_argument(flag, dest=field, type=_or_none(kind) if optional else kind, default=None,
                            help=f"{docs.get(field, '')}{suffix}")
    parser.add_argument("--stop-when-stable", dest="stop_when_stable", action="store_const", const=True,
                        default=None, help=docs.get("stop_when_stable", ""))
    parser.add_argument("--asha", dest="asha", action="store_const", const=True, default=None,
                        help=docs.get("asha", ""))
    parser.add_argument("--verify", dest="verify", action="store_const", const=True, default=None,
                        help=docs.get("verify", ""))
    parser.add_argument("--config", type=Path, default=None,
                        help="YAML file of settings, or a shipped run preset by name: "
                             f"{', '.join(run_preset_names())} (flags override it)")
    parser.add_argument("--run-dir", type=Path, default=None, help="run directory (default: runs/<teacher>-<budget>)")
    parser.add_argument("--resume", action="store_true", help="continue the run in --run-dir, skipping done stages")
    parser.add_argument("--stop-after", metavar="STAGE", default=None,
                        help=f"stop once this stage is done ({', '.join(STAGES)}); later stages' checks are left "
                             "to the --resume that runs them (e.g. train on a GPU cluster, evaluate elsewhere)")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the resource plan (tokens, CPU RAM, GPU memory per device, disk, time per stage) "
                             "and exit: no run directory, no Ray; exit 2 when it does not fit")
    parser.add_argument("--json", action="store_true", help="with --dry-run: print the plan as JSON")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    fields = [f.name for f in dataclasses.fields(SearchSettings)]
    overrides = {name: getattr(args, name) for name in fields if hasattr(args, name)}
    settings = resolve_settings(args.config, overrides)
    run_dir = args.run_dir or Path("runs") / f"{Path(settings.teacher).name}-{settings.budget}"

    def log(message: str) -> None:
        print(message, flush=True)

    if args.json and not args.dry_run:
        raise UserError("--json prints the plan of --dry-run; pass --dry-run too.")
    if args.dry_run:
        plan = plan_search(settings, run_dir, args.resume, stop_after=args.stop_after)
        print(json.dumps(plan.to_dict(), indent=1) if args.json else "\n".join(describe_plan(plan)), flush=True)
        if not plan.fits:
            raise UserError("the run does not fit: " + "; ".join(plan.problems) + ".")
        return 0
    report = run_search(settings, run_dir, args.resume, log, stop_after=args.stop_after)
    if report is None:
        print(f"stopped after stage {args.stop_after!r}; continue with --resume --run-dir {run_dir}")
    else:
        print(f"report: {report}")
    sys.stdout.flush()
    return 0
