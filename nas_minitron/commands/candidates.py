"""`nas-minitron candidates`: the students of a search space near a parameter budget, from the config alone."""

from __future__ import annotations

import argparse
import csv
import io
import json
import sys
from collections.abc import Sequence

from nas_minitron.arch import Budget, count_params
from nas_minitron.commands.args import add_teacher_args, at_least, fraction
from nas_minitron.families import describe
from nas_minitron.space.candidates import CANDIDATE_COLUMNS, Candidate, default_space, enumerate_candidates
from nas_minitron.space.presets import preset_names, resolve_teacher_config
from nas_minitron.space.spaces import load_space, space_names
from nas_minitron.teacher import DEFAULT_TEACHER

__all__ = ["format_candidates", "register", "run"]


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "candidates",
        help="list the architectures of a search space near a parameter budget (no weights loaded)",
        description=(
            "List every student of the search space whose exact parameter count lies within --tolerance of "
            "--budget, closest first. Only the teacher's config is read; nothing is built or loaded."
        ),
    )
    add_teacher_args(parser, required=False, default=DEFAULT_TEACHER,
                     help=f"preset ({', '.join(preset_names())}), config.json, model directory or hub id "
                     f"(default: {DEFAULT_TEACHER})")
    parser.add_argument("--budget", required=True, help="parameters: 4B, 4.5e9, 500M, 90M, or 0.5x of the teacher")
    parser.add_argument(
        "--space",
        default=None,
        help=f"search-space YAML file or shipped name ({', '.join(space_names())}); default: derived from the teacher",
    )
    parser.add_argument("--tolerance", type=fraction, default=None,
                        help="allowed |params - budget| / budget (default: the space's, 0.05)")
    parser.add_argument("--format", choices=("table", "csv", "json"), default="table", help="output format")
    parser.add_argument("--max", type=at_least(1), default=None, dest="max_count", help="print at most N candidates")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    budget = Budget.parse(args.budget)  # before reading the teacher: a typo fails instantly
    config = resolve_teacher_config(args.teacher, args.cache_dir, args.trust_remote_code)
    family, teacher_arch = describe(config)
    teacher_params = count_params(teacher_arch, family.invariants_from_config(config))
    budget_params = budget.resolve(teacher_params)
    space = load_space(args.space, config) if args.space else default_space(config)
    candidates = enumerate_candidates(space, config, budget_params, args.tolerance, args.max_count)
    tolerance = space.tolerance if args.tolerance is None else args.tolerance
    if args.format == "json":
        header = {"teacher": args.teacher, "teacher_arch": teacher_arch.name, "teacher_params": teacher_params,
                  "budget_params": budget_params, "tolerance": tolerance, "space": space.to_dict()}
        print(json.dumps({**header, "candidates": [c.row() for c in candidates]}, indent=2))
    else:
        sys.stdout.write(format_candidates(candidates, args.format))
    print(
        f"{len(candidates)} candidate(s) within ±{tolerance:.1%} of {budget_params:,} parameters; teacher "
        f"{teacher_arch.name} ({teacher_params:,}); search space {space.name!r}",
        file=sys.stderr,
    )
    return 0


def format_candidates(candidates: Sequence[Candidate], fmt: str) -> str:
    """`csv` (exactly CANDIDATE_COLUMNS, as candidates.csv) or an aligned `table` of the same columns."""
    rows = [c.row() for c in candidates]
    if fmt == "csv":
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=CANDIDATE_COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        return buffer.getvalue()
    cells = [list(CANDIDATE_COLUMNS)] + [
        [f"{row[col]:,}" if isinstance(row[col], int) else str(row[col]) for col in CANDIDATE_COLUMNS] for row in rows
    ]
    widths = [max(len(line[i]) for line in cells) for i in range(len(CANDIDATE_COLUMNS))]
    lines = ["  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(line, widths)))
             for line in cells]
    return "\n".join(lines) + "\n"
