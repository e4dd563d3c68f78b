"""Teacher presets: published `config.json` facts of well-known models (no weights), by short name.

They let `nas-minitron candidates` plan a 70B-sized search on a laptop: candidate enumeration needs only the
config. `resolve_teacher_config` also accepts a bare config.json, a model directory or a hub id; those are read by
`nas_minitron.teacher.read_teacher_config`, the one config reader (transformers is imported only then).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from nas_minitron.errors import UserError
from nas_minitron.families import get_family
from nas_minitron.teacher import load_teacher_config, read_teacher_config

__all__ = ["load_preset", "preset_names", "resolve_teacher_config"]

_PRESET_DIR = Path(__file__).parent


def preset_names() -> list[str]:
    """Names of the shipped presets, e.g. `llama-3.1-8b`."""
    return sorted(path.stem for path in _PRESET_DIR.glob("*.json"))


def load_preset(name: str) -> dict[str, Any]:
    """The preset's config dict (Hugging Face field names, as in the model's published config.json)."""
    path = _PRESET_DIR / f"{name.lower()}.json"
    if not path.is_file():
        raise UserError(f"unknown teacher preset {name!r}; presets: {', '.join(preset_names())}.")
    config: dict[str, Any] = json.loads(path.read_text())
    return config


def resolve_teacher_config(
    spec: str, cache_dir: str | os.PathLike[str] | None = None, trust_remote_code: bool = False
) -> dict[str, Any]:
    """A teacher's config as a dict, never loading weights.

    `spec` is a preset name (checked first, so `smollm2-135m` needs no conversion), a config.json file, a model
    directory or a hub id (the last two as `nas_minitron.teacher.load_teacher_config` reads them).
    """
    if spec.lower() in preset_names():
        config = load_preset(spec)
        get_family(str(config.get("model_type")))
        return config
    if spec.endswith(".json") or Path(spec).expanduser().is_file() and not spec.endswith(".gguf"):
        path = Path(spec).expanduser()
        if not path.is_file():
            raise UserError(f"teacher config file {str(path)!r} does not exist.")
        return read_teacher_config(str(path), trust_remote_code, "teacher config file")
    return load_teacher_config(spec, cache_dir, trust_remote_code)
