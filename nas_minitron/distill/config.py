"""Records of a distillation run: its settings, its validation points, its result. Stdlib only; JSON, never pickle."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass
from typing import Any

from nas_minitron.errors import UserError

__all__ = ["DTYPES", "GRAD_CHECKPOINTING_PARAMS", "IS_LOSSES", "MASTER_WEIGHTS", "DistillConfig", "DistillResult",
           "EvalPoint", "NonFiniteLossError", "StepInfo"]

DTYPES = ("float32", "bf16")
IS_LOSSES = ("none", "cosine", "mse")
MASTER_WEIGHTS = ("fp32", "model")
# Fields that do not change the training trajectory; a resumed run may change them. The loss chunk changes only
# float rounding (so a run that ran out of memory may resume with a smaller one).
_NOT_FINGERPRINTED = ("keep_last_k", "num_val_sequences", "eval_every_tokens", "loss_chunk_tokens",
                      "checkpoint_minutes")
# Fields added after checkpoints existed: left out of the fingerprint at their default, so that a checkpoint written
# before they existed (whose run behaved as the default does on a float32 student) still resumes.
_FINGERPRINTED_UNLESS_DEFAULT = {"master_weights": "fp32"}


class NonFiniteLossError(RuntimeError):
    """A NaN or Inf loss: training stops at once; a search trial is marked failed, not retried."""

    def __init__(self, step: int, loss: float) -> None:
        super().__init__(f"non-finite loss {loss} at step {step}; training stopped")
        self.step = step
        self.loss = loss


GRAD_CHECKPOINTING_PARAMS = 10**9  # students this large recompute activations in the full distillation


@dataclass(frozen=True)
class DistillConfig:
    """Settings of one distillation run. Steps consume batch_size * grad_accum * seq_len tokens per worker."""

    num_tokens: int
    """token budget of the whole run (all workers together)"""
    seq_len: int = 256
    """tokens per sequence"""
    batch_size: int = 4
    """sequences per micro-batch"""
    grad_accum: int = 1
    """micro-batches per optimizer step"""
    lr: float = 1e-4
    """peak AdamW learning rate"""
    min_lr_ratio: float = 0.1
    """the cosine schedule decays to lr * min_lr_ratio"""
    warmup_fraction: float = 0.05
    """linear warmup over this fraction of the steps (ignored when warmup_steps is set)"""
    warmup_steps: int | None = None
    """linear warmup over exactly this many steps"""
    weight_decay: float = 0.01
    """AdamW decoupled weight decay on matrices (not on norms or biases)"""
    clip_norm: float = 1.0
    """global gradient-norm clip (0 = off)"""
    temperature: float = 1.0
    """KD softmax temperature; the KL is scaled by T^2"""
    kd_weight: float = 1.0
    """weight of KL(teacher || student) on logits"""
    lm_weight: float = 0.0
    """weight of the student's own next-token loss"""
    is_loss: str = "none"
    """intermediate-state loss between mapped layers: none, cosine or mse"""
    is_alpha: float | None = None
    """fixed weight of the intermediate-state loss; None = automatic L_logits / L_is (detached)"""
    topk: int = 0
    """sparse KD on the teacher's top-k log-probs plus a rest bucket (0 = full logits)"""
    eval_every_tokens: int = 0
    """validate (and checkpoint) every this many tokens; 0 = only at the start and the end"""
    num_val_sequences: int = 16
    """held-out sequences used for validation"""
    seed: int = 0
    """seeds torch, numpy and random at the start"""
    dtype: str = "float32"
    """float32, or bf16 autocast (the default on CUDA is the caller's choice)"""
    grad_checkpointing: bool = False
    """recompute activations in backward to save memory"""
    keep_last_k: int = 2
    """checkpoints kept on disk"""
    master_weights: str = "fp32"
    """fp32: the student's trainable parameters (hence gradients and AdamW state) are held in float32, cast once
    at the start when they are lower precision; compute follows `dtype` (bf16 autocast). model: keep the
    parameters' own dtype (pure bf16 training for a bf16 student: small updates round away; kept for comparison)"""
    loss_chunk_tokens: int = 1024
    """token positions per chunk of the KD and LM losses: no float32 tensor larger than chunk x vocab exists, and
    each chunk's logits are recomputed in backward. 1024 keeps one float32 chunk at 0.5 GB for a 128k vocabulary
    (a few such tensors live at once) while each chunk's head matmul stays large enough to fill a GPU; any value
    gives the same losses up to float rounding"""
    checkpoint_minutes: float = 0.0
    """also checkpoint every this many minutes of wall time, rank 0's clock deciding for all ranks (0 = only at
    validation points); not part of the fingerprint: a resumed run may change it"""

    def __post_init__(self) -> None:
        problems = self.problems()
        if problems:
            raise UserError("invalid distillation settings: " + "; ".join(problems) + ".")

    def problems(self) -> list[str]:
        """Every invalid setting at once, each naming the value."""
        out = []
        for name in ("num_tokens", "seq_len", "batch_size", "grad_accum", "keep_last_k", "num_val_sequences"):
            if int(getattr(self, name)) < 1:
                out.append(f"{name} must be >= 1 but got {getattr(self, name)!r}")
        for name in ("lr", "temperature"):
            if not float(getattr(self, name)) > 0:
                out.append(f"{name} must be > 0 but got {getattr(self, name)!r}")
        if not 0 <= self.warmup_fraction < 1:
            out.append(f"warmup_fraction must be in [0, 1) but got {self.warmup_fraction!r}")
        if self.dtype not in DTYPES:
            out.append(f"dtype must be one of {DTYPES} but got {self.dtype!r}")
        if self.master_weights not in MASTER_WEIGHTS:
            out.append(f"master_weights must be one of {MASTER_WEIGHTS} but got {self.master_weights!r}")
        if int(self.loss_chunk_tokens) < 1:
            out.append(f"loss_chunk_tokens must be >= 1 but got {self.loss_chunk_tokens!r}")
        if self.is_loss not in IS_LOSSES:
            out.append(f"is_loss must be one of {IS_LOSSES} but got {self.is_loss!r}")
        if self.topk < 0 or self.eval_every_tokens < 0:
            out.append(f"topk and eval_every_tokens must be >= 0 but got {self.topk!r}, {self.eval_every_tokens!r}")
        if self.kd_weight < 0 or self.lm_weight < 0 or (self.kd_weight == 0 and self.lm_weight == 0):
            out.append(f"need kd_weight >= 0, lm_weight >= 0, not both 0; got {self.kd_weight!r}, {self.lm_weight!r}")
        return out

    @property
    def tokens_per_micro_batch(self) -> int:
        return self.batch_size * self.seq_len

    def tokens_per_step(self, world_size: int = 1) -> int:
        """Tokens one optimizer step consumes over all `world_size` workers."""
        return self.tokens_per_micro_batch * self.grad_accum * world_size

    def num_steps(self, world_size: int = 1) -> int:
        """Optimizer steps the token budget buys (at least one); the last one is always validated."""
        return max(1, self.num_tokens // self.tokens_per_step(world_size))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DistillConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})

    def fingerprint(self) -> str:
        """sha256 of the settings that shape the trajectory: a checkpoint resumes only under the same one."""
        data = {k: v for k, v in self.to_dict().items() if k not in _NOT_FINGERPRINTED}
        for name, default in _FINGERPRINTED_UNLESS_DEFAULT.items():
            if data[name] == default:
                del data[name]
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


@dataclass(frozen=True)
class StepInfo:
    """One optimizer step, for progress bars."""

    step: int
    num_tokens: int
    loss: float
    lr: float
    wall_s: float


@dataclass(frozen=True)
class EvalPoint:
    """One validation: held-out LM loss and KL to the teacher after `step` optimizer steps."""

    step: int
    num_tokens: int
    val_loss: float
    val_kl: float
    train_loss: float  # mean training loss since the previous point (NaN at step 0)
    wall_s: float
    # Per validation sequence (val_loss / val_kl are their means): the search's bootstrap intervals are drawn from
    # them. Empty in points recorded before they were kept.
    val_loss_seq: tuple[float, ...] = ()
    val_kl_seq: tuple[float, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in dataclasses.asdict(self).items():
            out[key] = [_json_float(v) for v in value] if isinstance(value, (tuple, list)) else _json_float(value)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EvalPoint:
        names = {f.name for f in dataclasses.fields(cls)}
        values: dict[str, Any] = {}
        for key, value in data.items():
            if key not in names:
                continue
            if isinstance(value, (list, tuple)):
                values[key] = tuple(math.nan if v is None else float(v) for v in value)
            else:
                values[key] = math.nan if value is None else value
        return cls(**values)


@dataclass(frozen=True)
class DistillResult:
    """A finished run: its validation curve (step 0 first) and final metrics."""

    curve: tuple[EvalPoint, ...]
    val_loss: float
    val_kl: float
    num_tokens: int
    num_steps: int
    wall_s: float
    resumed_from_step: int | None = None
    device: str | None = None
    """where the student trained, e.g. `cpu`, `cuda:0` (None in records written before it was recorded)"""
    param_dtype: str | None = None
    """dtype of the student's trainable parameters while training (`float32` with fp32 master weights)"""
    compute_dtype: str | None = None
    """dtype of the forward/backward matmuls: `bfloat16` under bf16 autocast, else the parameters' dtype"""

    def to_dict(self) -> dict[str, Any]:
        return {
            "num_tokens": self.num_tokens,
            "num_steps": self.num_steps,
            "val_loss": _json_float(self.val_loss),
            "val_kl": _json_float(self.val_kl),
            "wall_s": self.wall_s,
            "resumed_from_step": self.resumed_from_step,
            "device": self.device,
            "param_dtype": self.param_dtype,
            "compute_dtype": self.compute_dtype,
            "curve": [p.to_dict() for p in self.curve],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DistillResult:
        """The inverse of `to_dict` (extra keys, such as a distill.json's provenance, are ignored)."""
        return cls(
            curve=tuple(EvalPoint.from_dict(p) for p in data["curve"]),
            val_loss=math.nan if data["val_loss"] is None else data["val_loss"],
            val_kl=math.nan if data["val_kl"] is None else data["val_kl"],
            num_tokens=data["num_tokens"],
            num_steps=data["num_steps"],
            wall_s=data["wall_s"],
            resumed_from_step=data.get("resumed_from_step"),
            device=data.get("device"),
            param_dtype=data.get("param_dtype"),
            compute_dtype=data.get("compute_dtype"),
        )


def _json_float(value: Any) -> Any:
    """JSON has no NaN: write null."""
    return None if isinstance(value, float) and not math.isfinite(value) else value
