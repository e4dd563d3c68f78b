"""What one distillation step minimizes, and how a student is validated against its teacher.

`DistillObjective` owns the only trainable state besides the student (the linear projection of student hidden
states to the teacher's width, used by the intermediate-state loss) and turns a batch of tokens into a loss, from
a live teacher or from a teacher-logit cache.

Neither the training loss nor validation builds full logits [B, T, V]: the student's and the teacher's bodies run
to their final hidden states, and `losses.chunked_logit_losses` applies the lm_heads chunk by chunk
(`DistillConfig.loss_chunk_tokens`). The teacher runs frozen: under no_grad, without a KV cache.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, cast

from nas_minitron._lazy import lazy_import
from nas_minitron.distill.config import DistillConfig
from nas_minitron.distill.fsdp import is_sharded
from nas_minitron.distill.logit_cache import LogitCache
from nas_minitron.distill.losses import (
    TeacherTargets,
    chunked_logit_losses,
    intermediate_state_loss,
    next_token_targets,
    teacher_topk_targets,
)
from nas_minitron.errors import UserError

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel
else:
    torch = lazy_import("torch")

__all__ = ["build_objective", "final_hidden", "output_head", "validate", "validate_sequences"]

Head = Callable[["torch.Tensor"], "torch.Tensor"]


def output_head(model: torch.nn.Module) -> Head:
    """The lm_head of an HF causal LM (or of the model inside a DDP wrapper): [.., H] -> [.., V].

    `get_output_embeddings()` is the lm_head of every supported family, tied to the input embeddings or not. A
    family that post-processes its logits (final soft-capping) would not be reproduced by the chunked losses, so it
    is refused.
    """
    inner = cast("PreTrainedModel", getattr(model, "module", model))
    if getattr(inner.config, "final_logit_softcapping", None):
        raise UserError(f"{inner.config.model_type!r} soft-caps its logits, which the chunked distillation losses do "
                        f"not reproduce; supported: llama, mistral, qwen2, qwen3.")
    head = inner.get_output_embeddings()
    assert head is not None, "a causal LM without output embeddings"
    return cast("Head", head)


def final_hidden(
    model: torch.nn.Module, tokens: torch.Tensor, want_states: bool = False
) -> tuple[torch.Tensor, tuple[torch.Tensor, ...] | None]:
    """The final hidden states [B, T, H] (after the final norm) of tokens [B, T], and all layers' when asked.

    A plain model runs only its body (`get_decoder()`), so no logits are computed at all. A model inside a DDP
    wrapper or sharded with FSDP2 must run its own forward (DDP prepares gradient sync there, FSDP2 gathers the
    root's parameters there): it computes the logits of the last position only (`logits_to_keep=1`) and hands
    its hidden states back. Never with a KV cache.
    """
    inner = getattr(model, "module", model)
    if inner is model and not is_sharded(model):
        body = cast("PreTrainedModel", model).get_decoder()
        out = body(input_ids=tokens, use_cache=False, output_hidden_states=want_states)
        return out.last_hidden_state, (out.hidden_states if want_states else None)
    out = model(input_ids=tokens, use_cache=False, output_hidden_states=True, logits_to_keep=1)
    return out.hidden_states[-1], (out.hidden_states if want_states else None)


def _teacher_targets(
    tokens: torch.Tensor,
    teacher: PreTrainedModel | None,
    cache: LogitCache | None,
    config: DistillConfig,
    want_states: bool,
) -> tuple[TeacherTargets, tuple[torch.Tensor, ...] | None]:
    """KD targets of the B * T positions of tokens [B, T] and the teacher's hidden states (when wanted).

    The cache wins when no hidden states are needed. From a live teacher: its final hidden states and lm_head
    (full KD), or its top-k log-probs computed chunk by chunk (top-k KD).
    """
    if cache is not None and not want_states:
        logprobs, indices = cache.lookup(tokens)  # [B, T, k] each
        k = logprobs.shape[-1]
        return TeacherTargets(logprobs=logprobs.to(tokens.device).reshape(-1, k),
                              indices=indices.to(tokens.device).reshape(-1, k)), None
    assert teacher is not None, "no teacher and no logit cache: KD targets are unavailable"
    with torch.no_grad():
        hidden, states = final_hidden(teacher, tokens, want_states)  # [B, T, H_t]
    hidden = hidden.reshape(-1, hidden.shape[-1])  # [N, H_t]
    head = output_head(teacher)
    if config.topk:
        return teacher_topk_targets(hidden, head, config.topk, config.loss_chunk_tokens), states
    return TeacherTargets(hidden=hidden, head=head), states


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
            hidden, states = final_hidden(student, tokens, want_states)  # [B, T, H]
            targets, teacher_states = None, None
            if config.kd_weight and (teacher is not None or cache is not None):
                targets, teacher_states = _teacher_targets(tokens, teacher, cache, config, want_states)
            losses = chunked_logit_losses(
                hidden.reshape(-1, hidden.shape[-1]), output_head(student), config.loss_chunk_tokens,
                teacher=targets, lm_targets=next_token_targets(tokens) if config.lm_weight else None,
                temperature=config.temperature,
            )
            parts: dict[str, torch.Tensor] = {}
            total = hidden.new_zeros((), dtype=torch.float32)
            if "kd" in losses:
                parts["kd"] = losses["kd"]
                total = total + config.kd_weight * parts["kd"]
                if want_states:
                    assert states is not None and teacher_states is not None
                    parts["is"] = self._state_loss(states, teacher_states)
                    alpha = config.is_alpha
                    if alpha is None:  # the papers' automatic weight: bring L_is to the size of L_logits
                        alpha = (parts["kd"].detach() / parts["is"].detach().clamp(min=1e-8)).item()
                    total = total + alpha * parts["is"]
            if "lm" in losses:
                parts["lm"] = losses["lm"]
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
    chunk_tokens: int = DistillConfig.loss_chunk_tokens,
) -> tuple[float, float]:
    """Student LM loss and KL to the teacher on held-out sequences [N, T] (NaN KL without a teacher or cache):
    the means over sequences of `validate_sequences`."""
    loss, kl = validate_sequences(student, val_sequences, teacher, cache, batch_size, autocast, chunk_tokens)
    return float(loss.mean()), float(kl.mean())


def validate_sequences(
    student: torch.nn.Module,
    val_sequences: torch.Tensor,
    teacher: PreTrainedModel | None,
    cache: LogitCache | None,
    batch_size: int,
    autocast: Callable[[], AbstractContextManager[object]],
    chunk_tokens: int = DistillConfig.loss_chunk_tokens,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per held-out sequence [N, T]: the student's LM loss and its KL to the teacher, each a float32 [N] tensor on
    the CPU (the KL all NaN without a teacher or cache); per-sequence values give the search its bootstrap
    intervals.

    With a teacher the KL is the full one; with only a top-k cache it is the top-k + rest KL of the cache. The
    forward pass runs `batch_size` sequences at a time, the losses one sequence at a time by chunks of
    `chunk_tokens` positions, under no_grad.
    """
    was_training = student.training
    student.eval()
    device = next(student.parameters()).device
    losses_lm: list[float] = []
    losses_kl: list[float] = []
    head = output_head(student)
    teacher_head = output_head(teacher) if teacher is not None else None
    with torch.no_grad(), autocast():
        for start in range(0, val_sequences.shape[0], batch_size):
            tokens = val_sequences[start : start + batch_size].to(device)  # [b, T]
            hidden, _ = final_hidden(student, tokens)  # [b, T, H]
            t_hidden: torch.Tensor | None = None
            top: tuple[torch.Tensor, torch.Tensor] | None = None
            if teacher is not None:
                t_hidden, _ = final_hidden(teacher, tokens)  # [b, T, H_t]
            elif cache is not None:
                logprobs, indices = cache.lookup(tokens)  # [b, T, k] each
                top = logprobs.to(device), indices.to(device)
            lm_targets = next_token_targets(tokens)  # [b * T]
            length = tokens.shape[1]
            for row in range(tokens.shape[0]):
                targets: TeacherTargets | None = None
                if t_hidden is not None:
                    targets = TeacherTargets(hidden=t_hidden[row], head=teacher_head)
                elif top is not None:
                    targets = TeacherTargets(logprobs=top[0][row], indices=top[1][row])
                losses = chunked_logit_losses(hidden[row], head, chunk_tokens, teacher=targets,
                                              lm_targets=lm_targets[row * length : (row + 1) * length])
                losses_lm.append(float(losses["lm"]))
                losses_kl.append(float(losses["kd"]) if targets is not None else math.nan)
    student.train(was_training)
    return torch.tensor(losses_lm, dtype=torch.float32), torch.tensor(losses_kl, dtype=torch.float32)
