"""Dynamic Memory Compression (DMC, arXiv 2403.09636): a model learns, per KV head and token, to append its key and
value to the cache or merge them into the last entry; retrofitted in a short continued training, served with a
compressed cache.

- `settings`: `DMCSettings` (window, offsets, temperature) and `DMCRecord`, the `dmc.json` next to a model (stdlib).
- `support`: `check_supported_config`, which models DMC supports, from the config alone (light).
- `schedule`: `RetrofitConfig`, the three stages, the fade-out multiplier and the target-CR ramp (stdlib).
- `attention`: `DMCAttention`, the drop-in `self_attn` (relaxed training path, hard inference path), `apply_dmc`.
- `cache`: `DMCCache`, the compressed transformers `Cache` (padded per head + lengths), `cache_stats`.
- `train`: `retrofit()`, the loop (KD or LM loss + compression penalty, checkpoints, exact resume).
- `export`: `save_dmc_model` / `load_dmc_model` (a stock directory + `dmc.json`).

May import: leaf modules, `families`, `distill.losses`, `distill.checkpoint`. `attention` and `cache` subclass torch
and transformers classes, so they import those at module top; everything else reaches them (and torch) lazily,
and so does this `__init__`: importing the package loads neither.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from nas_minitron.dmc.export import load_dmc_model, save_dmc_model
from nas_minitron.dmc.schedule import RetrofitConfig
from nas_minitron.dmc.settings import DMC_FILE, DMCRecord, DMCSettings
from nas_minitron.dmc.support import check_supported_config
from nas_minitron.dmc.train import RetrofitResult, compression_penalty, retrofit

if TYPE_CHECKING:
    from nas_minitron.dmc.attention import DMCAttention, apply_dmc
    from nas_minitron.dmc.cache import DMCCache, cache_stats

__all__ = [
    "DMC_FILE",
    "DMCAttention",
    "DMCCache",
    "DMCRecord",
    "DMCSettings",
    "RetrofitConfig",
    "RetrofitResult",
    "apply_dmc",
    "cache_stats",
    "check_supported_config",
    "compression_penalty",
    "load_dmc_model",
    "retrofit",
    "save_dmc_model",
]

_HEAVY = {"DMCAttention": "attention", "apply_dmc": "attention", "DMCCache": "cache", "cache_stats": "cache"}


def __getattr__(name: str) -> Any:
    """The torch-importing names, imported on first use (PEP 562)."""
    if name in _HEAVY:
        return getattr(importlib.import_module(f"nas_minitron.dmc.{_HEAVY[name]}"), name)
    raise AttributeError(f"module 'nas_minitron.dmc' has no attribute {name!r}")
