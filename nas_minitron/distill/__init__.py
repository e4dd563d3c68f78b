"""Distillation: a student learns its teacher's logits within a token budget, resumably, on one or many workers.

- `config`: the run's settings, validation points and result (`DistillConfig`, `EvalPoint`, `DistillResult`).
- `losses`: forward KL (full or top-k + rest bucket), the intermediate-state loss, the next-token LM loss.
- `objective`: what one step minimizes and how a student is validated.
- `trainer`: `distill()`, the single-process loop with checkpoint/resume (`checkpoint`), DDP- and FSDP2-aware
  (`fsdp`).
- `logit_cache`: the teacher's top-k log-probs computed once, shared by every trial of a search.
- `result`: `save_distilled`, the one writer of a distilled student and its `distill.json`.
- `ray_train`: `distill_ray()`, the same loop as a Ray Train job; the only module here that imports ray.

Imports project modules and, lazily (`nas_minitron._lazy`), torch, numpy, safetensors, transformers and ray:
importing this package loads none of them.
"""

from nas_minitron.distill.config import DistillConfig, DistillResult, EvalPoint, NonFiniteLossError, StepInfo
from nas_minitron.distill.logit_cache import LogitCache, build_logit_cache
from nas_minitron.distill.losses import forward_kl, next_token_loss, topk_forward_kl
from nas_minitron.distill.ray_train import distill_ray
from nas_minitron.distill.result import distill_record, save_distilled
from nas_minitron.distill.trainer import distill

__all__ = [
    "DistillConfig",
    "DistillResult",
    "EvalPoint",
    "LogitCache",
    "NonFiniteLossError",
    "StepInfo",
    "build_logit_cache",
    "distill",
    "distill_ray",
    "distill_record",
    "forward_kl",
    "next_token_loss",
    "save_distilled",
    "topk_forward_kl",
]
