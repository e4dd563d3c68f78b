"""Distillation losses: forward KL on logits (full or top-k sparse), intermediate-state loss, layer maps.

Shapes: B batch, T positions, V vocabulary, k cached top-k entries, H hidden width. Every loss is computed in
float32 whatever the autocast dtype, and averaged over positions (summed over the vocabulary).

Top-k sparse KD and the tail: the teacher is known only on its k most likely tokens. The tail outside the top-k is
kept as one explicit "rest" bucket: the teacher's rest mass is 1 - sum(top-k probabilities), the student's is
its probability of every token outside the teacher's top-k (1 - its top-k mass, floored at 1e-6). The loss
is the exact forward KL between these two (k+1)-outcome distributions: it matches the tail's total mass, not its
shape, and is a lower bound of the full KL (equal when the teacher's tail mass is zero). With a temperature
T != 1 the teacher's (k+1) log-probabilities are divided by T and renormalized, i.e. the rest bucket is tempered
as if it were one token; at the default T = 1 nothing is approximated.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from nas_minitron._lazy import lazy_import

if TYPE_CHECKING:
    import torch
    import torch.nn.functional as F
else:
    torch = lazy_import("torch")
    F = lazy_import("torch.nn.functional")

__all__ = [
    "evenly_spaced_layer_map",
    "next_token_loss",
    "forward_kl",
    "intermediate_state_loss",
    "topk_forward_kl",
    "topk_targets",
]


def forward_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """KL(teacher || student) per position, averaged; scaled by T^2 so gradients keep their size across T."""
    t = float(temperature)
    log_q = F.log_softmax(student_logits.float() / t, dim=-1)  # [B, T, V]
    log_p = F.log_softmax(teacher_logits.float() / t, dim=-1)  # [B, T, V]
    kl = F.kl_div(log_q, log_p, log_target=True, reduction="none").sum(-1)  # [B, T]
    return kl.mean() * (t * t)


def topk_targets(teacher_logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The teacher's top-k log-probabilities [B, T, k] (float32, at T = 1) and their token indices [B, T, k]."""
    log_p = F.log_softmax(teacher_logits.float(), dim=-1)  # [B, T, V]
    values, indices = log_p.topk(k, dim=-1, sorted=True)
    return values, indices


def topk_forward_kl(
    student_logits: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    teacher_indices: torch.Tensor,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Sparse KL(teacher || student) over the teacher's top-k tokens plus one "rest" bucket (see module doc)."""
    t = float(temperature)
    indices = teacher_indices.long()  # [B, T, k]
    scaled = student_logits.float() if t == 1.0 else student_logits.float() / t  # [B, T, V]
    if indices.shape[-1] >= scaled.shape[-1]:  # k = V: no tail, the full KL
        log_p = F.log_softmax(teacher_logprobs.float() / t, dim=-1)
        log_q_top = F.log_softmax(scaled, dim=-1).gather(-1, indices)
        return (log_p.exp() * (log_p - log_q_top)).sum(-1).mean() * (t * t)
    # One V-sized pass (as in plain LM training); the student's rest mass is 1 - its top-k mass, clamped at
    # 1e-6 so that float32 rounding never takes the log of 0 (a rest below 1e-6 reads as 1e-6).
    log_q_top = F.log_softmax(scaled, dim=-1).gather(-1, indices)  # [B, T, k]
    log_q_rest = torch.log1p(-log_q_top.exp().sum(-1).clamp(max=1.0 - 1e-6))  # [B, T]

    log_p_top = teacher_logprobs.float()  # [B, T, k], log-probabilities at T = 1
    p_rest = (1.0 - log_p_top.exp().sum(-1)).clamp(min=0.0)  # [B, T]; fp16 storage can overshoot 1
    log_p = torch.cat([log_p_top, torch.log(p_rest).unsqueeze(-1)], dim=-1)  # [B, T, k+1]
    if t != 1.0:
        log_p = F.log_softmax(log_p / t, dim=-1)
    p = log_p.exp()  # [B, T, k+1]
    log_q = torch.cat([log_q_top, log_q_rest.unsqueeze(-1)], dim=-1)  # [B, T, k+1]
    # xlogy gives 0 for a zero-mass rest bucket instead of 0 * -inf
    kl: torch.Tensor = (torch.special.xlogy(p, p) - p * log_q).sum(-1)  # [B, T]
    return kl.mean() * (t * t)


def intermediate_state_loss(
    student_states: list[torch.Tensor], teacher_states: list[torch.Tensor], kind: str = "cosine"
) -> torch.Tensor:
    """Mean over mapped layer pairs of (1 - cosine) or MSE; student states already projected to teacher width."""
    assert len(student_states) == len(teacher_states) and student_states, "need matched, non-empty layer lists"
    losses = []
    for s, t in zip(student_states, teacher_states, strict=True):  # each [B, T, H_teacher]
        s, t = s.float(), t.float()
        if kind == "cosine":
            losses.append((1.0 - F.cosine_similarity(s, t, dim=-1)).mean())
        elif kind == "mse":
            losses.append(F.mse_loss(s, t))
        else:
            raise ValueError(f"intermediate-state loss must be 'cosine' or 'mse' but got {kind!r}")
    return torch.stack(losses).mean()


def evenly_spaced_layer_map(num_student_layers: int, num_teacher_layers: int) -> tuple[int, ...]:
    """Teacher layer for each student layer, spread evenly so that the last maps to the last."""
    return tuple(
        round((i + 1) * num_teacher_layers / num_student_layers) - 1 for i in range(num_student_layers)
    )


def next_token_loss(logits: torch.Tensor, tokens: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Next-token cross entropy in float32: logits [B, T, V] at position t predict tokens [B, T] at t + 1.

    `reduction="mean"` gives the scalar over all B * (T-1) predictions; `"none"` the per-prediction losses [B, T-1].
    The one LM loss of the package: the trainer's LM term, validation loss and the importance / layer-removal passes.
    """
    targets = tokens[:, 1:]  # [B, T-1]
    vocab = logits.shape[-1]
    losses = F.cross_entropy(logits[:, :-1].float().reshape(-1, vocab), targets.reshape(-1), reduction=reduction)
    return losses.view_as(targets) if reduction == "none" else losses
