"""Candidate enumeration speed: the default space of 8B, 12B and 70B teachers at a 0.5x budget, from configs alone.

Prints, per teacher, the size of the space's cartesian product (what a naive search would list), how many
combinations the pruned enumeration actually examined, the wall time (best of --repeats), and for the teachers
where it is affordable the time of a brute-force walk over the whole product, as a ratio measured in this run.

    PYTHONPATH=$PWD python benchmarks/bench_candidates.py [--repeats 5] [--brute-force-max 1000000]
"""

from __future__ import annotations

import argparse
import itertools
import platform
import subprocess
import sys
import time
from collections.abc import Callable

from nas_minitron.arch import ArchConfig, count_params
from nas_minitron.space.candidates import (  # noqa: PLC2701  (benchmark-only peek at the walk)
    AXES,
    _scan,
    _teacher,
    axis_values,
    budget_window,
    count_combinations,
    default_space,
    enumerate_candidates,
)
from nas_minitron.space.presets import load_preset

# Llama-3.1-70B's published config.json facts (no preset ships: nothing in the tool needs it yet).
LLAMA_70B = {**load_preset("llama-3.1-8b"), "num_hidden_layers": 80, "hidden_size": 8192,
             "intermediate_size": 28672, "num_attention_heads": 64, "num_key_value_heads": 8}
TEACHERS = {"llama-3.1-8b": load_preset("llama-3.1-8b"), "mistral-nemo-12b": load_preset("mistral-nemo-12b"),
            "llama-3.1-70b": LLAMA_70B}


def best_of(repeats: int, fn: Callable[[], object]) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def brute_force(config: dict, budget: int, tolerance: float) -> int:
    """Count every product combination's parameters (the cheapest possible naive walk: no other checks)."""
    teacher = _teacher(config)
    values = axis_values(default_space(config), teacher.arch)
    lo, hi = budget_window(budget, tolerance)
    hits = 0
    for shape in itertools.product(*(values[axis] for axis in AXES)):
        params = count_params(ArchConfig(*shape, teacher.arch.head_dim), teacher.inv)
        if shape[3] % shape[4] == 0 and lo <= params <= hi:
            hits += 1
    return hits


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--brute-force-max", type=int, default=1_000_000,
                        help="walk the full product only for spaces up to this many combinations")
    args = parser.parse_args()
    print(f"python {platform.python_version()}, {platform.machine()}, {time.strftime('%Y-%m-%d')}")
    print(f"{'teacher':18} {'params':>15} {'implied':>10} {'outer':>6} {'counted':>8} {'found':>6} "
          f"{'enum_s':>8} {'brute_s':>8} {'ratio':>7}")
    for name, config in TEACHERS.items():
        teacher = _teacher(config)
        space = default_space(config)
        budget = teacher.params // 2
        implied = count_combinations(space, teacher.arch)
        enum_s = best_of(args.repeats, lambda: enumerate_candidates(space, config, budget))
        scan = _scan(space, teacher, budget, space.tolerance)
        brute = ""
        ratio = ""
        if implied <= args.brute_force_max:
            brute_s = best_of(1, lambda: brute_force(config, budget, space.tolerance))
            brute, ratio = f"{brute_s:8.2f}", f"{brute_s / enum_s:6.0f}x"
        print(f"{name:18} {teacher.params:>15,} {implied:>10,} {scan.num_outer:>6,} {scan.num_counted:>8,} "
              f"{len(scan.candidates):>6,} {enum_s:8.3f} {brute:>8} {ratio:>7}")
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "nas_minitron", "candidates", "--teacher", "llama-3.1-8b", "--budget",
                    "0.5x", "--format", "csv"], check=True, capture_output=True)
    print(f"CLI `nas-minitron candidates --teacher llama-3.1-8b --budget 0.5x --format csv`: "
          f"{time.perf_counter() - start:.2f} s wall (process start included)")


if __name__ == "__main__":
    main()
