"""Atomic training checkpoints: `<checkpoint_dir>/step-00000012/`, the newest `keep_last_k` kept.

Each holds the student as a Hugging Face safetensors directory (`student/`), the objective's projection
(`objective.safetensors`), optimizer + scheduler + torch RNG state (`trainer.pt`, torch.save of plain state dicts,
loaded with weights_only=True) and `state.json`: step, data position, curve so far, python/numpy RNG, config
fingerprint, student arch, and the size and sha256 of every other file (`nas_minitron.integrity.file_entry`, read back
once written), all checked on every load, so that a truncated or altered checkpoint is refused naming the file: a
load is a resume (after a crash, or a rung of the search), rare next to the training it saves, and reads every file
anyway (benchmarks/bench_integrity.py measures what the hashing adds).

An FSDP-sharded student is saved whole: its weights and optimizer state are gathered to rank 0 first (the optimizer
state then keyed by parameter name, not position), so that `student/` loads with stock `from_pretrained`.
"""

from __future__ import annotations

import json
import pickle
import random
import re
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nas_minitron._lazy import lazy_import
from nas_minitron.artifacts import artifact_error, read_safetensors, reading
from nas_minitron.atomic import atomic_directory
from nas_minitron.distill.fsdp import is_sharded, load_full_optimizer, load_full_student
from nas_minitron.errors import UserError
from nas_minitron.families import describe_model
from nas_minitron.integrity import check_file, file_entry

if TYPE_CHECKING:
    import numpy as np
    import safetensors.torch as st
    import torch
    from transformers import PreTrainedModel
else:
    np = lazy_import("numpy")
    st = lazy_import("safetensors.torch")
    torch = lazy_import("torch")

__all__ = ["latest_checkpoint", "load_checkpoint", "save_checkpoint", "student_identity"]

FORMAT_VERSION = 1
STATE_FILE = "state.json"
_FIX = "the checkpoint is incomplete or truncated: drop --resume, or use another --checkpoint-dir"
_STEP_DIR = re.compile(r"^step-(\d+)$")


def student_identity(student: PreTrainedModel) -> str:
    """model_type + arch name, e.g. `llama:L20-H576-I1536-A9-KV3`: what a checkpoint must belong to."""
    _family, arch = describe_model(student)
    return f"{student.config.model_type}:{arch.name}"


def _rng_state() -> tuple[dict[str, Any], dict[str, Any]]:
    """(torch states for trainer.pt, python + numpy states for JSON)."""
    torch_state: dict[str, Any] = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        torch_state["cuda"] = torch.cuda.get_rng_state_all()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss = random.getstate()
    json_state = {
        "python": [version, list(internal), gauss],
        "numpy": [kind, [int(k) for k in keys], pos, has_gauss, cached],
    }
    return torch_state, json_state


def _set_rng_state(torch_state: dict[str, Any], json_state: dict[str, Any]) -> None:
    torch.set_rng_state(torch_state["cpu"])
    if "cuda" in torch_state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(torch_state["cuda"])
    version, internal, gauss = json_state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = json_state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))


