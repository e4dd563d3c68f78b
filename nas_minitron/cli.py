"""`nas-minitron` command line: argument parsing only; each subcommand lives in `nas_minitron/commands/`.

A `UserError` anywhere below becomes one line on stderr and exit code 2 (argparse's own code for bad usage).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from types import ModuleType
from typing import NoReturn

from nas_minitron import __version__
from nas_minitron.commands import (
    candidates,
    correct_teacher,
    distill,
    dmc,
    evaluate,
    importance,
    inspect,
    prune,
    report,
    search,
)
from nas_minitron.errors import UserError

__all__ = ["EXIT_USER_ERROR", "build_parser", "main"]

# (subcommand, its module under nas_minitron.commands), in --help order. Each module defines `register(subparsers)`,
# which adds its parser and sets `func` to a handler taking the parsed args and returning an exit code.
_COMMANDS: tuple[tuple[str, ModuleType], ...] = (
    ("prune", prune),
    ("inspect", inspect),
    ("search", search),
    ("candidates", candidates),
    ("importance", importance),
    ("distill", distill),
    ("correct-teacher", correct_teacher),
    ("dmc", dmc),
    ("eval", evaluate),
    ("report", report),
)

EXIT_USER_ERROR = 2


class _Parser(argparse.ArgumentParser):
    """argparse's parser with its errors (a bad flag value, a missing flag) in the one line a `UserError` gets:
    `PROG: error: MESSAGE (see PROG --help)` and exit code 2, not the usage block first. Subparsers inherit it."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USER_ERROR, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="nas-minitron",
        description=(
            "Prune a Hugging Face LLM by activation importance, distill it, and search for the best student at a "
            "parameter budget (Minitron-style)."
        ),
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for _name, module in _COMMANDS:
        module.register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    # transformers' advisory warnings would bury the one-line error of a bad input; users can override this.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    # Ray reads these when first imported: bind a local cluster to loopback only, and send no usage stats.
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except UserError as err:
        print(f"nas-minitron {args.command}: error: {err}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print(f"nas-minitron {args.command}: interrupted", file=sys.stderr)
        return 130
