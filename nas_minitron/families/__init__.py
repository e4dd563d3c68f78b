"""Model families: the only package that knows where a family keeps its weights.

Supported: Llama, Mistral, Qwen2 (q/k/v biases), Qwen3 (per-head q/k RMSNorm). All share the Llama layout;
they differ in biases, norms and which shapes transformers' config validation accepts.

`describe(config)` / `describe_model(model)` are the one way to read a teacher's (family, ArchConfig).
Imports only the leaf modules `arch` and `errors`, never torch or transformers: candidate enumeration for a
70B-sized preset runs on config dicts alone.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from nas_minitron.arch import ArchConfig, Invariants
from nas_minitron.errors import UserError
from nas_minitron.families._decoder import DecoderFamily, LayerParts

if TYPE_CHECKING:
    from transformers import PreTrainedModel

__all__ = ["SUPPORTED_MODEL_TYPES", "DecoderFamily", "LayerParts", "describe", "describe_model", "get_family"]


def _tied(config: Mapping[str, Any]) -> bool:
    return bool(config.get("tie_word_embeddings", False))


def _llama(config: Mapping[str, Any]) -> Invariants:
    attention_bias = bool(config.get("attention_bias", False))
    return Invariants(
        vocab_size=int(config["vocab_size"]),
        tie_word_embeddings=_tied(config),
        qkv_bias=attention_bias,
        o_bias=attention_bias,
        mlp_bias=bool(config.get("mlp_bias", False)),
    )


def _mistral(config: Mapping[str, Any]) -> Invariants:
    return Invariants(vocab_size=int(config["vocab_size"]), tie_word_embeddings=_tied(config))


def _qwen2(config: Mapping[str, Any]) -> Invariants:
    # Qwen2Attention hard-codes bias=True on q/k/v and bias=False on o_proj.
    return Invariants(vocab_size=int(config["vocab_size"]), tie_word_embeddings=_tied(config), qkv_bias=True)


def _qwen3(config: Mapping[str, Any]) -> Invariants:
    attention_bias = bool(config.get("attention_bias", False))
    return Invariants(
        vocab_size=int(config["vocab_size"]),
        tie_word_embeddings=_tied(config),
        qkv_bias=attention_bias,
        o_bias=attention_bias,
        qk_norm=True,
    )


_FAMILIES: dict[str, DecoderFamily] = {
    family.model_type: family
    for family in (
        DecoderFamily("llama", _llama, hidden_divisible_by_heads=True),
        DecoderFamily("mistral", _mistral),
        DecoderFamily("qwen2", _qwen2),
        DecoderFamily("qwen3", _qwen3, has_qk_norm=True),
    )
}

SUPPORTED_MODEL_TYPES: tuple[str, ...] = tuple(_FAMILIES)


def get_family(model_type: str) -> DecoderFamily:
    """The adapter for a config's `model_type`; a UserError listing the supported ones otherwise."""
    try:
        return _FAMILIES[model_type]
    except KeyError:
        raise UserError(
            f"model_type {model_type!r} is not supported; supported model types: {', '.join(SUPPORTED_MODEL_TYPES)}."
        ) from None


def describe(config: Mapping[str, Any]) -> tuple[DecoderFamily, ArchConfig]:
    """The family of a config dict (`config.to_dict()` or a preset) and its prunable shape.

    A missing or unsupported `model_type` is a UserError listing the supported ones.
    """
    family = get_family(str(config.get("model_type")))
    return family, family.arch_from_config(config)


def describe_model(model: PreTrainedModel) -> tuple[DecoderFamily, ArchConfig]:
    """`describe` of a live model's config."""
    return describe(model.config.to_dict())
