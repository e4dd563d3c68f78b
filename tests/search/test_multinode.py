"""Multi-node readiness: what reaches the workers (HF variables, the token kept out of Ray's records) and the check
that every node sees the run directory."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

SECRET = "hf_test_secret_12345"


@pytest.fixture
def local_ray(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """`connect_ray`'s own local cluster, started with a fake token and a marked endpoint in the driver's env."""
    from nas_minitron.search.tune import RayOptions, connect_ray

    monkeypatch.setenv("HF_TOKEN", SECRET)
    monkeypatch.setenv("HF_ENDPOINT", "http://hub.invalid:1")  # a plain variable: travels in the runtime_env
    monkeypatch.setenv("HF_HUB_CACHE", "/nowhere/hub-cache")
    import ray

    try:
        connect_ray(RayOptions(num_cpus=1, dashboard=False))
        yield
    finally:
        ray.shutdown()


def test_workers_get_the_token_but_ray_records_never_hold_it(local_ray: None) -> None:
    import ray
    from ray._private.state import state

    def seen_by_a_task() -> dict[str, Any]:  # nested: pickled by value (workers cannot import the tests)
        return {"env": {k: os.environ.get(k) for k in ("HF_TOKEN", "HF_ENDPOINT", "HF_HUB_CACHE")},
                "runtime_env": ray.get_runtime_context().runtime_env}

    seen = ray.get(ray.remote(num_cpus=0)(seen_by_a_task).remote())
    assert seen["env"] == {"HF_TOKEN": SECRET, "HF_ENDPOINT": "http://hub.invalid:1",
                           "HF_HUB_CACHE": "/nowhere/hub-cache"}
    assert SECRET not in repr(seen["runtime_env"])  # what the worker, the state API and the dashboard show

    class Actor:  # Tune trials and Ray Train workers are actors of the job
        def token(self) -> str | None:
            return os.environ.get("HF_TOKEN")

    actor = ray.remote(num_cpus=0)(Actor).remote()
    assert ray.get(actor.token.remote()) == SECRET  # type: ignore[attr-defined]
    # The GCS job table (the dashboard's Jobs page reads it) holds the runtime_env: the endpoint, not the token.
    jobs = b"".join(state._connect_and_get_accessor().get_job_table(
        skip_submission_job_info_field=False, skip_is_running_tasks_field=True))
    assert b"hub.invalid" in jobs and SECRET.encode() not in jobs
    # Nor does any log of this Ray session (runtime-env agent, raylet, workers).
    session = Path(ray._private.worker._global_node.get_session_dir_path())
    leaked = [p for p in session.rglob("*") if p.is_file() and p.stat().st_size < 2**26
              and SECRET.encode() in p.read_bytes()]
    assert not leaked


def test_every_node_must_see_the_run_directory(tmp_path: Path) -> None:
    """Two nodes on this machine: both see the run directory; one told to look elsewhere (a node without the
    shared mount) is named, with the path and the fix; no probe file is left either way."""
    import ray
    from ray.cluster_utils import Cluster

    from nas_minitron.errors import UserError
    from nas_minitron.search.tune import PROBE_DIR, check_run_dir_shared

    loopback: dict[str, Any] = {"node_ip_address": "127.0.0.1", "num_cpus": 1}
    cluster = Cluster(initialize_head=True, head_node_args={**loopback, "include_dashboard": False})
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    try:
        cluster.add_node(**loopback)
        ray.init(address=cluster.address)
        cluster.wait_for_nodes()
        assert check_run_dir_shared(run_dir)[0] == 2
        assert not (run_dir / PROBE_DIR).exists()
        other = next(n["NodeID"] for n in ray.nodes() if n["Alive"] and n["NodeID"] != cluster.head_node.node_id)
        elsewhere = tmp_path / "node-local-disk"
        elsewhere.mkdir()
        with pytest.raises(UserError) as refused:
            check_run_dir_shared(run_dir, task_dirs={other: str(elsewhere)})
        message = str(refused.value)
        assert f"Ray node {other[:12]} (127.0.0.1) does not see the run directory {str(run_dir.resolve())!r}" \
            in message and "cannot read the driver's probe file" in message
        assert "shared filesystem" in message and "same path on every node" in message
        assert not (run_dir / PROBE_DIR).exists() and not any(elsewhere.iterdir())
    finally:
        ray.shutdown()
        cluster.shutdown()
