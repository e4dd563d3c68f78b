"""The DMC retrofit loop: a model learns to merge its own KV entries while it stays close to its uncompressed self.

Loss per step: KD (forward KL to the frozen uncompressed teacher, default) or the next-token LM loss, plus
`penalty_weight * compression_penalty`. Stages, fade-out and the CR ramp: `nas_minitron.dmc.schedule`.

Its own loop, not `distill.trainer.distill`: the student's forward changes between stages and the objective needs the
decisions of every layer, which the shared trainer has no hook for. It reuses the distillation package's public
pieces: `losses.forward_kl` / `next_token_loss` and the atomic, verified `checkpoint` save/load (weights, optimizer,
scheduler, torch/python/numpy RNG: the Gumbel noise comes from torch's global RNG, so a resume is bit-exact).
Data order is a seeded permutation per epoch, a function of the step alone.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nas_minitron._lazy import lazy_import
from nas_minitron.distill.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint, student_identity
from nas_minitron.distill.losses import forward_kl, next_token_loss
from nas_minitron.dmc.schedule import RetrofitConfig, StagePoint, prior_for_cr
from nas_minitron.errors import UserError
from nas_minitron.runtime import bf16_autocast

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel

    from nas_minitron.dmc import attention
else:
    torch = lazy_import("torch")
    attention = lazy_import("nas_minitron.dmc.attention")

__all__ = ["RetrofitResult", "RetrofitStep", "achieved_cr", "compression_penalty", "measure_dmc", "retrofit"]


def compression_penalty(decisions: torch.Tensor, target_cr: float) -> torch.Tensor:
    """mean over (sequence, KV head, position) of clamp(prior - mean over layers of alpha, 0), prior = 1 - 1/CR;
    decisions [L, B, H, T].

    The mean is over layers only (as NVIDIA's Megatron-LM `dmc` branch takes it): every head slot at every position
    must reach the prior on average over the depth, so layers may compress unevenly, but no single layer can meet the
    target for all of them by merging everything (measured on SmolLM2: a mean over layers, heads and positions
    together let one layer go to CR 60 while the rest stayed at 1; benchmarks/RESULTS.md)."""
    per_slot = decisions.float().mean(dim=0)  # [B, H, T]
    return (prior_for_cr(target_cr) - per_slot).clamp(min=0).mean()


def achieved_cr(decisions: torch.Tensor) -> float:
    """tokens / entries of hard decisions [..., T] (alpha_0 = 0): 1 / (1 - mean(alpha))."""
    mean = float((decisions.detach() > 0.5).float().mean())
    return 1.0 / max(1.0 - mean, 1e-9)


@dataclass(frozen=True)
class RetrofitStep:
    """One optimizer step, for progress bars: achieved CR of the step's batch (hard decisions) vs its target."""

    step: int
    num_steps: int
    num_tokens: int
    stage: int
    loss: float
    penalty: float
    target_cr: float
    achieved_cr: float
    lr: float


@dataclass(frozen=True)
class RetrofitResult:
    num_steps: int
    num_tokens: int
    wall_s: float
    metrics: dict[str, Any]
    """`measure_dmc` on the validation sequences after training."""
    curve: list[dict[str, float]] = field(default_factory=list)


def _order(num_rows: int, count: int, seed: int) -> torch.Tensor:
    """The first `count` row indices of the seeded epoch permutations (a function of the seed alone)."""
    chunks: list[torch.Tensor] = []
    while len(chunks) * num_rows < count:
        generator = torch.Generator().manual_seed(seed * 1_000_003 + len(chunks))
        chunks.append(torch.randperm(num_rows, generator=generator))
    return torch.cat(chunks)[:count]


def _configure(student: PreTrainedModel, point: StagePoint) -> None:
    mode = "fade" if point.stage == 1 else "dmc"
    attention.set_dmc_state(student, mode=mode, channel_scale=point.channel_scale, force_append=False, relaxed=None)


def _micro_step(student: PreTrainedModel, teacher: PreTrainedModel | None, batch: torch.Tensor,
                config: RetrofitConfig, point: StagePoint, device: str) -> tuple[torch.Tensor, float, float]:
    """(loss to backpropagate, penalty, achieved CR of this batch)."""
    with bf16_autocast(device, config.dtype == "bf16"):
        logits = student(input_ids=batch, use_cache=False).logits  # [B, T, V]
        if config.loss == "kd":
            assert teacher is not None
            with torch.no_grad():
                teacher_logits = teacher(input_ids=batch, use_cache=False).logits
            loss = forward_kl(logits, teacher_logits, config.kd_temperature)
        else:
            loss = next_token_loss(logits, batch)
    if point.stage == 1:
        return loss, 0.0, 1.0
    decisions = attention.collect_decisions(student)  # [L, B, H, T]
    penalty = compression_penalty(decisions, point.target_cr)
    return loss + config.penalty_weight * penalty, float(penalty.detach()), achieved_cr(decisions)


def _step_scaling_rows(optimizer: torch.optim.Optimizer, rows: list[tuple[torch.Tensor, torch.Tensor]],
                       scale: float) -> None:
    """`optimizer.step()` with the update of `rows` (parameter, indices) multiplied by `scale`: snapshot, step,
    rescale. The update, not the gradient: Adam divides a gradient's scale away."""
    if scale == 1.0 or not rows:
        optimizer.step()
        return
    before = [param.detach()[idx].clone() for param, idx in rows]
    optimizer.step()
    with torch.no_grad():
        for (param, idx), old in zip(rows, before, strict=True):
            param[idx] = old + scale * (param[idx] - old)


def _zero_decision_rows(student: PreTrainedModel) -> None:
    """Zero the q[-1] / k[-1] projection rows and biases (not Qwen3's norm weights: a zero there would stop the
    rows' gradient)."""
    with torch.no_grad():
        for param, idx in attention.decision_rows(student, norms=False):
            param[idx] = 0.0


def _schedule(optimizer: torch.optim.Optimizer, config: RetrofitConfig) -> Any:
    warmup = max(1, round(config.warmup_fraction * config.total_steps))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / warmup))


