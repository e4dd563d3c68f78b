"""Real model: a short distillation of SmolLM2-135M into a magnitude-pruned student lowers KL and LM loss."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.slow


def test_short_distillation_of_smollm2_lowers_validation_kl_and_loss() -> None:
    from nas_minitron.arch import ArchConfig
    from nas_minitron.data import take_sequences
    from nas_minitron.distill.trainer import DistillConfig, distill
    from nas_minitron.families import describe_model
    from nas_minitron.prune.baselines import magnitude_scores
    from nas_minitron.prune.keep import keep_from_scores
    from nas_minitron.prune.surgery import materialize
    from nas_minitron.teacher import load_teacher

    teacher, tokenizer = load_teacher("smollm2-135m")
    _family, t_arch = describe_model(teacher)
    target = ArchConfig.parse("L18-H576-I1536-A9-KV3", t_arch.head_dim)
    student = materialize(teacher, target, keep_from_scores(magnitude_scores(teacher), t_arch, target))
    train = take_sequences("builtin", tokenizer, "train", 128, 32)
    val = take_sequences("builtin", tokenizer, "validation", 128, 4)
    config = DistillConfig(num_tokens=2 * 128 * 12, seq_len=128, batch_size=2, lr=2e-4, warmup_steps=2,
                           eval_every_tokens=2 * 128 * 6, num_val_sequences=4)
    result = distill(student, train, val, config, teacher=teacher)
    start, end = result.curve[0], result.curve[-1]
    assert end.step == 12
    assert end.val_kl < 0.8 * start.val_kl
    assert end.val_loss < start.val_loss
