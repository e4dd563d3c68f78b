"""Structured pruning: score every unit of a teacher, choose what to keep, cut the student out.

- `scores`: `ImportanceScores`, one score per head / neuron / channel / layer from any criterion.
- `importance`: activation importance (Minitron) from calibration data; `lm_loss`: LM loss, also with layers skipped.
- `baselines`: weight-magnitude and seeded-random scores.
- `keep`: `KeepIndices` and their selection from scores; `surgery`: teacher + keep indices -> a stock HF model;
  `sliced`: the same model read slice by slice from the teacher's safetensors files, never loading the teacher.
- `plan`: `PruningPlan` (`pruning.json`); `student`: `build_student`, the one way a student is built.

May import the leaf modules (arch, errors, runtime, teacher, _lazy), families and `distill.losses` (the one
next-token loss); torch and transformers load lazily, on first use. The function `lm_loss` is not re-exported:
it would shadow its module `nas_minitron.prune.lm_loss` as an attribute of this package.
"""

from __future__ import annotations

from nas_minitron.prune.baselines import CRITERIA, magnitude_scores, random_scores
from nas_minitron.prune.importance import (
    BATCH_AGGS,
    HEAD_METRICS,
    REUSE_KEYS,
    SEQ_AGGS,
    check_aggregations,
    compute_importance,
    importance_hooks,
    reusable_scores,
)
from nas_minitron.prune.keep import DEPTH_METHODS, KeepIndices, keep_all, keep_from_scores
from nas_minitron.prune.lm_loss import batch_losses, removal_losses, skipped_layers, token_loss_sum
from nas_minitron.prune.plan import PLAN_FILE, PruningPlan, plan_for, save_student, target_arch
from nas_minitron.prune.scores import ImportanceScores
from nas_minitron.prune.sliced import is_safetensors_dir, slice_student
from nas_minitron.prune.student import build_student
from nas_minitron.prune.surgery import check_target, materialize

__all__ = [
    "BATCH_AGGS",
    "CRITERIA",
    "DEPTH_METHODS",
    "HEAD_METRICS",
    "PLAN_FILE",
    "REUSE_KEYS",
    "SEQ_AGGS",
    "ImportanceScores",
    "KeepIndices",
    "PruningPlan",
    "batch_losses",
    "build_student",
    "check_aggregations",
    "check_target",
    "compute_importance",
    "importance_hooks",
    "is_safetensors_dir",
    "keep_all",
    "keep_from_scores",
    "magnitude_scores",
    "materialize",
    "plan_for",
    "random_scores",
    "removal_losses",
    "reusable_scores",
    "save_student",
    "skipped_layers",
    "slice_student",
    "target_arch",
    "token_loss_sum",
]
