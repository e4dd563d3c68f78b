"""`build_student`, the one way a student is made: trials, winners and `prune` get one model from the same inputs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, PreTrainedModel

from nas_minitron.arch import ArchConfig, count_params
from nas_minitron.distill.config import DistillConfig
from nas_minitron.families import describe_model
from nas_minitron.prune.baselines import magnitude_scores
from nas_minitron.prune.keep import keep_from_scores
from nas_minitron.prune.plan import PruningPlan
from nas_minitron.prune.student import build_student
from nas_minitron.prune.surgery import materialize
from nas_minitron.search.protocol import TrialSpec
from nas_minitron.search.worker import _student

ARCH = "L2-H48-I64-A2-KV1"  # fewer channels than the teacher: norm rescaling changes the weights


def _same(a: PreTrainedModel, b: PreTrainedModel) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_counts_and_matches_the_surgery_it_stands_for(tiny_teacher_dir: Path) -> None:
    teacher = AutoModelForCausalLM.from_pretrained(tiny_teacher_dir)
    family, t_arch = describe_model(teacher)
    arch = ArchConfig.parse(ARCH, t_arch.head_dim)
    scores = magnitude_scores(teacher)
    student, plan = build_student(teacher, str(tiny_teacher_dir), arch, scores)
    expected = count_params(arch, family.invariants_from_config(teacher.config.to_dict()))
    assert plan.params == expected == sum(p.numel() for p in student.parameters())
    by_hand = materialize(teacher, arch, keep_from_scores(scores, t_arch, arch, "auto"), rescale_norms=True)
    assert _same(student, by_hand)


def test_a_saved_plan_rebuilds_the_same_student(tiny_teacher_dir: Path, tmp_path: Path) -> None:
    teacher = AutoModelForCausalLM.from_pretrained(tiny_teacher_dir)
    arch = ArchConfig.parse(ARCH, describe_model(teacher)[1].head_dim)
    student, plan = build_student(teacher, str(tiny_teacher_dir), arch, magnitude_scores(teacher),
                                  rescale_norms=False)
    (tmp_path / "pruning.json").write_text(json.dumps(plan.to_dict()))
    again, same_plan = build_student(teacher, str(tiny_teacher_dir), arch, plan=PruningPlan.load(tmp_path))
    assert same_plan == plan and _same(student, again)
    with pytest.raises(ValueError, match="scores or a pruning plan"):
        build_student(teacher, str(tiny_teacher_dir), arch)


@pytest.mark.parametrize("rescale_norms", [True, False])
def test_a_trial_builds_its_student_with_the_specs_options(
    rescale_norms: bool, tiny_teacher_dir: Path, tmp_path: Path
) -> None:
    """The trial's student is build_student with the TrialSpec's options (the winners stage passes the same spec)."""
    teacher = AutoModelForCausalLM.from_pretrained(tiny_teacher_dir)
    arch = ArchConfig.parse(ARCH, describe_model(teacher)[1].head_dim)
    scores = magnitude_scores(teacher)
    (tmp_path / "importance").mkdir()
    scores.save(tmp_path / "importance")
    spec = TrialSpec(run_dir=str(tmp_path), teacher_dir=str(tiny_teacher_dir),
                     importance_dir=str(tmp_path / "importance"), train_path="", val_path="", logit_cache_dir=None,
                     candidates=(ARCH,), head_dim=arch.head_dim,
                     distill=DistillConfig(num_tokens=64), rescale_norms=rescale_norms)
    trial_student = _student(ARCH, spec)
    winner, _ = build_student(teacher, "any", arch, scores, depth_method=spec.depth_method,
                              rescale_norms=spec.rescale_norms)
    other, _ = build_student(teacher, "any", arch, scores, rescale_norms=not rescale_norms)
    assert _same(trial_student, winner)
    assert not _same(trial_student, other)  # the option really reaches the surgery
