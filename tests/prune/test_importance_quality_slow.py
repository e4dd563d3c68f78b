"""Real-model check (slow): on SmolLM2-135M, activation importance prunes better than magnitude and random."""

from __future__ import annotations

import pytest

from nas_minitron.arch import ArchConfig
from nas_minitron.data import take_sequences
from nas_minitron.families import describe_model
from nas_minitron.prune.baselines import magnitude_scores, random_scores
from nas_minitron.prune.importance import compute_importance
from nas_minitron.prune.keep import keep_from_scores
from nas_minitron.prune.lm_loss import lm_loss
from nas_minitron.prune.surgery import materialize
from nas_minitron.teacher import load_teacher


@pytest.mark.slow
def test_activation_beats_magnitude_and_random_on_the_mlp_axis() -> None:
    teacher, tokenizer = load_teacher("smollm2-135m")
    _, arch = describe_model(teacher)
    calib = take_sequences("builtin", tokenizer, "calibration", 128, 16)
    val = take_sequences("builtin", tokenizer, "validation", 128, 8)
    target = ArchConfig.parse("L30-H576-I768-A9-KV3", arch.head_dim)

    def pruned_loss(scores) -> float:  # type: ignore[no-untyped-def]
        return lm_loss(materialize(teacher, target, keep_from_scores(scores, arch, target)), val)

    activation = pruned_loss(compute_importance(teacher, calib, layer_metrics=False))
    magnitude = pruned_loss(magnitude_scores(teacher))
    random = pruned_loss(random_scores(arch, seed=0))
    assert activation < magnitude and activation < random, (activation, magnitude, random)
