"""Pruning as one stage: teacher + arch + criterion → a saved student directory with its `pruning.json`.

`pruning.json` records everything needed to re-derive the same student from the same teacher: the target
arch, the kept indices per axis, the criterion and its settings.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nas_minitron.arch import ArchConfig, count_params
from nas_minitron.errors import UserError
from nas_minitron.families import describe
from nas_minitron.integrity import write_checksums
from nas_minitron.prune.keep import KeepIndices, keep_from_scores
from nas_minitron.prune.scores import ImportanceScores
from nas_minitron.prune.surgery import check_target

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

__all__ = ["PLAN_FILE", "PLAN_VERSION", "PruningPlan", "plan_for", "save_student", "target_arch"]

PLAN_FILE = "pruning.json"
PLAN_VERSION = 1


@dataclass(frozen=True)
class PruningPlan:
    """What a student is: teacher, target arch, kept indices and how they were chosen."""

    teacher: str
    teacher_arch: str
    arch: ArchConfig
    params: int
    criterion: str
    keep: KeepIndices
    rescale_norms: bool = True
    depth_method: str = "auto"
    seed: int | None = None
    importance_dir: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "format_version": PLAN_VERSION,
            "teacher": self.teacher,
            "teacher_arch": self.teacher_arch,
            "arch_name": self.arch.name,
            "arch": self.arch.to_dict(),
            "params": self.params,
            "criterion": self.criterion,
            "seed": self.seed,
            "importance_dir": self.importance_dir,
            "depth_method": self.depth_method,
            "rescale_norms": self.rescale_norms,
            "keep": self.keep.to_dict(),
        }

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> PruningPlan:
        file = Path(path)
        if file.is_dir():
            file = file / PLAN_FILE
        try:
            data = json.loads(file.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise UserError(f"cannot read pruning plan {str(file)!r}: {err}") from None
        if data.get("format_version") != PLAN_VERSION:
            raise UserError(f"pruning plan {str(file)!r} has format_version={data.get('format_version')!r}, "
                            f"expected {PLAN_VERSION}.")
        return cls(
            teacher=data["teacher"],
            teacher_arch=data["teacher_arch"],
            arch=ArchConfig.from_dict(data["arch"]),
            params=int(data["params"]),
            criterion=data["criterion"],
            keep=KeepIndices.from_dict(data["keep"]),
            rescale_norms=bool(data.get("rescale_norms", True)),
            depth_method=data.get("depth_method", "auto"),
            seed=data.get("seed"),
            importance_dir=data.get("importance_dir"),
        )


def target_arch(teacher_config: dict[str, Any], arch_name: str) -> ArchConfig:
    """Parse `arch_name` against a teacher config and refuse it unless it can be pruned and loaded."""
    family, teacher = describe(teacher_config)
    target = ArchConfig.parse(arch_name, head_dim=teacher.head_dim)
    check_target(family, teacher, target)
    return target


def plan_for(
    teacher: PreTrainedModel | Mapping[str, Any],
    teacher_spec: str,
    target: ArchConfig,
    scores: ImportanceScores,
    depth_method: str = "auto",
    rescale_norms: bool = True,
    importance_dir: str | None = None,
) -> PruningPlan:
    """Choose kept indices from `scores` (any criterion) for `target`.

    `teacher` is a model or just its config dict (`read_teacher_config`): choosing needs no weights.
    """
    config = dict(teacher) if isinstance(teacher, Mapping) else teacher.config.to_dict()
    family, t_arch = describe(config)
    expected = (t_arch.num_hidden_layers, t_arch.num_attention_heads, t_arch.intermediate_size, t_arch.hidden_size)
    got = (scores.heads.shape[0], scores.heads.shape[1], scores.neurons.shape[1], scores.channels.shape[0])
    if got != expected:
        raise UserError(
            f"importance scores are for a model with (layers, heads, intermediate, hidden)={got} but teacher "
            f"{teacher_spec!r} has {expected}; recompute them for this teacher."
        )
    try:
        keep = keep_from_scores(scores, t_arch, target, depth_method)
    except ValueError as err:
        raise UserError(f"cannot select layers with depth method {depth_method!r}: {err}.") from None
    return PruningPlan(
        teacher=teacher_spec,
        teacher_arch=t_arch.name,
        arch=target,
        params=count_params(target, family.invariants_from_config(config)),
        criterion=scores.criterion,
        keep=keep,
        rescale_norms=rescale_norms,
        depth_method=depth_method,
        seed=scores.meta.get("seed"),
        importance_dir=importance_dir,
    )


def save_student(
    student: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, plan: PruningPlan, directory: Path
) -> None:
    """Write a from_pretrained-loadable directory: weights, config, tokenizer, pruning.json and the checksums of
    them all (`nas_minitron.integrity`)."""
    student.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    (directory / PLAN_FILE).write_text(json.dumps(plan.to_dict(), indent=1) + "\n")
    write_checksums(directory)
