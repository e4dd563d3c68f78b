"""Single-process distillation trainer with checkpoint/resume; no Ray inside (see `distill_ray` for scale-out).

`distill(...)` is the one entry point: the search trials call it for short runs, `nas-minitron distill` for long
ones, `nas-minitron correct-teacher` for LM fine-tuning (no teacher, lm_weight only). The order of work is fixed:
check inputs -> seed -> build optimizer/schedule -> resume -> validate at step 0 -> train -> validate + checkpoint
every `eval_every_tokens` -> final validation.

Precision: with `master_weights="fp32"` (the default) the student's trainable parameters are float32 (cast once,
in place, when they arrive in a lower precision, as transformers 5 loads bf16 hub checkpoints), so gradients and
AdamW state are float32 too; `dtype="bf16"` runs forward and backward under bf16 autocast. The teacher is frozen
(`requires_grad_(False)`, eval, no KV cache, no_grad) and, on CUDA under bf16, cast to bf16 (on CPU it keeps its
dtype). Checkpoints hold the float32 master weights (so a resumed run is bit-exact); the student is handed back
with them, so a student saved after `distill()` is float32 unless its caller casts it.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import random
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from nas_minitron._lazy import lazy_import
from nas_minitron.distill.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint, student_identity
from nas_minitron.distill.config import DistillConfig, DistillResult, EvalPoint, NonFiniteLossError, StepInfo
from nas_minitron.distill.fsdp import clip_grad_norm_, full_optimizer_state, full_student_state, is_sharded
from nas_minitron.distill.logit_cache import LogitCache
from nas_minitron.distill.losses import evenly_spaced_layer_map
from nas_minitron.distill.objective import build_objective, validate_sequences
from nas_minitron.errors import UserError
from nas_minitron.runtime import bf16_autocast

if TYPE_CHECKING:
    import numpy as np
    import torch
    import torch.distributed as dist
    import torch.distributed.tensor as dtensor
    from torch.nn.parallel import DistributedDataParallel
    from transformers import PreTrainedModel
else:
    np = lazy_import("numpy")
    torch = lazy_import("torch")
    dist = lazy_import("torch.distributed")
    dtensor = lazy_import("torch.distributed.tensor")

__all__ = ["DistillConfig", "DistillResult", "EvalPoint", "NonFiniteLossError", "StepInfo", "distill"]

_LOG = logging.getLogger(__name__)


class _BatchStream:
    """Micro-batches [B, T] from a tensor of sequences (in order, wrapping around) or from a re-iterable of batches.

    `position` counts micro-batches handed out; resuming re-creates the stream and skips that many, so the data
    of a resumed run is exactly the data of an uninterrupted one.
    """

    def __init__(self, data: Iterable[torch.Tensor] | torch.Tensor, batch_size: int, seq_len: int) -> None:
        self.position = 0
        self._tensor: torch.Tensor | None = None
        if isinstance(data, torch.Tensor):
            if data.dim() != 2 or data.shape[1] != seq_len:
                raise UserError(f"training sequences must be [N, {seq_len}] but got {list(data.shape)}.")
            if data.shape[0] < batch_size:
                raise UserError(f"training data has {data.shape[0]} sequences, fewer than one batch of {batch_size}.")
            self._tensor = data
        self._iterable: Iterable[torch.Tensor] | None = data if self._tensor is None else None
        self._iterator: Iterator[torch.Tensor] | None = None
        self._batch_size = batch_size

    def next(self) -> torch.Tensor:
        if self._tensor is not None:
            num = self._tensor.shape[0] // self._batch_size  # whole batches per pass
            start = (self.position % num) * self._batch_size
            self.position += 1
            return self._tensor[start : start + self._batch_size]
        if self._iterator is None:
            self._iterator = iter(self._iterable)  # type: ignore[arg-type]
        batch = next(self._iterator, None)
        if batch is None:  # a new pass over a re-iterable source
            self._iterator = iter(self._iterable)  # type: ignore[arg-type]
            batch = next(self._iterator, None)
            if batch is None:
                raise UserError("training data is empty: it yields not even one batch.")
        self.position += 1
        return batch

    def skip(self, count: int) -> None:
        for _ in range(count):
            self.next()


def _world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _all_reduce_grads(module: torch.nn.Module) -> None:
    """Average gradients of a module that is not wrapped in DDP across workers (no-op in one process)."""
    world = _world_size()
    if world == 1:
        return
    for param in module.parameters():
        if param.grad is not None:
            dist.all_reduce(param.grad)
            param.grad.div_(world)


def _same_on_all_ranks(val_loss: float, val_kl: float, train_loss: float,
                       device: torch.device | None = None) -> tuple[float, float, float]:
    """Rank 0's validation metrics and the mean training loss over ranks, on every rank (unchanged in one process).

    All ranks validate on the same sequences; the broadcast makes every rank act on bit-identical metrics. A rank's
    training loss covers its share of the global batch only; their mean is the global batch's loss. The tensors live
    on the run's `device`: NCCL process groups refuse CPU tensors.
    """
    world = _world_size()
    if world == 1:
        return val_loss, val_kl, train_loss
    val = torch.tensor([val_loss, val_kl], dtype=torch.float64, device=device)
    dist.broadcast(val, src=0)
    train = torch.tensor([train_loss], dtype=torch.float64, device=device)
    dist.all_reduce(train)
    return val[0].item(), val[1].item(), train.item() / world


def _is_rank_zero() -> bool:
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def _schedule(config: DistillConfig, num_steps: int) -> Callable[[int], float]:
    """Linear warmup to 1, then cosine decay to min_lr_ratio at the last step (a multiplier of lr)."""
    if config.warmup_steps is not None:
        warmup = config.warmup_steps
    else:
        warmup = int(round(config.warmup_fraction * num_steps))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, num_steps - warmup))
        return config.min_lr_ratio + (1 - config.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def _optimizer(student: PreTrainedModel, objective: torch.nn.Module, config: DistillConfig,
               device: torch.device) -> torch.optim.AdamW:
    """AdamW with decay on matrices only (norm weights and biases are not decayed); fused on CUDA, foreach on CPU.

    Its state (exp_avg, exp_avg_sq) takes the parameters' dtype: float32 with fp32 master weights. The multi-tensor
    kernels refuse a list mixing DTensors and plain tensors, so with an FSDP-sharded student the objective's plain
    projection gets groups of its own (a plain student keeps the two groups its checkpoints were written with).
    """
    params = [p for p in list(student.parameters()) + list(objective.parameters()) if p.requires_grad]
    unique = list({id(p): p for p in params}.values())  # tied embeddings appear once
    decay = [p for p in unique if p.dim() >= 2]
    no_decay = [p for p in unique if p.dim() < 2]
    pairs = [(decay, config.weight_decay), (no_decay, 0.0)]
    if is_sharded(student):
        pairs = [(part, decay_rate) for group, decay_rate in pairs for part in _split_sharded(group) if part]
    groups = [{"params": group, "weight_decay": decay_rate} for group, decay_rate in pairs]
    kernel = {"fused": True} if device.type == "cuda" else {"foreach": True}
    return torch.optim.AdamW(groups, lr=config.lr, betas=(0.9, 0.95), eps=1e-8, **kernel)


def _split_sharded(params: list[torch.nn.Parameter]) -> tuple[list[torch.nn.Parameter], list[torch.nn.Parameter]]:
    """(DTensor parameters, plain ones), each in the given order."""
    is_dtensor = [isinstance(p, dtensor.DTensor) for p in params]
    return ([p for p, d in zip(params, is_dtensor, strict=True) if d],
            [p for p, d in zip(params, is_dtensor, strict=True) if not d])


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _trainable_dtypes(model: torch.nn.Module) -> set[torch.dtype]:
    return {p.dtype for p in model.parameters() if p.requires_grad and p.is_floating_point()}


def _hold_master_weights(student: torch.nn.Module, model: PreTrainedModel, config: DistillConfig) -> str | None:
    """Cast the student's lower-precision trainable parameters to float32 in place (fp32 master weights).

    Returns a line saying what was cast (None when nothing was). In place through `.data`, so tied embeddings stay
    one parameter and the caller's model object is the trained one. A DDP-wrapped or FSDP-sharded student must
    arrive in float32: its wrapper has laid out gradient buckets or shards for the dtype it saw.
    """
    low = {d for d in _trainable_dtypes(model) if d != torch.float32}
    if config.master_weights != "fp32" or not low:
        return None
    names = ", ".join(sorted(_dtype_name(d) for d in low))
    if student is not model or is_sharded(model):
        raise UserError(f"a DDP-wrapped or FSDP-sharded student has {names} parameters; fp32 master weights need it "
                        f"loaded in float32 before wrapping (or master_weights='model').")
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad and param.is_floating_point() and param.dtype != torch.float32:
                param.data = param.data.float()
    return f"student parameters cast {names} -> float32 (fp32 master weights)"


def _freeze_teacher(teacher: PreTrainedModel, config: DistillConfig, device: torch.device) -> str | None:
    """Frozen teacher: no gradients, eval mode; bf16 on CUDA under bf16 compute. Returns a line when it was cast."""
    teacher.requires_grad_(False)
    teacher.eval()
    dtypes = {p.dtype for p in teacher.parameters() if p.is_floating_point()}
    if device.type != "cuda" or config.dtype != "bf16" or dtypes == {torch.bfloat16}:
        return None
    teacher.to(torch.bfloat16)  # type: ignore[arg-type]  # transformers' wrapped `to` loses torch's signature
    return f"teacher cast {', '.join(sorted(_dtype_name(d) for d in dtypes))} -> bfloat16 on {device}"


def _check_inputs(
    student: PreTrainedModel, teacher: PreTrainedModel | None, cache: LogitCache | None, config: DistillConfig,
    val_sequences: torch.Tensor,
) -> None:
    vocab = student.config.vocab_size
    if teacher is not None and teacher.config.vocab_size != vocab:
        raise UserError(f"teacher vocabulary ({teacher.config.vocab_size}) differs from the student's ({vocab}).")
    if cache is not None and cache.vocab_size != vocab:
        raise UserError(f"logit cache vocabulary ({cache.vocab_size}) differs from the student's ({vocab}).")
    if cache is not None and teacher is None and config.topk and cache.topk < config.topk:
        raise UserError(f"logit cache holds top-{cache.topk}, fewer than topk={config.topk}.")
    if config.is_loss != "none" and teacher is None:
        raise UserError("the intermediate-state loss needs a live teacher (a logit cache holds no hidden states).")
    if config.kd_weight and config.lm_weight == 0 and teacher is None and cache is None:
        raise UserError("KD needs a teacher or a logit cache; for LM training alone set kd_weight=0, lm_weight>0.")
    if teacher is not None:
        s_device, t_device = next(student.parameters()).device, next(teacher.parameters()).device
        if s_device != t_device:
            raise UserError(f"the teacher is on {t_device} but the student on {s_device}; put both on one device.")
    if val_sequences.dim() != 2 or val_sequences.shape[0] < 1:
        raise UserError(f"validation sequences must be a non-empty [N, T] tensor but got {list(val_sequences.shape)}.")


def _autocast(config: DistillConfig, device: torch.device) -> Callable[[], AbstractContextManager[object]]:
    """A fresh bf16 autocast context per use when `config.dtype` is bf16, else a no-op."""
    return lambda: bf16_autocast(device, config.dtype == "bf16")


def _seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def distill(
    student: PreTrainedModel | DistributedDataParallel,
    train_batches: Iterable[torch.Tensor] | torch.Tensor,
    val_sequences: torch.Tensor,
    config: DistillConfig,
    *,
    teacher: PreTrainedModel | None = None,
    logit_cache: LogitCache | None = None,
    checkpoint_dir: Path | None = None,
    resume: bool = False,
    on_eval: Callable[[EvalPoint], None] | None = None,
    on_checkpoint: Callable[[Path], None] | None = None,
    on_step: Callable[[StepInfo], None] | None = None,
    layer_map: tuple[int, ...] | None = None,
    log: Callable[[str], None] | None = None,
    stop_at_step: int | None = None,
    evaluate_start: bool = True,
) -> DistillResult:
    """Distill `teacher` (or its `logit_cache`) into `student` in place within `config.num_tokens` tokens.

    `train_batches` is a tensor of sequences [N, T] (batched in order, wrapping around) or a re-iterable of
    micro-batches [B, T] that yields the same batches each pass. With a logit cache the cache supplies the
    training targets and the teacher (if given) only the validation KL. `layer_map[i]` is the teacher layer
    matched to student layer i by the intermediate-state loss (default: evenly spaced). `student` may be wrapped in
    DistributedDataParallel or sharded with FSDP2 (`nas_minitron.distill.fsdp.shard_student`); every rank must then pass
    the same `checkpoint_dir` (or None) and only rank 0 writes checkpoints (of the whole student, gathered).
    `stop_at_step` ends the run after that optimizer step (validated and checkpointed there) while the schedule
    stays the one over the whole `config.num_tokens`: a later call resuming from its checkpoint continues exactly
    as an uninterrupted run (the search's rungs). A run resumed at or past it trains nothing and returns its curve.
    `evaluate_start=False` skips the step-0 validation (a caller that already has it).
    Raises NonFiniteLossError on a NaN/Inf loss. `log` receives one line saying where and in which dtypes the run
    trains (and what was cast); without it the line goes to this module's logger. The result records the same
    (`device`, `param_dtype`, `compute_dtype`). Precision: see the module docstring.
    """
    # the HF model under a DDP wrapper (FSDP2 shards it in place)
    model = cast("PreTrainedModel", getattr(student, "module", student))
    _check_inputs(model, teacher, logit_cache, config, val_sequences)
    _seed(config.seed)
    if config.is_loss != "none" and layer_map is None:
        assert teacher is not None  # _check_inputs: the intermediate-state loss needs a live teacher
        layer_map = evenly_spaced_layer_map(model.config.num_hidden_layers, teacher.config.num_hidden_layers)
    if config.is_loss == "none":
        layer_map = None
    device = next(model.parameters()).device
    notes = [_hold_master_weights(student, model, config)]  # before the optimizer sees the parameters
    if teacher is not None:
        notes.append(_freeze_teacher(teacher, config, device))
    objective = build_objective(model, teacher, config, layer_map).to(device)
    where, param_dtype, compute_dtype = _precision(model, config, device)
    line = (f"distill on {where}: parameters {param_dtype}, compute {compute_dtype}"
            + "".join(f"; {note}" for note in notes if note))
    (log or _LOG.info)(line)
    run = _Run(student, model, objective, config, device, teacher, logit_cache)
    run.start(checkpoint_dir if _is_rank_zero() else None, checkpoint_dir, resume, val_sequences, on_eval,
              evaluate_start)
    if stop_at_step is not None:
        if not 0 <= stop_at_step <= run.num_steps:
            raise ValueError(f"stop_at_step {stop_at_step} is outside 0..{run.num_steps}")
        run.last_step = stop_at_step
    stream = _BatchStream(train_batches, config.batch_size, config.seq_len)
    stream.skip(run.data_position)
    result = run.train(stream, val_sequences, on_eval, on_checkpoint, on_step)
    return dataclasses.replace(result, device=where, param_dtype=param_dtype, compute_dtype=compute_dtype)


def _precision(model: PreTrainedModel, config: DistillConfig, device: torch.device) -> tuple[str, str, str]:
    """What the run trains with, as DistillResult records it: device, parameter dtype(s), compute dtype."""
    params = "+".join(sorted(_dtype_name(d) for d in _trainable_dtypes(model))) or "none"
    compute = "bfloat16" if config.dtype == "bf16" else params
    return str(device), params, compute


class _Run:
    """The live state of one run; `train` is the loop, everything else is a step of it."""

    def __init__(self, student: torch.nn.Module, model: PreTrainedModel, objective: torch.nn.Module,
                 config: DistillConfig, device: torch.device, teacher: PreTrainedModel | None,
                 cache: LogitCache | None) -> None:
        self.student, self.model, self.objective, self.config = student, model, objective, config
        self.sharded = is_sharded(model)
        self.device, self.teacher, self.cache = device, teacher, cache
        self.tokens_per_step = config.tokens_per_step(_world_size())
        self.num_steps = config.num_steps(_world_size())
        every = config.eval_every_tokens // self.tokens_per_step if config.eval_every_tokens else self.num_steps
        self.eval_every_steps = max(1, every)
        self.optimizer = _optimizer(model, objective, config, device)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, _schedule(config, self.num_steps))
        self.autocast = _autocast(config, device)
        self.step = self.data_position = 0
        self.last_step = self.num_steps  # where this call stops (stop_at_step); the schedule spans num_steps
        self.curve: list[EvalPoint] = []
        self.loss_sum, self.loss_count = 0.0, 0
        self.wall_s_before = 0.0
        self.resumed_from: int | None = None
        self.started = time.perf_counter()
        self.checkpoint_dir: Path | None = None  # where this rank writes (None off rank 0)
        self.checkpointing = False  # whether the run checkpoints at all (the same on every rank)
        self.last_checkpoint_s = 0.0  # wall time of the last checkpoint (config.checkpoint_minutes)
        if config.grad_checkpointing:
            enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
            enable()

    def wall_s(self) -> float:
        return self.wall_s_before + time.perf_counter() - self.started

    def start(self, write_dir: Path | None, read_dir: Path | None, resume: bool, val: torch.Tensor,
              on_eval: Callable[[EvalPoint], None] | None, evaluate: bool = True) -> None:
        """Resume from the newest checkpoint, or validate at step 0 (refusing to overwrite old checkpoints)."""
        self.checkpoint_dir, self.checkpointing = write_dir, read_dir is not None
        latest = latest_checkpoint(read_dir)
        if latest is not None and not resume:
            raise UserError(f"checkpoint directory {str(read_dir)!r} already holds {latest.name}; "
                            f"pass --resume to continue it, or choose another directory.")
        if latest is not None:
            state = load_checkpoint(latest, self.model, self.objective, self.optimizer, self.scheduler,
                                    self.config.fingerprint())
            self.step, self.data_position = int(state["step"]), int(state["data_position"])
            self.curve = [EvalPoint.from_dict(p) for p in state["curve"]]
            self.loss_sum, self.loss_count = float(state["loss_sum"]), int(state["loss_count"])
            self.wall_s_before, self.resumed_from = float(state["wall_s"]), self.step
            self.last_checkpoint_s = self.wall_s_before
            return
        if not evaluate:
            return
        point = self._evaluate(val)
        if on_eval is not None:
            on_eval(point)

    def _evaluate(self, val: torch.Tensor) -> EvalPoint:
        val = val[: self.config.num_val_sequences]
        loss_seq, kl_seq = validate_sequences(self.student, val, self.teacher, self.cache, self.config.batch_size,
                                              self.autocast, self.config.loss_chunk_tokens)
        val_loss, val_kl = float(loss_seq.mean()), float(kl_seq.mean())
        train_loss = self.loss_sum / self.loss_count if self.loss_count else math.nan
        val_loss, val_kl, train_loss = _same_on_all_ranks(val_loss, val_kl, train_loss, self.device)
        self.loss_sum, self.loss_count = 0.0, 0
        point = EvalPoint(self.step, self.step * self.tokens_per_step, val_loss, val_kl, train_loss, self.wall_s(),
                          val_loss_seq=tuple(loss_seq.tolist()), val_kl_seq=tuple(kl_seq.tolist()))
        self.curve.append(point)
        return point

    def _checkpoint(self, on_checkpoint: Callable[[Path], None] | None) -> None:
        full: dict[str, Any] = {}
        if self.sharded and self.checkpointing:  # a collective: every rank gathers, rank 0 receives
            full = {"student_state": full_student_state(self.model),
                    "optimizer_state": full_optimizer_state(self.model, self.objective, self.optimizer)}
        if self.checkpoint_dir is None:
            return
        state = {
            "step": self.step,
            "num_tokens": self.step * self.tokens_per_step,
            "data_position": self.data_position,
            "curve": [p.to_dict() for p in self.curve],
            "loss_sum": self.loss_sum,
            "loss_count": self.loss_count,
            "wall_s": self.wall_s(),
            "config_fingerprint": self.config.fingerprint(),
            "config": self.config.to_dict(),
            "student": student_identity(self.model),
        }
        path = save_checkpoint(self.checkpoint_dir, self.step, self.model, self.objective, self.optimizer,
                               self.scheduler, state, self.config.keep_last_k, **full)
        self.last_checkpoint_s = self.wall_s()
        if on_checkpoint is not None:
            on_checkpoint(path)

    def _checkpoint_due(self) -> bool:
        """Whether `checkpoint_minutes` of wall time passed since the last checkpoint; rank 0's clock decides
        (a sharded checkpoint is a collective: every rank must take the same branch)."""
        if not (self.checkpointing and self.config.checkpoint_minutes):
            return False
        due = torch.tensor([float(self.wall_s() - self.last_checkpoint_s >= 60 * self.config.checkpoint_minutes)])
        if _world_size() > 1:
            due = due.to(self.device)
            dist.broadcast(due, src=0)
        return bool(due.item())

    def _train_step(self, stream: _BatchStream) -> float:
        """One optimizer step over grad_accum micro-batches; returns the mean loss."""
        self.student.train()
        total = 0.0
        for _ in range(self.config.grad_accum):
            tokens = stream.next().to(self.device)  # [B, T]
            with self.autocast():
                loss, _parts = self.objective(self.student, tokens, self.teacher, self.cache)
            value = float(loss.detach())
            if not math.isfinite(value):
                self.optimizer.zero_grad(set_to_none=True)
                raise NonFiniteLossError(self.step + 1, value)
            (loss / self.config.grad_accum).backward()
            total += value
        _all_reduce_grads(self.objective)  # DDP syncs the student's gradients, not the projection's
        if self.config.clip_norm:
            params = [p for group in self.optimizer.param_groups for p in group["params"]]
            clip = clip_grad_norm_ if self.sharded else torch.nn.utils.clip_grad_norm_  # the global norm of shards
            clip(params, self.config.clip_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.data_position = stream.position
        return total / self.config.grad_accum

    def train(self, stream: _BatchStream, val: torch.Tensor, on_eval: Callable[[EvalPoint], None] | None,
              on_checkpoint: Callable[[Path], None] | None,
              on_step: Callable[[StepInfo], None] | None) -> DistillResult:
        while self.step < self.last_step:
            lr = self.optimizer.param_groups[0]["lr"]
            loss = self._train_step(stream)
            self.step += 1
            self.loss_sum += loss
            self.loss_count += 1
            if on_step is not None:
                on_step(StepInfo(self.step, self.step * self.tokens_per_step, loss, lr, self.wall_s()))
            if self.step % self.eval_every_steps == 0 or self.step in (self.num_steps, self.last_step):
                point = self._evaluate(val)
                self._checkpoint(on_checkpoint)  # before on_eval, so that a search trial reports both together
                if on_eval is not None:
                    on_eval(point)
            elif self._checkpoint_due():  # between validations (long full distillations): no eval point to pair
                self._checkpoint(None)
        if not self.curve:  # evaluate_start=False and no step taken: validate once so the result has a point
            self.curve.append(self._evaluate(val))
        last = self.curve[-1]
        return DistillResult(
            curve=tuple(self.curve),
            val_loss=last.val_loss,
            val_kl=last.val_kl,
            num_tokens=self.step * self.tokens_per_step,
            num_steps=self.step,
            wall_s=self.wall_s(),
            resumed_from_step=self.resumed_from,
        )