def save_checkpoint(
    checkpoint_dir: Path,
    step: int,
    student: PreTrainedModel,
    objective: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    state: dict[str, Any],
    keep_last_k: int,
    *,
    student_state: dict[str, torch.Tensor] | None = None,
    optimizer_state: dict[str, Any] | None = None,
) -> Path:
    """Write one checkpoint atomically, then delete all but the newest `keep_last_k`.

    An FSDP-sharded student passes its gathered full states (`nas_minitron.distill.fsdp`): `student_state` is saved
    instead of the live (sharded) weights, `optimizer_state` (keyed by FQN) instead of `optimizer.state_dict()`.
    """
    final = Path(checkpoint_dir) / f"step-{step:08d}"
    torch_rng, json_rng = _rng_state()
    with atomic_directory(final, overwrite=True) as tmp:
        student.save_pretrained(tmp / "student", state_dict=student_state)
        tensors = {k: v.detach().contiguous().cpu() for k, v in objective.state_dict().items()}
        st.save_file(tensors, tmp / "objective.safetensors")
        torch.save(
            {"optimizer": optimizer.state_dict() if optimizer_state is None else optimizer_state,
             "scheduler": scheduler.state_dict(), "rng": torch_rng},
            tmp / "trainer.pt",
        )
        files = {str(p.relative_to(tmp)): file_entry(p) for p in sorted(tmp.rglob("*")) if p.is_file()}
        record = {"format_version": FORMAT_VERSION, **state, "rng": json_rng, "files": files}
        (tmp / STATE_FILE).write_text(json.dumps(record, indent=1) + "\n")  # last: its presence marks completion
    for old in _step_dirs(Path(checkpoint_dir))[:-keep_last_k]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _step_dirs(checkpoint_dir: Path) -> list[Path]:
    if not checkpoint_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in checkpoint_dir.iterdir() if (m := _STEP_DIR.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def latest_checkpoint(checkpoint_dir: Path | None) -> Path | None:
    """The newest `step-*` directory, or None."""
    dirs = _step_dirs(Path(checkpoint_dir)) if checkpoint_dir is not None else []
    return dirs[-1] if dirs else None


def _read_verified(path: Path) -> dict[str, Any]:
    """state.json after checking every listed file's size and sha256; UserError on anything missing or altered."""
    with reading(path / STATE_FILE, "checkpoint state", _FIX):
        state = json.loads((path / STATE_FILE).read_text())
    if not isinstance(state, dict):
        raise artifact_error(path / STATE_FILE, "checkpoint state", "not a JSON object", _FIX)
    if state.get("format_version") != FORMAT_VERSION:
        raise UserError(f"checkpoint {str(path)!r} has format_version {state.get('format_version')!r}, "
                        f"expected {FORMAT_VERSION}.")
    with reading(path / STATE_FILE, "checkpoint state", _FIX, extra=(TypeError, AttributeError)):
        # each entry: {"size", "sha256"}; a bare sha256 string in checkpoints written before sizes were recorded
        files = {name: entry if isinstance(entry, dict) else {"sha256": str(entry)}
                 for name, entry in state.get("files", {}).items()}
    for name, entry in files.items():
        check_file(path / name, entry, "checkpoint file", _FIX, full=True)
    return state


def load_checkpoint(
    path: Path,
    student: PreTrainedModel,
    objective: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    fingerprint: str,
) -> dict[str, Any]:
    """Restore everything in place and return the state record; refuse another student or other settings."""
    state = _read_verified(path)
    identity = student_identity(student)
    if state.get("student") != identity:
        raise UserError(f"checkpoint {str(path)!r} belongs to student {state.get('student')!r}, "
                        f"not to {identity!r}; use another --checkpoint-dir or drop --resume.")
    if state.get("config_fingerprint") != fingerprint:
        raise UserError(f"checkpoint {str(path)!r} was written with other distillation settings "
                        f"({state.get('config')}); resume with the same settings.")
    weights: dict[str, torch.Tensor] = {}
    for file in sorted((path / "student").glob("*.safetensors")):
        weights.update(read_safetensors(file, "checkpoint weights", hint=_FIX))
    with reading(path / "trainer.pt", "checkpoint trainer state", _FIX, extra=(RuntimeError, pickle.UnpicklingError)):
        trainer = torch.load(path / "trainer.pt", weights_only=True)
    # An FSDP run writes the full optimizer state keyed by parameter name, any other run keyed by position.
    by_name = any(isinstance(i, str) for group in trainer["optimizer"]["param_groups"] for i in group["params"])
    if is_sharded(student) and not by_name:
        raise UserError(f"checkpoint {str(path)!r} was written by a single-process or DDP run; resume it with "
                        f"strategy 'ddp' or in one process, not with FSDP.")
    if by_name:  # shards full states into an FSDP student, and fills a plain one too
        missing, unexpected = load_full_student(student, weights)
    else:
        missing, unexpected = student.load_state_dict(weights, strict=False)
    tied = {k for k in missing if k.endswith("lm_head.weight") and student.config.tie_word_embeddings}
    if unexpected or set(missing) - tied:
        raise UserError(f"checkpoint {str(path)!r} does not fit this student: missing {sorted(set(missing) - tied)}, "
                        f"unexpected {sorted(unexpected)}.")
    objective.load_state_dict(read_safetensors(path / "objective.safetensors", "checkpoint objective", hint=_FIX))
    if by_name:
        load_full_optimizer(student, objective, optimizer, trainer["optimizer"])
    else:
        optimizer.load_state_dict(trainer["optimizer"])
    scheduler.load_state_dict(trainer["scheduler"])
    _set_rng_state(trainer["rng"], state["rng"])
    return state
