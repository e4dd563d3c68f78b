"""Shared helpers of the DMC tests: tiny models whose decisions are mixed (some merges, some appends)."""

from __future__ import annotations

import torch
from transformers import PreTrainedModel

from nas_minitron.dmc.attention import apply_dmc, dmc_modules, set_dmc_state
from tiny_models import tiny_model


def mixed_decision_model(family: str, seed: int = 0, gain: float = 12.0) -> PreTrainedModel:
    """A tiny DMC model (decision channels zeroed in attention, eval mode) whose keys' last channel is amplified,
    so that k[-1] - 5 crosses 0 for a good share of tokens and hard decisions both merge and append."""
    model = tiny_model(family, seed=seed)
    apply_dmc(model)
    with torch.no_grad():
        for m in dmc_modules(model):
            D = m.head_dim
            if m.k_norm is not None:  # Qwen3: the norm's weight sets the scale of the normalized key
                m.k_norm.weight[-1] = gain
            else:
                rows = torch.arange(D - 1, m.k_proj.weight.shape[0], D)
                m.k_proj.weight[rows] *= gain * 4
    set_dmc_state(model, mode="dmc", channel_scale=0.0, force_append=False)
    return model.eval()
