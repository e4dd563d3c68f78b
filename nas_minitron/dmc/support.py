"""Which models DMC attention supports, decided from a model's config alone (light: no torch, no weights).

Used by `attention.check_supported` on a loaded model and by `nas-minitron search --dmc-cr` in pre-flight, on the
teacher's config.json, before any work (a pruned student keeps the teacher's family, head_dim and attention kind).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from nas_minitron.dmc.settings import MIN_HEAD_DIM
from nas_minitron.errors import UserError
from nas_minitron.families import SUPPORTED_MODEL_TYPES

__all__ = ["check_supported_config"]


def check_supported_config(config: Mapping[str, Any]) -> None:
    """UserError unless the config (a config.json mapping) is a supported family with head_dim >= MIN_HEAD_DIM and
    full attention in every layer."""
    model_type = config.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise UserError(f"model_type {model_type!r} has no DMC support; supported: "
                        f"{', '.join(SUPPORTED_MODEL_TYPES)}.")
    head_dim = config.get("head_dim") or int(config["hidden_size"]) // int(config["num_attention_heads"])
    if head_dim < MIN_HEAD_DIM:
        raise UserError(f"head_dim {head_dim} is too small for DMC: it gives up one channel per head to the "
                        f"decision and needs head_dim >= {MIN_HEAD_DIM}.")
    layer_types = config.get("layer_types") or []
    window = config.get("sliding_window")
    max_positions = config.get("max_position_embeddings")
    sliding = any(t != "full_attention" for t in layer_types) or (
        model_type == "mistral" and window is not None and (max_positions is None or window < max_positions))
    if sliding:
        raise UserError("sliding-window attention is not supported by DMC attention; use a model with full "
                        "attention in every layer (sliding_window null, or >= max_position_embeddings).")
