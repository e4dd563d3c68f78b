"""`ImportanceScores`: one score per prunable unit, higher = more important, from any criterion.

Activation importance (importance.py), weight magnitude and seeded random (baselines.py) all produce this record,
so one selection routine (keep.py) turns any of them into keep indices. Saved as safetensors + JSON, never pickle,
with their sha256 (`nas_minitron.integrity`, checked in full on every load: the files are small); read back through
`nas_minitron.artifacts`, so a damaged or altered file or a score holding NaN/Inf is refused naming the file.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nas_minitron._lazy import lazy_import
from nas_minitron.artifacts import artifact_error, read_safetensors, reading
from nas_minitron.errors import UserError
from nas_minitron.integrity import verify_checksums, write_checksums

if TYPE_CHECKING:
    import safetensors.torch as st
    import torch
else:
    st = lazy_import("safetensors.torch")

__all__ = ["FORMAT_VERSION", "ImportanceScores"]

FORMAT_VERSION = 1
_TENSORS_FILE = "scores.safetensors"
_META_FILE = "scores.json"
_REQUIRED = ("heads", "neurons", "channels")
_RECOMPUTE = "recompute them with `nas-minitron importance --overwrite`"


@dataclass(frozen=True)
class ImportanceScores:
    """Per-unit scores of a teacher (higher = keep first).

    heads:    [num_layers, num_attention_heads]
    neurons:  [num_layers, intermediate_size]
    channels: [hidden_size]
    layers:   {method: [num_layers]}, e.g. "block_importance", "loss_drop" (higher = more important)
    windows:  {k: [num_layers - k + 1]} LM loss with layers i..i+k-1 removed (lower = safer to remove)
    meta:     criterion, teacher, data, aggregations, token count, format version
    """

    heads: torch.Tensor
    neurons: torch.Tensor
    channels: torch.Tensor
    layers: dict[str, torch.Tensor] = field(default_factory=dict)
    windows: dict[int, torch.Tensor] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def criterion(self) -> str:
        return str(self.meta.get("criterion", "unknown"))

    def save(self, directory: str | os.PathLike[str]) -> None:
        """Write `scores.safetensors`, `scores.json` and their checksums into an existing directory."""
        out = Path(directory)
        tensors = {"heads": self.heads, "neurons": self.neurons, "channels": self.channels}
        tensors.update({f"layers.{name}": value for name, value in self.layers.items()})
        tensors.update({f"windows.{k}": value for k, value in self.windows.items()})
        st.save_file({k: v.detach().float().contiguous().cpu() for k, v in tensors.items()}, str(out / _TENSORS_FILE))
        meta = dict(self.meta, format_version=FORMAT_VERSION)
        (out / _META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        write_checksums(out, [_TENSORS_FILE, _META_FILE])

    @classmethod
    def load(cls, directory: str | os.PathLike[str]) -> ImportanceScores:
        src = Path(directory)
        if not (src / _TENSORS_FILE).is_file() or not (src / _META_FILE).is_file():
            raise UserError(
                f"{str(src)!r} is not an importance directory: expected {_TENSORS_FILE} and {_META_FILE} "
                f"(written by `nas-minitron importance`)."
            )
        with reading(src / _META_FILE, "importance record", _RECOMPUTE):
            meta = json.loads((src / _META_FILE).read_text())
        if not isinstance(meta, dict):
            raise artifact_error(src / _META_FILE, "importance record", "not a JSON object", _RECOMPUTE)
        if meta.get("format_version") != FORMAT_VERSION:
            raise UserError(
                f"importance directory {str(src)!r} has format_version={meta.get('format_version')!r}; "
                f"this nas-minitron reads format_version={FORMAT_VERSION}. Recompute it."
            )
        tensors = read_safetensors(src / _TENSORS_FILE, "importance scores", hint=_RECOMPUTE, require=_REQUIRED,
                                   finite=True)
        # Last, so that a file that cannot be read at all is refused with the reason why; this catches the rest (a
        # flipped bit in a score that leaves it finite, an edited record).
        verify_checksums(src, "importance scores", _RECOMPUTE, full=True, names=[_TENSORS_FILE, _META_FILE])
        layers = {k.split(".", 1)[1]: v for k, v in tensors.items() if k.startswith("layers.")}
        windows = {int(k.split(".", 1)[1]): v for k, v in tensors.items() if k.startswith("windows.")}
        return cls(tensors["heads"], tensors["neurons"], tensors["channels"], layers, windows, meta)
