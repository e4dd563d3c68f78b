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

Chunked losses (`chunked_logit_losses`): the trainer never builds the full logits [B, T, V]. It runs the models'
bodies to their final hidden states and applies each lm_head to one chunk of token positions at a time; a chunk's
student logits (and the float32 tensors derived from them, and for full KD the teacher's chunk logits) are
recomputed in backward (`torch.utils.checkpoint` per chunk), so that no float32 tensor larger than chunk x V is
ever alive. The chunked losses equal the unchunked ones up to float rounding (tested).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from nas_minitron._lazy import lazy_import

if TYPE_CHECKING:
    import torch
    import torch.nn.functional as F
    import torch.utils.checkpoint as torch_checkpoint
else:
    torch = lazy_import("torch")
    F = lazy_import("torch.nn.functional")
    torch_checkpoint = lazy_import("torch.utils.checkpoint")

IGNORE_INDEX = -100
"""the target of a position with no next token (cross entropy skips it)"""

__all__ = [
    "IGNORE_INDEX",
    "TeacherTargets",
    "chunked_logit_losses",
    "evenly_spaced_layer_map",
    "next_token_targets",
    "next_token_loss",
    "forward_kl",
    "intermediate_state_loss",
    "topk_forward_kl",
    "teacher_topk_targets",
    "topk_targets",
]


def forward_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """KL(teacher || student) per position, averaged; scaled by T^2 so gradients keep their size across T."""
    t = float(temperature)
    return _kl_rows(student_logits, teacher_logits, t).mean() * (t * t)


def _kl_rows(student_logits: torch.Tensor, teacher_logits: torch.Tensor, t: float) -> torch.Tensor:
    """KL(teacher || student) at temperature t of each position [...] (not scaled by t^2); logits [..., V]."""
    log_q = F.log_softmax(student_logits.float() / t, dim=-1)  # [..., V]
    log_p = F.log_softmax(teacher_logits.float() / t, dim=-1)  # [..., V]
    return F.kl_div(log_q, log_p, log_target=True, reduction="none").sum(-1)  # [...]


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
    return _topk_kl_rows(student_logits, teacher_logprobs, teacher_indices, t).mean() * (t * t)


def _topk_kl_rows(
    student_logits: torch.Tensor, teacher_logprobs: torch.Tensor, teacher_indices: torch.Tensor, t: float
) -> torch.Tensor:
    """The top-k + rest KL of each position [...] (not scaled by t^2); logits [..., V], targets [..., k]."""
    indices = teacher_indices.long()  # [B, T, k]
    scaled = student_logits.float() if t == 1.0 else student_logits.float() / t  # [B, T, V]
    if indices.shape[-1] >= scaled.shape[-1]:  # k = V: no tail, the full KL
        log_p = F.log_softmax(teacher_logprobs.float() / t, dim=-1)
        log_q_top = F.log_softmax(scaled, dim=-1).gather(-1, indices)
        return (log_p.exp() * (log_p - log_q_top)).sum(-1)
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
    return kl


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


def next_token_targets(tokens: torch.Tensor) -> torch.Tensor:
    """Flat next-token targets [B * T] for tokens [B, T]: position t of a row -> token t + 1, IGNORE_INDEX at its end.

    Cross entropy of the flattened logits [B * T, V] against them, summed and divided by B * (T-1), is
    `next_token_loss`; flat targets let the LM loss run over the same chunks of positions as the KD loss.
    """
    targets = torch.full_like(tokens, IGNORE_INDEX)  # [B, T]
    targets[:, :-1] = tokens[:, 1:]
    return targets.reshape(-1)


@dataclass(frozen=True)
class TeacherTargets:
    """The KD targets of N flattened token positions, in one of two forms.

    Full KD: `hidden` [N, H_t] (the teacher's final hidden states, after its final norm) and `head` (its lm_head):
    each chunk's teacher logits are computed from them under no_grad, never all at once. Top-k KD: `logprobs`
    [N, k] (float32 or float16 log-probabilities at T = 1) and `indices` [N, k], from a logit cache or from
    `teacher_topk_targets`.
    """

    hidden: torch.Tensor | None = None
    head: Callable[[torch.Tensor], torch.Tensor] | None = None
    logprobs: torch.Tensor | None = None
    indices: torch.Tensor | None = None

    def __post_init__(self) -> None:
        full, topk = self.hidden is not None and self.head is not None, self.logprobs is not None
        pairs = (self.logprobs is None) == (self.indices is None)
        assert full != topk and pairs, "give hidden + head, or logprobs + indices"


def teacher_topk_targets(
    hidden: torch.Tensor, head: Callable[[torch.Tensor], torch.Tensor], k: int, chunk_tokens: int
) -> TeacherTargets:
    """The teacher's top-k log-probabilities and indices [N, k] from its final hidden states [N, H_t], by chunks.

    Under no_grad; only one chunk's logits [chunk, V] exist at a time. The same values as `topk_targets` on the
    full logits.
    """
    values, indices = [], []
    with torch.no_grad():
        for h in hidden.split(chunk_tokens):  # each [c, H_t]
            v, i = topk_targets(head(h), k)  # [c, k] each
            values.append(v)
            indices.append(i)
    return TeacherTargets(logprobs=torch.cat(values), indices=torch.cat(indices))


def chunked_logit_losses(
    hidden: torch.Tensor,
    head: Callable[[torch.Tensor], torch.Tensor],
    chunk_tokens: int,
    *,
    teacher: TeacherTargets | None = None,
    lm_targets: torch.Tensor | None = None,
    temperature: float = 1.0,
) -> dict[str, torch.Tensor]:
    """KD and LM losses of N positions from the student's final hidden states [N, H], one chunk of positions at a time.

    Returns `kd` (the mean over N of the full or top-k KL, times T^2: `forward_kl` / `topk_forward_kl`) when
    `teacher` is given and `lm` (the mean next-token cross entropy over the positions whose `lm_targets` [N] are
    not IGNORE_INDEX: `next_token_loss`) when `lm_targets` is given. `head` maps [c, H] -> [c, V] (the student's
    lm_head; tied or not). With gradients enabled each chunk runs under `torch.utils.checkpoint`, so its logits
    are recomputed in backward instead of kept: peak memory holds a few [chunk, V] tensors, not [N, V] ones.
    """
    t = float(temperature)
    num = hidden.shape[0]
    teacher_hidden = teacher.hidden.split(chunk_tokens) if teacher is not None and teacher.hidden is not None else None
    teacher_top = (teacher.logprobs.split(chunk_tokens), teacher.indices.split(chunk_tokens)) \
        if teacher is not None and teacher.logprobs is not None and teacher.indices is not None else None
    targets = lm_targets.split(chunk_tokens) if lm_targets is not None else None

    def chunk_sums(index: int, h: torch.Tensor) -> torch.Tensor:
        """[2]: the chunk's summed KL (unscaled) and summed cross entropy (0 where not asked for)."""
        logits = head(h)  # [c, V], in the autocast dtype
        kd = lm = logits.new_zeros((), dtype=torch.float32)
        if teacher_hidden is not None:
            assert teacher is not None and teacher.head is not None
            with torch.no_grad():
                teacher_logits = teacher.head(teacher_hidden[index])  # [c, V]
            kd = _kl_rows(logits, teacher_logits, t).sum()
        elif teacher_top is not None:
            kd = _topk_kl_rows(logits, teacher_top[0][index], teacher_top[1][index], t).sum()
        if targets is not None:
            lm = F.cross_entropy(logits.float(), targets[index], ignore_index=IGNORE_INDEX, reduction="sum")
        return torch.stack([kd, lm])

    recompute = torch.is_grad_enabled() and hidden.requires_grad
    sums = hidden.new_zeros(2, dtype=torch.float32)  # [2]
    for index, h in enumerate(hidden.split(chunk_tokens)):  # each [c, H]
        if recompute:  # the head and the losses draw no random numbers: no RNG state to restore
            part = torch_checkpoint.checkpoint(chunk_sums, index, h, use_reentrant=False, preserve_rng_state=False)
        else:
            part = chunk_sums(index, h)
        sums = sums + part
    out: dict[str, torch.Tensor] = {}
    if teacher is not None:
        out["kd"] = sums[0] / num * (t * t)
    if lm_targets is not None:
        out["lm"] = sums[1] / (lm_targets != IGNORE_INDEX).sum()
    return out
