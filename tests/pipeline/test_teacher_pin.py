"""The teacher is pinned in config.json (a hub id's commit, a local teacher's files) and a resume refuses another."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from cli_helpers import one_error_line, search
from nas_minitron.errors import UserError
from nas_minitron.pipeline.settings import SearchSettings, differences
from nas_minitron.teacher import load_teacher_config, local_teacher_dir, resolve_teacher_dir, teacher_pin

SHA = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def cached_hub_teacher(tiny_teacher_dir: Path, request: pytest.FixtureRequest, tmp_path: Path,
                       monkeypatch: pytest.MonkeyPatch) -> str:
    """A hub id whose `main` the local HF cache holds (the tests run offline), as `snapshot_download` leaves it, in
    a cache of this test's own (huggingface_hub reads `constants.HF_HUB_CACHE` at each call): the user's is never
    written."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    repo = f"nasm-test/{request.node.name[:40]}"
    root = Path(constants.HF_HUB_CACHE) / f"models--{repo.replace('/', '--')}"
    shutil.copytree(tiny_teacher_dir, root / "snapshots" / SHA)
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text(SHA)
    return repo


def test_a_hub_teacher_resolves_to_its_commit_offline(cached_hub_teacher: str) -> None:
    folder = resolve_teacher_dir(cached_hub_teacher)
    assert Path(folder).name == SHA and (Path(folder) / "config.json").is_file()
    assert resolve_teacher_dir(cached_hub_teacher, revision=SHA) == folder
    assert load_teacher_config(cached_hub_teacher, revision="main")["model_type"] == "llama"
    pin = teacher_pin(cached_hub_teacher)
    assert pin["kind"] == "hub" and pin["revision"] == SHA and pin["requested"] == "main"
    assert pin["id"] == f"{cached_hub_teacher}@{SHA}" and "local HF cache" in pin["resolved_by"]
    with pytest.raises(UserError, match=r"revision 'v9' is not available in the local HF cache \(offline\)"):
        resolve_teacher_dir(cached_hub_teacher, revision="v9")


def test_a_node_without_the_drivers_hf_cache_fetches_the_same_commit(cached_hub_teacher: str) -> None:
    elsewhere = f"/no/such/node/hub/models--{cached_hub_teacher.replace('/', '--')}/snapshots/{SHA}"
    assert local_teacher_dir(elsewhere) == resolve_teacher_dir(cached_hub_teacher)
    assert local_teacher_dir("/not/a/snapshot") == "/not/a/snapshot"  # left for the loader to refuse


def test_a_local_teacher_is_pinned_by_its_files(tiny_teacher_dir: Path, tmp_path: Path) -> None:
    copy = Path(shutil.copytree(tiny_teacher_dir, tmp_path / "teacher"))
    pin = teacher_pin(str(copy))
    assert pin["kind"] == "dir" and pin == teacher_pin(str(copy))
    assert pin["id"] == teacher_pin(str(tiny_teacher_dir))["id"]  # the same files elsewhere: the same teacher
    weights = next(copy.glob("*.safetensors"))
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1  # the last byte of the last tensor
    weights.write_bytes(bytes(data))
    assert teacher_pin(str(copy))["id"] != pin["id"]


def test_a_revision_given_later_is_compared_through_the_pin() -> None:
    saved = json.loads(json.dumps(SearchSettings().to_dict()))
    saved.pop("teacher_revision")  # a run directory from before the flag
    assert differences(saved, SearchSettings(teacher_revision=SHA)) == []


def test_resume_refuses_a_teacher_whose_files_changed(tiny_teacher_dir: Path, tmp_path: Path) -> None:
    teacher = Path(shutil.copytree(tiny_teacher_dir, tmp_path / "teacher"))
    run_dir = tmp_path / "run"
    done = search(teacher, run_dir, "--stop-after", "candidates")
    assert done.returncode == 0, done.stderr[-2000:]
    config = json.loads((run_dir / "config.json").read_text())
    assert config["teacher_pin"] == teacher_pin(str(teacher)) and config["teacher_revision"] is None
    before = config["teacher_pin"]["id"]
    (teacher / "config.json").write_text((teacher / "config.json").read_text() + "\n")
    line = one_error_line(search(teacher, run_dir, "--resume", "--dry-run"))
    assert "--resume: the teacher changed since" in line and before in line and teacher_pin(str(teacher))["id"] in line
    # a run directory from before pins existed: nothing to compare, resumable
    config.pop("teacher_pin")
    (run_dir / "config.json").write_text(json.dumps(config))
    resumed = search(teacher, run_dir, "--resume", "--dry-run")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
