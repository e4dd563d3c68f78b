"""Config-only parameter counts equal the built models', for every family, flag and pruning axis."""

from __future__ import annotations

import random

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from nas_minitron.arch import ArchConfig, count_params
from nas_minitron.families import describe_model, get_family
from nas_minitron.prune.baselines import random_scores
from nas_minitron.prune.keep import keep_from_scores
from nas_minitron.prune.surgery import materialize
from tiny_models import FAMILIES, tiny_model


def _random_config(model_type: str, rng: random.Random):  # type: ignore[no-untyped-def]
    kv = rng.choice([1, 2, 3, 4])
    heads = kv * rng.choice([1, 2, 3])
    head_dim = rng.choice([8, 16, 24, 64])
    hidden = heads * rng.randint(1, 24) if model_type == "llama" else rng.randint(8, 300)
    fields = dict(
        vocab_size=rng.randint(16, 3000),
        hidden_size=hidden,
        intermediate_size=rng.randint(1, 400),
        num_hidden_layers=rng.randint(1, 5),
        num_attention_heads=heads,
        num_key_value_heads=kv,
        head_dim=head_dim,
        tie_word_embeddings=rng.random() < 0.5,
    )
    if model_type == "llama":
        fields.update(attention_bias=rng.random() < 0.5, mlp_bias=rng.random() < 0.5)
    if model_type == "qwen3":
        fields.update(attention_bias=rng.random() < 0.5)
    return AutoConfig.for_model(model_type, **fields)


@pytest.mark.parametrize("model_type", FAMILIES)
def test_count_matches_built_model_for_random_configs(model_type: str) -> None:
    rng = random.Random(f"count-{model_type}")
    family = get_family(model_type)
    for _ in range(40):
        config = _random_config(model_type, rng)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
        data = config.to_dict()
        counted = count_params(family.arch_from_config(data), family.invariants_from_config(data))
        assert counted == sum(p.numel() for p in model.parameters()), config


AXES = {
    "layers": ArchConfig(2, 64, 96, 4, 2, 16),
    "hidden": ArchConfig(3, 40, 96, 4, 2, 16),
    "intermediate": ArchConfig(3, 64, 50, 4, 2, 16),
    "heads": ArchConfig(3, 64, 96, 2, 2, 16),
    "kv_groups": ArchConfig(3, 64, 96, 2, 1, 16),
    "all": ArchConfig(2, 48, 33, 2, 1, 16),
}


@pytest.mark.parametrize("axis", AXES)
@pytest.mark.parametrize("model_type", FAMILIES)
def test_pruned_student_count_matches(model_type: str, axis: str) -> None:
    teacher = tiny_model(model_type)
    family, t_arch = describe_model(teacher)
    target = AXES[axis]
    student = materialize(teacher, target, keep_from_scores(random_scores(t_arch, 1), t_arch, target))
    inv = family.invariants_from_config(teacher.config.to_dict())
    assert sum(p.numel() for p in student.parameters()) == count_params(target, inv)
    assert describe_model(student) == (family, target)
