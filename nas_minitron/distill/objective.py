"""What one distillation step minimizes, and how a student is validated against its teacher.

`DistillObjective` owns the only trainable state besides the student (the linear projection of student hidden
states to the teacher's width, used by the intermediate-state loss) and turns a batch of tokens into a loss, from
a live teacher or from a teacher-logit cache.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any

from nas_minitron._lazy import lazy_import
from nas_minitron.distill.config import DistillConfig
from nas_minitron.distill.logit_cache import LogitCache
from nas_minitron.distill.losses import (
    forward_kl,
    intermediate_state_loss,
    next_token_loss,
    topk_forward_kl,
    topk_targets,
)

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel
else:
    torch = lazy_import("torch")

__all__ = ["build_objective", "validate"]


def _teacher_targets(
    tokens: torch.Tensor,
    teacher: PreTrainedModel | None,
    cache: LogitCache | None,
    config: DistillConfig,
    want_states: bool,
) -> dict[str, Any]:
    """Teacher logits (or top-k log-probs + indices) and hidden states for tokens [B, T]; the cache wins."""
    if cache is not None and not want_states:
        logprobs, indices = cache.lookup(tokens)  # [B, T, k] each
        return {"logprobs": logprobs.to(tokens.device), "indices": indices.to(tokens.device)}
    assert teacher is not None, "no teacher and no logit cache: KD targets are unavailable"
    with torch.no_grad():
        out = teacher(input_ids=tokens, output_hidden_states=want_states)
    targets: dict[str, Any] = {"states": out.hidden_states if want_states else None}
    if config.topk:
        targets["logprobs"], targets["indices"] = topk_targets(out.logits, config.topk)
    else:
        targets["logits"] = out.logits
    return targets


def _kd_loss(student_logits: torch.Tensor, targets: dict[str, Any], temperature: float) -> torch.Tensor:
    if "logits" in targets:
        return forward_kl(student_logits, targets["logits"], temperature)
    return topk_forward_kl(student_logits, targets["logprobs"], targets["indices"], temperature)


def build_objective(
    student: PreTrainedModel,
    teacher: PreTrainedModel | None,
    config: DistillConfig,
    layer_map: tuple[int, ...] | None,
) -> torch.nn.Module:
    """A `torch.nn.Module` computing the step loss; it holds the intermediate-state projection when needed.

    The class is defined here, not at module level: subclassing `torch.nn.Module` at import time would load torch.
    """
    class DistillObjective(torch.nn.Module):
        """Loss = kd_weight * KL + lm_weight * LM + alpha * intermediate-state loss (alpha fixed or automatic)."""

        def __init__(self) -> None:
            super().__init__()
            self.layer_map = layer_map
            self.projection: torch.nn.Linear | None = None
            if config.is_loss != "none":
                s_width, t_width = student.config.hidden_size, teacher.config.hidden_size  # type: ignore[union-attr]
                if s_width != t_width:
                    self.projection = torch.nn.Linear(s_width, t_width, bias=False)

        def forward(
            self, student: torch.nn.Module, tokens: torch.Tensor, teacher: PreTrainedModel | None,
            cache: LogitCache | None,
        ) -> tuple[torch.Tensor, dict[str, float]]:
            want_states = self.layer_map is not None
            out = student(input_ids=tokens, output_hidden_states=want_states)
            parts: dict[str, torch.Tensor] = {}
            total = out.logits.new_zeros((), dtype=torch.float32)
            if config.kd_weight and (teacher is not None or cache is not None):
                targets = _teacher_targets(tokens, teacher, cache, config, want_states)
                parts["kd"] = _kd_loss(out.logits, targets, config.temperature)
                total = total + config.kd_weight * parts["kd"]
                if want_states:
                    parts["is"] = self._state_loss(out.hidden_states, targets["states"])
                    alpha = config.is_alpha
                    if alpha is None:  # the papers' automatic weight: bring L_is to the size of L_logits
                        alpha = (parts["kd"].detach() / parts["is"].detach().clamp(min=1e-8)).item()
                    total = total + alpha * parts["is"]
            if config.lm_weight:
                parts["lm"] = next_token_loss(out.logits, tokens)
                total = total + config.lm_weight * parts["lm"]
            return total, {name: float(value.detach()) for name, value in parts.items()}

        def _state_loss(
            self, student_states: tuple[torch.Tensor, ...], teacher_states: tuple[torch.Tensor, ...]
        ) -> torch.Tensor:
            # hidden_states[i + 1] is the output of layer i; the very last one is after the final norm, so the
            # last student layer is left to the logit loss and only the layers before it are matched.
            pairs = [(i, t) for i, t in enumerate(self.layer_map[:-1])]  # type: ignore[index]
            s = [student_states[i + 1] for i, _ in pairs]  # each [B, T, H_student]
            if self.projection is not None:
                s = [self.projection(x.to(self.projection.weight.dtype)) for x in s]  # [B, T, H_teacher]
            t = [teacher_states[j + 1] for _, j in pairs]  # each [B, T, H_teacher]
            return intermediate_state_loss(s, t, config.is_loss)

    return DistillObjective()


def validate(
    student: torch.nn.Module,
    val_sequences: torch.Tensor,
    teacher: PreTrainedModel | None,
    cache: LogitCache | None,
    batch_size: int,
    autocast: Callable[[], AbstractContextManager[object]],
) -> tuple[float, float]:
    """Student LM loss and KL to the teacher on held-out sequences [N, T] (NaN KL without a teacher or cache).

    With a teacher the KL is the full one; with only a top-k cache it is the top-k + rest KL of the cache.
    """
    was_training = student.training
    student.eval()
    device = next(student.parameters()).device
    loss_sum = kl_sum = 0.0
    num_batches = 0.0
    with torch.no_grad(), autocast():
        for start in range(0, val_sequences.shape[0], batch_size):
            tokens = val_sequences[start : start + batch_size].to(device)  # [b, T]
            logits = student(input_ids=tokens).logits  # [b, T, V]
            weight = tokens.shape[0] / batch_size  # a short last batch counts for its size
            loss_sum += float(next_token_loss(logits, tokens)) * weight
            if teacher is not None:
                kl_sum += float(forward_kl(logits, teacher(input_ids=tokens).logits)) * weight
            elif cache is not None:
                logprobs, indices = cache.lookup(tokens)
                kl_sum += float(topk_forward_kl(logits, logprobs.to(device), indices.to(device))) * weight
            num_batches += weight
    student.train(was_training)
    kl = kl_sum / num_batches if (teacher is not None or cache is not None) else math.nan
    return loss_sum / num_batches, kl
