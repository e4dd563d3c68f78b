"""The measured side of the resource plan (`pipeline/usage.py`): peak RSS over the driver's process tree, and the
run-directory bytes a stage adds (at its end and at its peak), each inode once."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from nas_minitron.pipeline.usage import StageUsage, tree_bytes, tree_rss


def _wait_for(condition, limit_s: float = 60.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + limit_s
    while not condition():
        assert time.monotonic() < deadline, "the sampler never saw it"
        time.sleep(0.05)


def test_hard_links_count_once(tmp_path: Path) -> None:
    (tmp_path / "a").write_bytes(b"x" * 1000)
    os.link(tmp_path / "a", tmp_path / "b")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "c").write_bytes(b"y" * 24)
    assert tree_bytes(tmp_path) == 1024 and tree_bytes(tmp_path / "missing") == 0


def test_a_childs_memory_and_a_deleted_files_bytes_are_seen(tmp_path: Path) -> None:
    size = 300 * 2**20
    before = tree_rss()
    with StageUsage(tmp_path, interval=0.05, disk_every=1) as usage:
        child = subprocess.Popen([sys.executable, "-c", f"x = bytearray({size}); import time; time.sleep(600)"])
        try:
            _wait_for(lambda: usage.peak_rss >= before + size * 0.9)
        finally:
            child.kill()
            child.wait()
        (tmp_path / "checkpoint").write_bytes(b"z" * 2**20)  # a trial's checkpoint, deleted when it ends
        _wait_for(lambda: usage.peak_disk >= usage.base_disk + 2**20)
        (tmp_path / "checkpoint").unlink()
        (tmp_path / "result").write_bytes(b"r" * 4096)
    result = usage.result()
    assert result["peak_rss_bytes"] >= before + size * 0.9
    assert result["disk_bytes"] == 4096 and result["peak_disk_bytes"] >= 2**20
