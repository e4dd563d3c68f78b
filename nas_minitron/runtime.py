"""Where tensors run: device resolution and bf16 autocast, one implementation each.

Every command and stage that takes `--device` resolves it here; every forward that may run in bf16 enters
`bf16_autocast` (trainer, teacher-logit cache, importance and LM-loss passes).
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING

from nas_minitron._lazy import lazy_import
from nas_minitron.errors import UserError

if TYPE_CHECKING:
    import torch
else:
    torch = lazy_import("torch")

__all__ = ["bf16_autocast", "resolve_device"]


def resolve_device(name: str, flag: str = "--device") -> str:
    """`auto` → `cuda` when CUDA is available, else `cpu`; a CUDA device without CUDA is a UserError."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"{flag} {name!r} but no CUDA device is available here; valid: cpu, auto.")
    return name


def bf16_autocast(device: str | torch.device, enabled: bool = True) -> contextlib.AbstractContextManager[object]:
    """bf16 autocast on `device`'s type when `enabled`, else a no-op (the weights' own dtype)."""
    device_type = device if isinstance(device, str) else device.type
    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device_type.split(":")[0], dtype=torch.bfloat16)
