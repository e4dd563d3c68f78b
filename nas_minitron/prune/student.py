"""The one way a student is built: teacher + target arch + scores → (student model, its PruningPlan).

Trials, winners, `nas-minitron prune` and the tests all call `build_student`, so a winner is the very model its
trial scored (same kept indices, same depth method, same norm rescaling), not a re-derivation with other defaults.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from nas_minitron.arch import ArchConfig
from nas_minitron.prune.plan import PruningPlan, plan_for
from nas_minitron.prune.scores import ImportanceScores
from nas_minitron.prune.surgery import materialize

if TYPE_CHECKING:
    from transformers import PreTrainedModel

__all__ = ["build_student"]


def build_student(
    teacher: PreTrainedModel,
    teacher_spec: str,
    arch: ArchConfig,
    scores: ImportanceScores | None = None,
    *,
    plan: PruningPlan | None = None,
    depth_method: str = "auto",
    rescale_norms: bool = True,
    importance_dir: str | None = None,
) -> tuple[PreTrainedModel, PruningPlan]:
    """Choose kept indices from `scores` (or take them from `plan`) and cut the student out of `teacher`.

    The student's parameter count equals `plan.params` (counted from the config alone); UserError when the scores
    do not fit the teacher or the depth method cannot choose layers.
    """
    if plan is None:
        if scores is None:
            raise ValueError("build_student needs importance scores or a pruning plan")
        plan = plan_for(teacher, teacher_spec, arch, scores, depth_method=depth_method, rescale_norms=rescale_norms,
                        importance_dir=importance_dir)
    student = materialize(teacher, plan.arch, plan.keep, rescale_norms=plan.rescale_norms)
    return student, plan
