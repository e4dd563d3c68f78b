"""The resource plan against reality (#13 item 4): each stage's planned CPU RAM and disk (`plan.json`) beside what
the run measured (`stages/<stage>.json` -> `measured`: peak RSS of the driver and its descendants, run-directory
bytes added at the stage's peak; `nas_minitron.pipeline.usage`), and the planned time beside the wall time.

    python benchmarks/bench_plan_check.py runs/default            # after `bash scripts/run_default.sh`

Prints one row per stage with measured / planned ratios and whether each is within +-25%; `--json` prints them as
JSON. A fresh run (not a resumed one) has the plan of every stage: a resumed run's plan.json holds only what that
invocation ran. Stages whose planned value is tiny (under 64 MiB of disk) are compared but not judged: a report's
HTML or a candidates CSV is noise against the model.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

TOLERANCE = 0.25
SMALL_DISK = 64 * 2**20


def rows(run_dir: Path) -> list[dict[str, Any]]:
    plan = json.loads((run_dir / "plan.json").read_text())
    out = []
    for stage in plan["stages"]:
        marker = run_dir / "stages" / f"{stage['stage']}.json"
        if not marker.is_file():
            continue
        info = json.loads(marker.read_text())
        measured = info.get("measured")
        if measured is None:
            continue
        ram = measured["peak_rss_bytes"] / max(1, stage["cpu_ram_bytes"])
        disk = measured["peak_disk_bytes"] / stage["disk_bytes"] if stage["disk_bytes"] else None
        out.append({
            "stage": stage["stage"],
            "planned_ram": stage["cpu_ram_bytes"], "measured_ram": measured["peak_rss_bytes"], "ram_ratio": ram,
            "ram_ok": abs(ram - 1) <= TOLERANCE,
            "planned_disk": stage["disk_bytes"], "measured_disk": measured["peak_disk_bytes"], "disk_ratio": disk,
            "disk_ok": None if stage["disk_bytes"] < SMALL_DISK else disk is not None and abs(disk - 1) <= TOLERANCE,
            "planned_s": stage["seconds"], "wall_s": info["wall_s"],
            "time_ratio": info["wall_s"] / stage["seconds"] if stage["seconds"] else None,
        })
    return out


def _mib(n: float) -> str:
    return f"{n / 2**20:,.0f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path, nargs="?", default=Path("runs/default"))
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    table = rows(args.run_dir)
    if args.json:
        print(json.dumps(table, indent=1))
        return 0
    print(f"{'stage':<12} {'RAM plan':>9} {'RSS peak':>9} {'ratio':>6}   {'disk plan':>9} {'disk peak':>9} "
          f"{'ratio':>6}   {'time plan':>9} {'wall':>7} {'ratio':>6}   (MiB, s)")
    for r in table:
        disk = "-" if r["disk_ratio"] is None else f"{r['disk_ratio']:.2f}"
        mark = {True: " ", False: "!", None: "~"}
        time = "-" if r["time_ratio"] is None else f"{r['time_ratio']:.2f}"
        print(f"{r['stage']:<12} {_mib(r['planned_ram']):>9} {_mib(r['measured_ram']):>9} {r['ram_ratio']:>5.2f}"
              f"{mark[r['ram_ok']]}  {_mib(r['planned_disk']):>9} {_mib(r['measured_disk']):>9} {disk:>5}"
              f"{mark[r['disk_ok']]}  {r['planned_s']:>9.1f} {r['wall_s']:>7.1f} {time:>6}")
    print(f"(! outside +-{TOLERANCE:.0%}; ~ disk too small to judge, under {SMALL_DISK // 2**20} MiB planned)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
