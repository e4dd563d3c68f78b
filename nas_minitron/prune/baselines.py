"""Baseline criteria that activation importance must beat: weight magnitude and seeded random.

Magnitude scores a unit by the L2 norm of every weight that exists only because of that unit (the slices removed
with it), so "magnitude" means the same thing on every axis. Both return an `ImportanceScores` record.
"""

from __future__ import annotations

import functools
import operator
from collections.abc import Iterator
from typing import TYPE_CHECKING

from nas_minitron._lazy import lazy_import
from nas_minitron.arch import ArchConfig
from nas_minitron.families import LayerParts, describe_model
from nas_minitron.prune.scores import ImportanceScores

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel
else:
    torch = lazy_import("torch")

__all__ = ["CRITERIA", "magnitude_scores", "random_scores"]

CRITERIA = ("magnitude", "random")


def _sq(weight: torch.Tensor, dim: int | tuple[int, ...]) -> torch.Tensor:
    """Sum of squares along `dim`, in float32."""
    return weight.detach().float().pow(2).sum(dim=dim)


def magnitude_scores(model: PreTrainedModel) -> ImportanceScores:
    family, arch = describe_model(model)
    d = arch.head_dim
    heads, neurons, layer_norms = [], [], []
    channels = _sq(family.embed_tokens(model).weight, 0) + family.final_norm(model).weight.detach().float() ** 2
    if not model.config.tie_word_embeddings:
        channels += _sq(family.lm_head(model).weight, 0)
    for parts in family.all_layer_parts(model):
        # head h owns q rows h*d:(h+1)*d and o_proj columns h*d:(h+1)*d
        q = _sq(parts.q_proj.weight, 1).reshape(arch.num_attention_heads, d).sum(1)
        o = _sq(parts.o_proj.weight, 0).reshape(arch.num_attention_heads, d).sum(1)
        heads.append((q + o).sqrt())
        mlp = _sq(parts.gate_proj.weight, 1) + _sq(parts.up_proj.weight, 1) + _sq(parts.down_proj.weight, 0)
        neurons.append(mlp.sqrt())
        for linear in (parts.q_proj, parts.k_proj, parts.v_proj, parts.gate_proj, parts.up_proj):
            channels += _sq(linear.weight, 0)
        for linear in (parts.o_proj, parts.down_proj):
            channels += _sq(linear.weight, 1)
        for norm in (parts.input_layernorm, parts.post_attention_layernorm):
            channels += norm.weight.detach().float() ** 2
        squares = (_sq(p, tuple(range(p.dim()))) for p in _layer_params(parts))
        layer_norms.append(functools.reduce(operator.add, squares))  # = sum(), without its 0 start
    return ImportanceScores(
        heads=torch.stack(heads),
        neurons=torch.stack(neurons),
        channels=channels.sqrt(),
        layers={"magnitude": torch.stack(layer_norms).sqrt()},
        meta={"criterion": "magnitude", "teacher_arch": arch.name},
    )


def _layer_params(parts: LayerParts) -> Iterator[torch.Tensor]:
    for linear in (parts.q_proj, parts.k_proj, parts.v_proj, parts.o_proj, parts.gate_proj, parts.up_proj,
                   parts.down_proj):
        yield linear.weight


def random_scores(arch: ArchConfig, seed: int) -> ImportanceScores:
    """Seeded uniform scores: keep sets drawn uniformly at random, reproducible by seed."""
    gen = torch.Generator().manual_seed(seed)
    layers = arch.num_hidden_layers
    return ImportanceScores(
        heads=torch.rand(layers, arch.num_attention_heads, generator=gen),
        neurons=torch.rand(layers, arch.intermediate_size, generator=gen),
        channels=torch.rand(arch.hidden_size, generator=gen),
        layers={"random": torch.rand(layers, generator=gen)},
        meta={"criterion": "random", "seed": seed, "teacher_arch": arch.name},
    )
