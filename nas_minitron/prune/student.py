"""The one way a student is built: teacher + target arch + scores → (student model, its PruningPlan).

Trials, winners, `nas-minitron prune` and the tests all call `build_student`, so a winner is the very model its
trial scored (same kept indices, same depth method, same norm rescaling), not a re-derivation with other defaults.
The teacher is a loaded model (cut by `surgery.materialize`) or a safetensors directory (cut by
`sliced.slice_student`, reading only the kept slices of its files: the same student bit for bit, without ever
holding the teacher).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from nas_minitron.arch import ArchConfig
from nas_minitron.prune.plan import PruningPlan, plan_for
from nas_minitron.prune.scores import ImportanceScores
from nas_minitron.prune.sliced import slice_student
from nas_minitron.prune.surgery import materialize
from nas_minitron.teacher import read_teacher_config

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel

__all__ = ["build_student"]


def build_student(
    teacher: PreTrainedModel | str | os.PathLike[str],
    teacher_spec: str,
    arch: ArchConfig,
    scores: ImportanceScores | None = None,
    *,
    plan: PruningPlan | None = None,
    depth_method: str = "auto",
    rescale_norms: bool = True,
    importance_dir: str | None = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
) -> tuple[PreTrainedModel, PruningPlan]:
    """Choose kept indices from `scores` (or take them from `plan`) and cut the student out of `teacher`.

    `teacher` is a loaded model (the student is built in its dtype on its device) or the path of a local
    safetensors teacher directory (the student is read from its files in `dtype`, default the stored dtype, on
    `device`, default the CPU; only the teacher's config is loaded). `device` / `dtype` apply to a directory only.
    The student's parameter count equals `plan.params` (counted from the config alone); UserError when the scores
    do not fit the teacher or the depth method cannot choose layers.
    """
    if plan is None and scores is None:
        raise ValueError("build_student needs importance scores or a pruning plan")
    if not isinstance(teacher, str | os.PathLike):
        if device is not None or dtype is not None:
            raise ValueError("build_student: device= and dtype= apply to a teacher directory, not a loaded model")
        if plan is None:
            assert scores is not None
            plan = plan_for(teacher, teacher_spec, arch, scores, depth_method=depth_method,
                            rescale_norms=rescale_norms, importance_dir=importance_dir)
        return materialize(teacher, plan.arch, plan.keep, rescale_norms=plan.rescale_norms), plan
    config = read_teacher_config(os.fspath(teacher))
    if plan is None:
        assert scores is not None
        plan = plan_for(config, teacher_spec, arch, scores, depth_method=depth_method, rescale_norms=rescale_norms,
                        importance_dir=importance_dir)
    student = slice_student(teacher, plan.arch, plan.keep, rescale_norms=plan.rescale_norms, dtype=dtype,
                            device=device or "cpu", teacher_config=config)
    return student, plan
