"""A Llama-style decoder family: where its weights live and which of its shapes stock transformers accepts.

Config-side methods take plain dicts (`config.to_dict()` or a preset), so candidate enumeration needs neither
torch nor weights. Module-side methods take a live model and never import torch themselves.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from nas_minitron.arch import ArchConfig, Invariants, nearest_loadable_hidden_sizes

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel

__all__ = ["DecoderFamily", "LayerParts"]

# Config keys that describe the teacher's storage, not its architecture: never copied into a student config.
_DROPPED_KEYS = ("quantization_config", "transformers_version", "_name_or_path", "_commit_hash")


@dataclass
class LayerParts:
    """The live modules of one decoder layer (a view into the model, not a record).

    Typed `Any`: projections are `nn.Linear`s and norms the family's own RMSNorm class, but torch declares neither
    `Linear.bias` nor a norm's `weight`, so `nn.Module` types would only turn every use into `Tensor | Module`.
    """

    q_proj: Any
    k_proj: Any
    v_proj: Any
    o_proj: Any
    gate_proj: Any
    up_proj: Any
    down_proj: Any
    input_layernorm: Any
    post_attention_layernorm: Any
    q_norm: Any | None = None  # Qwen3: RMSNorm over head_dim, shared by all heads
    k_norm: Any | None = None


@dataclass(frozen=True)
class DecoderFamily:
    """One model family of the Llama layout (model.model.layers[i].self_attn / .mlp)."""

    model_type: str
    invariants_from: Callable[[Mapping[str, Any]], Invariants]
    # transformers' config validation: LlamaConfig refuses hidden_size % num_attention_heads != 0 even with an
    # explicit head_dim; the other families accept any hidden size (checked by tests/families/test_loadability.py).
    hidden_divisible_by_heads: bool = False
    has_qk_norm: bool = False

    # ---- config side (dicts) -------------------------------------------------------------------------------
    def arch_from_config(self, config: Mapping[str, Any]) -> ArchConfig:
        heads = int(config["num_attention_heads"])
        head_dim = config.get("head_dim") or int(config["hidden_size"]) // heads
        return ArchConfig(
            num_hidden_layers=int(config["num_hidden_layers"]),
            hidden_size=int(config["hidden_size"]),
            intermediate_size=int(config["intermediate_size"]),
            num_attention_heads=heads,
            num_key_value_heads=int(config.get("num_key_value_heads") or heads),
            head_dim=int(head_dim),
        )

    def invariants_from_config(self, config: Mapping[str, Any]) -> Invariants:
        return self.invariants_from(config)

    def loadable_problem(self, arch: ArchConfig) -> str | None:
        """Why stock transformers would refuse a config of this shape, or None when it loads."""
        if self.hidden_divisible_by_heads and arch.hidden_size % arch.num_attention_heads:
            below, above = nearest_loadable_hidden_sizes(arch.hidden_size, arch.num_attention_heads)
            nearest = " or ".join(f"H{v}" for v in (below, above) if v > 0)
            return (
                f"transformers refuses {self.model_type} configs whose hidden_size is not a multiple of "
                f"num_attention_heads, but {arch.name} has H{arch.hidden_size} with A{arch.num_attention_heads}; "
                f"nearest loadable hidden sizes: {nearest}"
            )
        return None

    def student_config_dict(
        self, teacher_config: Mapping[str, Any], arch: ArchConfig, kept_layers: Sequence[int]
    ) -> dict[str, Any]:
        """The student's full config, built from the teacher's and the ArchConfig (never patched afterwards)."""
        if len(kept_layers) != arch.num_hidden_layers:
            raise ValueError(f"{len(kept_layers)} kept layers for {arch.name}")
        config = {k: v for k, v in teacher_config.items() if k not in _DROPPED_KEYS}
        config.update(arch.to_dict())
        layer_types = teacher_config.get("layer_types")
        if layer_types is not None:
            config["layer_types"] = [layer_types[i] for i in kept_layers]
        if "max_window_layers" in config:
            # Qwen2/3 derive layer_types from this when absent; clamp so it stays a valid layer count.
            config["max_window_layers"] = min(int(config["max_window_layers"]), arch.num_hidden_layers)
        return config

    # ---- module side (live models) ---------------------------------------------------------------------------
    def decoder_layers(self, model: PreTrainedModel) -> torch.nn.ModuleList:
        layers: torch.nn.ModuleList = model.model.layers
        return layers

    def embed_tokens(self, model: PreTrainedModel) -> torch.nn.Embedding:
        embed: torch.nn.Embedding = model.model.embed_tokens
        return embed

    def final_norm(self, model: PreTrainedModel) -> Any:  # the family's RMSNorm (see LayerParts)
        return model.model.norm

    def lm_head(self, model: PreTrainedModel) -> Any:  # an nn.Linear (see LayerParts)
        return model.lm_head

    def layer_parts(self, layer: Any) -> LayerParts:
        attn, mlp = layer.self_attn, layer.mlp
        return LayerParts(
            q_proj=attn.q_proj,
            k_proj=attn.k_proj,
            v_proj=attn.v_proj,
            o_proj=attn.o_proj,
            gate_proj=mlp.gate_proj,
            up_proj=mlp.up_proj,
            down_proj=mlp.down_proj,
            input_layernorm=layer.input_layernorm,
            post_attention_layernorm=layer.post_attention_layernorm,
            q_norm=getattr(attn, "q_norm", None) if self.has_qk_norm else None,
            k_norm=getattr(attn, "k_norm", None) if self.has_qk_norm else None,
        )

    def all_layer_parts(self, model: PreTrainedModel) -> list[LayerParts]:
        return [self.layer_parts(layer) for layer in self.decoder_layers(model)]
