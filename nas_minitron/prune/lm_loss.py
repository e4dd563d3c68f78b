"""Language-model loss over token batches, and the same with decoder layers skipped (depth importance).

Skipping a layer swaps the model's layer list for one without it for the duration of a `with` block: the residual
stream then flows past it, which is exactly the function of the model with that layer pruned. Attention modules keep
their `layer_idx`; that only addresses a KV cache, and every forward here runs with `use_cache=False`.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Collection, Iterator, Sequence
from typing import TYPE_CHECKING, Any

from nas_minitron._lazy import lazy_import
from nas_minitron.distill.losses import next_token_loss
from nas_minitron.families import get_family
from nas_minitron.runtime import bf16_autocast

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel
else:
    torch = lazy_import("torch")

__all__ = ["batch_losses", "lm_loss", "removal_losses", "skipped_layers", "token_loss_sum"]


def token_loss_sum(logits: torch.Tensor, input_ids: torch.Tensor, mask: torch.Tensor | None) -> tuple[float, int]:
    """Summed next-token cross-entropy (float32) and the number of predicted tokens; padding masked."""
    targets = input_ids[:, 1:]  # [B, T-1]
    losses = next_token_loss(logits, input_ids, reduction="none")  # [B, T-1]
    if mask is None:
        return float(losses.sum()), targets.numel()
    # a target counts only when both it and the token predicting it are real tokens
    valid = (mask[:, 1:] * mask[:, :-1]).to(losses.dtype)
    return float((losses * valid).sum()), int(valid.sum())


def batch_losses(
    model: PreTrainedModel, input_ids: torch.Tensor, mask: torch.Tensor | None, batch_size: int
) -> tuple[float, int]:
    """(summed loss, predicted tokens) over [N, T] input ids, run `batch_size` rows at a time."""
    device = next(model.parameters()).device
    total, count = 0.0, 0
    with torch.inference_mode(), bf16_autocast(device, device.type == "cuda"):
        for start in range(0, input_ids.shape[0], batch_size):
            ids = input_ids[start : start + batch_size].to(device)  # [b, T]
            part = None if mask is None else mask[start : start + batch_size].to(device)
            logits = model(input_ids=ids, attention_mask=part, use_cache=False).logits  # [b, T, V]
            loss, num = token_loss_sum(logits, ids, part)
            total += loss
            count += num
    return total, count


def lm_loss(
    model: PreTrainedModel, input_ids: torch.Tensor, batch_size: int = 8, mask: torch.Tensor | None = None
) -> float:
    """Mean next-token cross-entropy over [N, T] input ids (nats per token)."""
    total, count = batch_losses(model, input_ids, mask, batch_size)
    return total / count if count else math.nan


def _layer_list_owner(model: PreTrainedModel) -> tuple[torch.nn.Module, str]:
    """(module, attribute) that holds the decoder's layer list, found by identity so no family is hard-coded."""
    layers = get_family(model.config.model_type).decoder_layers(model)
    for module in model.modules():
        for name, child in module.named_children():
            if child is layers:
                return module, name
    raise AssertionError("decoder layer list not found among the model's modules")


@contextlib.contextmanager
def skipped_layers(model: PreTrainedModel, drop: Collection[int]) -> Iterator[None]:
    """Run the model without the layers in `drop` (teacher indices) inside the block; restored afterwards."""
    owner, name = _layer_list_owner(model)
    original = getattr(owner, name)
    kept = torch.nn.ModuleList([layer for i, layer in enumerate(original) if i not in set(drop)])
    setattr(owner, name, kept)
    try:
        yield
    finally:
        setattr(owner, name, original)


def _cached_prefix(hidden: torch.Tensor, like: torch.nn.Module) -> torch.nn.Module:
    """A stand-in for layers 0..i-1 that returns their already computed output instead of recomputing it."""

    class CachedPrefix(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attention_type = getattr(like, "attention_type", "full_attention")  # read by Mistral/Qwen loops

        def forward(self, *_args: Any, **_kwargs: Any) -> torch.Tensor:
            return hidden

    return CachedPrefix()


def removal_losses(
    model: PreTrainedModel,
    input_ids: torch.Tensor,
    mask: torch.Tensor | None,
    removals: Sequence[tuple[int, ...]],
    batch_size: int,
    on_tokens: Callable[[int], object] | None = None,
) -> dict[tuple[int, ...], float]:
    """Mean LM loss with each set of layers skipped, over [N, T] input ids.

    Per batch, one pass records every layer's input; a removal starting at layer i then reruns only layers after
    it, fed the recorded input of layer i (about half the work of a full forward on average).
    """
    owner, name = _layer_list_owner(model)
    original = getattr(owner, name)
    device = next(model.parameters()).device
    sums = {drop: [0.0, 0] for drop in removals}
    with torch.inference_mode(), bf16_autocast(device, device.type == "cuda"):
        for start in range(0, input_ids.shape[0], batch_size):
            ids = input_ids[start : start + batch_size].to(device)  # [b, T]
            part = None if mask is None else mask[start : start + batch_size].to(device)
            inputs = _layer_inputs(model, original, ids, part)  # L x [b, T, H]
            for drop in removals:
                first = min(drop)
                rest = [layer for i, layer in enumerate(original) if i > first and i not in drop]
                layers = ([_cached_prefix(inputs[first], original[0])] if first > 0 else []) + rest
                setattr(owner, name, torch.nn.ModuleList(layers))
                try:
                    logits = model(input_ids=ids, attention_mask=part, use_cache=False).logits  # [b, T, V]
                finally:
                    setattr(owner, name, original)
                loss, num = token_loss_sum(logits, ids, part)
                sums[drop][0] += loss
                sums[drop][1] += num
                if on_tokens is not None:
                    on_tokens(int(ids.numel()))
    return {drop: total / max(count, 1) for drop, (total, count) in sums.items()}


def _layer_inputs(
    model: PreTrainedModel, layers: torch.nn.ModuleList, ids: torch.Tensor, mask: torch.Tensor | None
) -> list[Any]:
    """Every decoder layer's input hidden states for one batch (the LM head is skipped)."""
    inputs: list[Any] = [None] * len(layers)

    def record(index: int):  # type: ignore[no-untyped-def]
        def hook(_module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            inputs[index] = args[0] if args else kwargs["hidden_states"]
        return hook

    handles = [layer.register_forward_pre_hook(record(i), with_kwargs=True) for i, layer in enumerate(layers)]
    try:
        model(input_ids=ids, attention_mask=mask, use_cache=False, logits_to_keep=1)
    finally:
        for handle in handles:
            handle.remove()
    return inputs
