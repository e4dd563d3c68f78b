from __future__ import annotations

import os
from pathlib import Path

import pytest

# Offline and hermetic: nothing reaches a hub, and caches go to a temporary directory, not ~/.cache.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # Ray binds to loopback only (read at import)


@pytest.fixture(autouse=True, scope="session")
def _hf_home(tmp_path_factory: pytest.TempPathFactory) -> None:
    os.environ["HF_HOME"] = str(tmp_path_factory.mktemp("hf_home"))


@pytest.fixture(scope="session")
def tiny_teacher_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One saved tiny teacher (with tokenizer) per supported family."""
    from tiny_models import FAMILIES, save_tiny_teacher

    root = tmp_path_factory.mktemp("teachers")
    return {family: save_tiny_teacher(root / family, family) for family in FAMILIES}


@pytest.fixture(scope="session")
def tiny_teacher_dir(tiny_teacher_dirs: dict[str, Path]) -> Path:
    return tiny_teacher_dirs["llama"]


@pytest.fixture
def one_torch_thread():  # type: ignore[no-untyped-def]
    """One torch thread: on a shared 2-core box, 2 threads per process ran tiny training steps up to 40x slower."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
