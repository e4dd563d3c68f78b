"""The retrofit's settings and schedule (stdlib only): three stages, the fade-out multiplier, the target-CR ramp.

Stages over the optimizer steps 0 .. total-1 (`RetrofitConfig.stage_steps`):
1. fade: stock attention, the decision channels multiplied by max(0, 1 - step / (0.8 * fade_steps)); no penalty.
2. retrofit: DMC attention (decision channels zeroed), the target CR ramped linearly from 1 (exclusive) to the final
   CR, reached on the stage's last step.
3. fine-tune: DMC attention at the final CR.
The penalty's prior is 1 - 1/CR: the mean merge decision a ratio CR needs.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field

from nas_minitron.dmc.settings import DMCSettings, check_target_cr
from nas_minitron.errors import UserError

__all__ = ["LOSSES", "RetrofitConfig", "StagePoint", "prior_for_cr"]

LOSSES = ("kd", "lm")
_NOT_FINGERPRINTED = ("keep_last_k", "checkpoint_every_steps")


def prior_for_cr(cr: float) -> float:
    """Mean merge decision (alpha) of a compression ratio: 1 - 1/CR."""
    return 1.0 - 1.0 / cr


@dataclass(frozen=True)
class StagePoint:
    """Where one step is: its stage (1, 2, 3), the decision-channel multiplier and the target CR."""

    stage: int
    channel_scale: float
    target_cr: float

    @property
    def prior(self) -> float:
        return prior_for_cr(self.target_cr)


@dataclass(frozen=True)
class RetrofitConfig:
    """One DMC retrofit run. Validates itself; `problems` are raised together as one UserError line."""

    target_cr: float
    num_tokens: int
    seq_len: int = 256
    batch_size: int = 4
    grad_accum: int = 1
    lr: float = 1e-4
    warmup_fraction: float = 0.05
    fade_fraction: float = 0.1
    """Share of the steps in stage 1 (the paper: ~250 steps)."""
    finetune_fraction: float = 0.2
    """Share of the steps in stage 3, at the final CR."""
    loss: str = "kd"
    """'kd': forward KL to the uncompressed teacher; 'lm': next-token cross entropy."""
    kd_temperature: float = 1.0
    penalty_weight: float = 1.0
    decision_lr_scale: float = 1.0
    """Multiplier of the optimizer's update of the decision channels' projection rows (q[-1], k[-1] of every head and
    their norm weights): past stage 1 those rows feed only the decisions and merge weights, so a larger step there
    changes nothing else in the model. 1: the paper (one learning rate, billions of tokens)."""
    reset_decision_rows: bool = False
    """Zero the decision channels' projection rows (and biases) when stage 2 begins, so every head starts from
    logit = -offset (alpha ~ 0.007) instead of what the pretrained channel held (on SmolLM2 a quarter of some
    layers' keys already have k[-1] > 5 and merge from the first step); the channel plays no part in attention after
    the fade, so nothing else changes."""
    seed: int = 0
    dtype: str = "float32"
    settings: DMCSettings = field(default_factory=DMCSettings)
    checkpoint_every_steps: int = 0
    """0: a tenth of the steps."""
    keep_last_k: int = 2

    def __post_init__(self) -> None:
        check_target_cr(self.target_cr)
        problems = []
        if self.loss not in LOSSES:
            problems.append(f"loss {self.loss!r} is not one of {', '.join(LOSSES)}")
        for name in ("seq_len", "batch_size", "grad_accum", "keep_last_k"):
            if getattr(self, name) < 1:
                problems.append(f"{name} {getattr(self, name)!r} must be >= 1")
        if not (self.fade_fraction >= 0 and self.finetune_fraction >= 0 and self.fade_fraction
                + self.finetune_fraction < 1):
            problems.append(f"fade_fraction {self.fade_fraction!r} + finetune_fraction {self.finetune_fraction!r} "
                            f"must be >= 0 each and leave room for the retrofit stage (sum < 1)")
        if not self.decision_lr_scale > 0:
            problems.append(f"decision_lr_scale {self.decision_lr_scale!r} must be > 0")
        if not self.lr > 0:
            problems.append(f"lr {self.lr!r} must be > 0")
        if self.dtype not in ("float32", "bf16"):
            problems.append(f"dtype {self.dtype!r} must be float32 or bf16")
        if self.num_tokens < self.tokens_per_step:
            problems.append(f"--tokens {self.num_tokens} is less than one optimizer step of {self.tokens_per_step} "
                            f"tokens (seq_len x batch_size x grad_accum)")
        if problems:
            raise UserError("invalid DMC retrofit settings: " + "; ".join(problems) + ".")

    @property
    def tokens_per_step(self) -> int:
        return self.seq_len * self.batch_size * self.grad_accum

    @property
    def total_steps(self) -> int:
        return self.num_tokens // self.tokens_per_step

    def stage_steps(self) -> tuple[int, int, int]:
        """Steps in stage 1, 2 and 3 (stage 2 gets at least one step)."""
        total = self.total_steps
        fade = round(self.fade_fraction * total)
        finetune = round(self.finetune_fraction * total)
        while fade + finetune >= total and (fade or finetune):
            if finetune:
                finetune -= 1
            else:
                fade -= 1
        return fade, total - fade - finetune, finetune

    def point(self, step: int) -> StagePoint:
        """The stage, channel multiplier and target CR of optimizer step `step` (0-based)."""
        fade, retrofit, _finetune = self.stage_steps()
        if step < fade:
            return StagePoint(1, max(0.0, 1.0 - step / (0.8 * fade)), 1.0)
        if step < fade + retrofit:
            ramp = (step - fade + 1) / retrofit
            return StagePoint(2, 0.0, 1.0 + (self.target_cr - 1.0) * ramp)
        return StagePoint(3, 0.0, self.target_cr)

    def to_dict(self) -> dict[str, object]:
        return asdict(self)

    def fingerprint(self) -> str:
        """sha256 of everything that shapes the trajectory: a checkpoint resumes only under the same one."""
        data = {k: v for k, v in self.to_dict().items() if k not in _NOT_FINGERPRINTED}
        for name, default in (("decision_lr_scale", 1.0), ("reset_decision_rows", False)):
            if data[name] == default:  # their defaults leave the fingerprints of earlier checkpoints unchanged
                del data[name]
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()