def retrofit(
    student: PreTrainedModel,
    train: torch.Tensor,
    val: torch.Tensor,
    config: RetrofitConfig,
    *,
    teacher: PreTrainedModel | None = None,
    checkpoint_dir: Path | None = None,
    resume: bool = False,
    on_step: Callable[[RetrofitStep], None] | None = None,
    stop_after_steps: int | None = None,
) -> RetrofitResult:
    """Retrofit `student` (already `apply_dmc`-ed, on its device) on train [N, T]; validate on val [V, T].

    `teacher` is required for loss 'kd'. Checkpoints go to `checkpoint_dir` every `checkpoint_every_steps` and
    at the end; `resume` continues from the newest one. `stop_after_steps` ends the run early after that many
    steps (with a checkpoint): an interrupted run, for tests. Leaves the student in eval mode with DMC on."""
    if config.loss == "kd" and teacher is None:
        raise UserError("DMC retrofit with loss 'kd' needs a teacher (the uncompressed model).")
    if train.shape[1] != config.seq_len:
        raise UserError(f"training sequences have {train.shape[1]} tokens, the config says seq_len {config.seq_len}.")
    device = str(next(student.parameters()).device)
    torch.manual_seed(config.seed)
    optimizer = torch.optim.AdamW(student.parameters(), lr=config.lr, weight_decay=0.0)
    scheduler = _schedule(optimizer, config)
    holder = torch.nn.Module()  # checkpoint's "objective": DMC has no trainable parameters outside the model
    total = config.total_steps
    rows_per_step = config.batch_size * config.grad_accum
    order = _order(train.shape[0], total * rows_per_step, config.seed)
    every = config.checkpoint_every_steps or max(1, total // 10)
    step, curve, start = 0, [], time.perf_counter()
    found = latest_checkpoint(checkpoint_dir) if resume else None
    if found is not None:
        state = load_checkpoint(found, student, holder, optimizer, scheduler, config.fingerprint())
        step, curve = int(state["step"]), list(state["curve"])
    stop = total if stop_after_steps is None else min(total, step + stop_after_steps)
    rows = attention.decision_rows(student) if config.decision_lr_scale != 1.0 else []
    student.train()
    while step < stop:
        point = config.point(step)
        if config.reset_decision_rows and step == config.stage_steps()[0]:  # the first step of stage 2
            _zero_decision_rows(student)
        _configure(student, point)
        loss_sum = penalty_sum = cr_sum = 0.0
        for micro in range(config.grad_accum):
            first = step * rows_per_step + micro * config.batch_size
            batch = train[order[first : first + config.batch_size]].to(device)  # [b, T]
            loss, penalty, cr = _micro_step(student, teacher, batch, config, point, device)
            (loss / config.grad_accum).backward()
            loss_sum, penalty_sum, cr_sum = loss_sum + float(loss.detach()), penalty_sum + penalty, cr_sum + cr
        if not torch.isfinite(torch.tensor(loss_sum)):
            raise UserError(f"the DMC retrofit loss became {loss_sum} at step {step}; try a lower --lr or float32.")
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        _step_scaling_rows(optimizer, rows, config.decision_lr_scale if point.stage > 1 else 1.0)
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        n = config.grad_accum
        info = RetrofitStep(step, total, step * config.tokens_per_step, point.stage, loss_sum / n, penalty_sum / n,
                            point.target_cr, cr_sum / n, float(scheduler.get_last_lr()[0]))
        curve.append({"step": step, "stage": point.stage, "loss": info.loss, "penalty": info.penalty,
                      "target_cr": info.target_cr, "achieved_cr": info.achieved_cr})
        if on_step is not None:
            on_step(info)
        if checkpoint_dir is not None and (step % every == 0 or step == stop):
            record = {"step": step, "curve": curve, "config_fingerprint": config.fingerprint(),
                      "config": config.to_dict(), "student": student_identity(student)}
            save_checkpoint(checkpoint_dir, step, student, holder, optimizer, scheduler, record, config.keep_last_k)
    _configure(student, config.point(max(step - 1, 0)))
    student.eval()
    metrics = measure_dmc(student, val, teacher, config.batch_size, device, config.dtype == "bf16")
    return RetrofitResult(step, step * config.tokens_per_step, time.perf_counter() - start, metrics, curve)


def measure_dmc(student: PreTrainedModel, val: torch.Tensor, teacher: PreTrainedModel | None, batch_size: int,
                device: str, bf16: bool = False) -> dict[str, Any]:
    """Held-out LM loss, KL to the teacher (if any) and the achieved CR with hard decisions (eval mode): overall,
    per layer [L] and per layer x KV head [L][H]. A student still in the fade stage reports CR 1."""
    with torch.no_grad():
        return _measure(student, val, teacher, batch_size, device, bf16)


def _measure(student: PreTrainedModel, val: torch.Tensor, teacher: PreTrainedModel | None, batch_size: int,
             device: str, bf16: bool) -> dict[str, Any]:
    was_training = student.training
    student.eval()
    losses, kls, decisions = [], [], []
    dmc_on = all(m.mode == "dmc" for m in attention.dmc_modules(student))
    for first in range(0, val.shape[0], batch_size):
        batch = val[first : first + batch_size].to(device)
        with bf16_autocast(device, bf16):
            logits = student(input_ids=batch, use_cache=False).logits
            losses.append(float(next_token_loss(logits, batch)) * batch.shape[0])
            if teacher is not None:
                kls.append(float(forward_kl(logits, teacher(input_ids=batch, use_cache=False).logits))
                           * batch.shape[0])
        if dmc_on:
            decisions.append(attention.collect_decisions(student).detach().cpu() > 0.5)  # [L, b, H, T]
    student.train(was_training)
    n = val.shape[0]
    out: dict[str, Any] = {"val_loss": sum(losses) / n, "val_kl": sum(kls) / n if kls else None}
    if decisions:
        merged = torch.cat(decisions, dim=1).float()  # [L, V, H, T]
        out["achieved_cr"] = 1.0 / (1.0 - float(merged.mean()))
        out["per_layer_cr"] = [1.0 / (1.0 - float(x)) for x in merged.mean(dim=(1, 2, 3))]
        out["per_head_cr"] = [[1.0 / (1.0 - float(x)) for x in row] for row in merged.mean(dim=(1, 3))]
    else:
        out.update(achieved_cr=1.0, per_layer_cr=[], per_head_cr=[])
    return out
