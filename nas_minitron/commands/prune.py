"""`nas-minitron prune`: cut one student from a teacher, an arch name and a criterion.

A local safetensors teacher (a directory, or a GGUF / the embedded default once converted) is never loaded for the
cut: the student is read from its files (`prune.sliced`); only `--criterion magnitude`, which scores every
weight, loads it first. A hub id is loaded and cut by `materialize`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nas_minitron._lazy import lazy_import
from nas_minitron.atomic import atomic_directory, check_output_dir
from nas_minitron.commands.args import add_teacher_args, at_least
from nas_minitron.errors import UserError
from nas_minitron.families import describe
from nas_minitron.prune.baselines import magnitude_scores, random_scores
from nas_minitron.prune.keep import DEPTH_METHODS
from nas_minitron.prune.plan import PruningPlan, save_student, target_arch
from nas_minitron.prune.scores import ImportanceScores
from nas_minitron.prune.sliced import is_safetensors_dir
from nas_minitron.prune.student import build_student
from nas_minitron.teacher import (
    load_teacher,
    load_teacher_config,
    load_teacher_tokenizer,
    resolve_teacher_dir,
    weights_fingerprint,
    weights_fingerprint_of_dir,
)

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel
else:
    torch = lazy_import("torch")

__all__ = ["register"]


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "prune",
        help="prune a teacher to one architecture and save it as a Hugging Face directory",
        description=(
            "Prune --teacher to --arch (L{layers}-H{hidden}-I{intermediate}-A{heads}-KV{kv_heads}) keeping the units "
            "ranked highest by --importance scores, or by a baseline --criterion; or re-derive a student from a "
            "pruning.json with --plan. Writes weights, config, tokenizer and pruning.json to --out."
        ),
    )
    add_teacher_args(parser, required=False)
    parser.add_argument("--arch", help="target architecture, e.g. L24-H432-I1024-A6-KV3")
    parser.add_argument("--out", required=True, type=Path, help="output directory (must not exist)")
    how = parser.add_mutually_exclusive_group()
    how.add_argument("--importance", type=Path, help="importance directory from `nas-minitron importance`")
    how.add_argument(
        "--criterion",
        choices=("magnitude", "random"),
        help="baseline keep sets when no importance scores are given (default: magnitude)",
    )
    how.add_argument("--plan", type=Path, help="re-derive the student recorded in this pruning.json")
    parser.add_argument("--seed", type=at_least(0), default=0, help="seed of --criterion random (default: 0)")
    parser.add_argument(
        "--depth-method", choices=DEPTH_METHODS, default="auto", help="how layers are chosen (default: auto)"
    )
    parser.add_argument(
        "--no-rescale-norms",
        dest="rescale_norms",
        action="store_false",
        help="do not rescale RMSNorm weights by sqrt(H/H') when embedding channels are pruned",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    check_output_dir(args.out, args.overwrite)  # before any expensive work
    plan = PruningPlan.load(args.plan) if args.plan else None
    teacher_spec = args.teacher or (plan.teacher if plan else None)
    if not teacher_spec:
        raise UserError("--teacher is required (or --plan with a pruning.json that names its teacher).")
    arch_name = args.arch or (plan.arch.name if plan else None)
    if not arch_name:
        raise UserError("--arch is required, e.g. --arch L24-H432-I1024-A6-KV3 (or --plan pruning.json).")
    config = load_teacher_config(teacher_spec, args.cache_dir, args.trust_remote_code)
    target = target_arch(config, arch_name)  # refuses unprunable/unloadable archs before loading weights
    if plan is not None and plan.arch != target:
        raise UserError(f"--arch {arch_name} differs from the plan's {plan.arch.name}.")
    where = resolve_teacher_dir(teacher_spec, args.cache_dir)
    teacher: PreTrainedModel | str
    if is_safetensors_dir(where):
        teacher, tokenizer = where, load_teacher_tokenizer(where, args.trust_remote_code)  # cut from the files
    else:  # a hub id: transformers resolves and loads it
        teacher, tokenizer = load_teacher(teacher_spec, args.cache_dir, trust_remote_code=args.trust_remote_code)
    student, plan = build_student(
        teacher,
        teacher_spec,
        target,
        _scores(args, teacher_spec, config, teacher) if plan is None else None,
        plan=plan,
        depth_method=args.depth_method,
        rescale_norms=args.rescale_norms,
        importance_dir=str(args.importance) if args.importance else None,
        dtype=torch.float32 if isinstance(teacher, str) else None,  # float32, as load_teacher gives
    )
    with atomic_directory(args.out, overwrite=args.overwrite) as tmp:
        save_student(student, tokenizer, plan, tmp)
    print(f"{plan.arch.name}: {plan.params:,} parameters ({plan.criterion}) -> {args.out}")
    sys.stdout.flush()
    return 0


def _scores(
    args: argparse.Namespace, teacher_spec: str, config: dict[str, Any], teacher: PreTrainedModel | str
) -> ImportanceScores:
    if args.importance:
        scores = ImportanceScores.load(args.importance)
        _check_scores_teacher(scores, args, teacher_spec, config, teacher)
        return scores
    if args.criterion == "random":
        return random_scores(describe(config)[1], args.seed)
    if isinstance(teacher, str):  # magnitude reads every weight: load the teacher here, freed before the cut
        teacher = load_teacher(teacher_spec, args.cache_dir, trust_remote_code=args.trust_remote_code)[0]
    return magnitude_scores(teacher)


def _check_scores_teacher(scores: ImportanceScores, args: argparse.Namespace, teacher_spec: str,
                          config: dict[str, Any], teacher: PreTrainedModel | str) -> None:
    """UserError when --importance was computed for another teacher: its recorded teacher_arch or
    weights_fingerprint differs from --teacher's (records without them are not checked)."""
    given = {"teacher_arch": describe(config)[1].name}
    if scores.meta.get("weights_fingerprint") is not None:
        fingerprint = weights_fingerprint_of_dir(teacher, args.trust_remote_code) if isinstance(teacher, str) else None
        if fingerprint is None:  # a hub model, or files named otherwise than the model's tensors
            loaded = teacher if not isinstance(teacher, str) else load_teacher(
                teacher_spec, args.cache_dir, trust_remote_code=args.trust_remote_code)[0]
            fingerprint = weights_fingerprint(loaded)
        given["weights_fingerprint"] = fingerprint
    differ = [f"{key} {scores.meta[key]!r} in the scores, {value!r} for --teacher"
              for key, value in given.items() if scores.meta.get(key) not in (None, value)]
    if differ:
        raise UserError(f"--importance {str(args.importance)!r} was computed for another teacher than --teacher "
                        f"{teacher_spec!r} ({'; '.join(differ)}); run `nas-minitron importance` on this teacher.")


