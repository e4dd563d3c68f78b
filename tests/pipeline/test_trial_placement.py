"""A trial placed on a GPU it cannot use stops the whole search with one line (exit 2), on a real Ray cluster.

The cluster *declares* a GPU (`ray start --num-gpus 1`) on this CUDA-less machine: pre-flight passes, Ray reserves
the GPU for the trial and sets CUDA_VISIBLE_DEVICES, and the trial itself must refuse instead of training on the
CPU for months.
"""

from __future__ import annotations

import csv
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from cli_helpers import search

# Loopback only, no usage stats, no token (the CLI joining it runs with the same environment).
RAY_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled"}


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture
def gpu_declaring_cluster() -> Iterator[str]:
    """A one-node Ray cluster on loopback that claims 1 GPU; yields its address. Stopped by its process group (never
    `ray stop`, which would stop every Ray cluster of this user)."""
    port = _free_port()
    ray_bin = Path(sys.executable).with_name("ray")
    temp_dir = tempfile.mkdtemp(prefix="nasm-g-")  # short: unix socket path limit
    head = subprocess.Popen(
        [str(ray_bin), "start", "--head", "--block", f"--port={port}", "--num-gpus=1", "--num-cpus=2",
         "--node-ip-address=127.0.0.1", "--include-dashboard=false", f"--temp-dir={temp_dir}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        env={**os.environ, **RAY_ENV})
    try:
        deadline = time.monotonic() + 300  # a generous cap for a loaded machine; it is up in seconds when idle
        while time.monotonic() < deadline and head.poll() is None:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.5)
        assert head.poll() is None, "ray start exited"
        yield f"127.0.0.1:{port}"
    finally:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(head.pid, sig)
            except ProcessLookupError:
                break
            try:
                head.wait(timeout=10)
                break
            except subprocess.TimeoutExpired:
                continue


@pytest.mark.slow
@pytest.mark.ci  # the only test of a trial that reserved a GPU (issue #12)
@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_a_trial_on_a_gpu_it_cannot_see_stops_the_search_in_one_line(
    tiny_teacher_dir: Path, tmp_path: Path, gpu_declaring_cluster: str
) -> None:
    run_dir = tmp_path / "run"
    result = search(tiny_teacher_dir, run_dir, "--ray-address", gpu_declaring_cluster, "--gpus-per-trial", "1",
                    "--max-concurrent", "1", env=RAY_ENV)
    # The refusal comes after the stages before the trials (whose progress goes to stderr): one error line, last.
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and result.stderr.strip().splitlines()[-1] == errors[0], result.stderr[-3000:]
    line = errors[0]
    assert line.startswith("nas-minitron search: error: ")
    assert "reserved --gpus-per-trial 1" in line and "sees no CUDA device" in line, line
    assert "no search trial finished" not in result.stderr
    with (run_dir / "trials.csv").open() as handle:
        trials = list(csv.DictReader(handle))
    assert trials and all(t["status"] == "FAILED" for t in trials)
    assert "sees no CUDA device" in trials[0]["error"] and trials[0]["log"] == f"logs/trials/{trials[0]['name']}.log"
    assert "trial refused" in (run_dir / trials[0]["log"]).read_text()
    assert f"log: {run_dir.resolve() / trials[0]['log']}" in result.stdout  # named in the console as it started
    assert not (run_dir / "stages" / "trials.json").exists()
    # a --resume after the fix asks the refused candidate again (its Optuna trial is marked `fatal`), counting none
    from nas_minitron.search.tune import reopen_unfinished, study_storage_url

    finished, again = reopen_unfinished(study_storage_url(run_dir, None), pruned_is_final=False) or (-1, -1)
    assert finished == 0 and again >= 1, (finished, again)
