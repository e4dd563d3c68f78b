"""`nas-minitron report`: the HTML report of a run directory (plots and tables, self-contained)."""

from __future__ import annotations

import argparse

from nas_minitron.report.page import write_report

__all__ = ["register"]


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "report",
        help="write a self-contained HTML report of a search run",
        description=(
            "Write one self-contained HTML page (opens with no network) about a run directory: Pareto front, "
            "architecture axes, ranking stability, importance, loss curves, evaluation and a run summary, with "
            "its tables as CSV beside it. An unfinished run is reported as far as it got."
        ),
    )
    parser.add_argument("run_dir", metavar="RUN_DIR", help="run directory written by nas-minitron search")
    parser.add_argument("--out", default=None, help="HTML file to write (default reports/<run name>/report.html)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    path = write_report(args.run_dir, args.out)
    print(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MiB)")
    return 0
