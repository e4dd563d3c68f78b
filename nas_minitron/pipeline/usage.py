"""What a stage really used, beside what the plan said (`plan.json`): peak resident memory and run-directory bytes.

`StageUsage` samples, on a background thread every `interval` seconds while a stage runs, the resident set size
(RSS) of the driver process and all its descendants (the local Ray cluster the driver started, its trial and Ray
Train workers: the processes the plan's `cpu_ram_bytes` counts), and every `disk_every` samples the bytes under the
run directory (files counted once per inode: a winner hard-linked from its trial adds nothing, as the plan counts
it). The runner records the result in each stage's marker as `measured`; `benchmarks/bench_plan_check.py` sets it
against `plan.json`.

RSS sums count pages shared between processes (the same library, a memory-mapped file) once per process, so the
sum can exceed what the machine lends; sampling can miss a peak shorter than the interval. Processes of a joined
cluster (--ray-address) are not descendants and are not counted.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

__all__ = ["StageUsage", "tree_bytes", "tree_rss"]


def tree_rss(pid: int | None = None) -> int:
    """Resident bytes of process `pid` (default: this one) and all its descendants."""
    import psutil

    root = psutil.Process(pid or os.getpid())
    total = 0
    for proc in [root, *root.children(recursive=True)]:
        try:
            total += proc.memory_info().rss
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue  # ended between the listing and the read
    return total


def tree_bytes(directory: Path) -> int:
    """Bytes of the files under `directory`, each inode once (0 when it does not exist)."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for root, _dirs, files in os.walk(directory):
        for name in files:
            try:
                st = os.lstat(os.path.join(root, name))
            except OSError:
                continue  # removed while walking (a rename into place, a deleted checkpoint)
            if (st.st_dev, st.st_ino) not in seen:
                seen.add((st.st_dev, st.st_ino))
                total += st.st_size
    return total


class StageUsage:
    """`with StageUsage(run_dir) as usage: ...`, then `usage.result()`."""

    def __init__(self, run_dir: Path, interval: float = 0.5, disk_every: int = 4) -> None:
        self.run_dir = run_dir
        self.interval = interval
        self.disk_every = disk_every
        self.peak_rss = 0
        self.base_disk = 0
        self.peak_disk = 0
        self.end_disk = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="stage-usage", daemon=True)

    def __enter__(self) -> StageUsage:
        self.base_disk = self.peak_disk = tree_bytes(self.run_dir)
        self.peak_rss = tree_rss()
        self._thread.start()
        return self

    def _loop(self) -> None:
        count = 0
        while not self._stop.wait(self.interval):
            self.peak_rss = max(self.peak_rss, tree_rss())
            count += 1
            if count % self.disk_every == 0:
                self.peak_disk = max(self.peak_disk, tree_bytes(self.run_dir))

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_rss = max(self.peak_rss, tree_rss())
        self.end_disk = tree_bytes(self.run_dir)
        self.peak_disk = max(self.peak_disk, self.end_disk)

    def result(self) -> dict[str, Any]:
        """{"peak_rss_bytes", "disk_bytes" (added by the stage, at its end), "peak_disk_bytes" (added, at most)}."""
        return {"peak_rss_bytes": self.peak_rss, "disk_bytes": self.end_disk - self.base_disk,
                "peak_disk_bytes": self.peak_disk - self.base_disk, "interval_s": self.interval}
