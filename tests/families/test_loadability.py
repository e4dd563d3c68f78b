"""The adapters' loadability rule agrees with what the installed transformers accepts, family by family."""

from __future__ import annotations

import random

import pytest
from transformers import AutoModelForCausalLM

from nas_minitron.arch import ArchConfig
from nas_minitron.families import get_family
from tiny_models import FAMILIES, tiny_config


def _transformers_accepts(model_type: str, arch: ArchConfig, tmp_path) -> bool:  # type: ignore[no-untyped-def]
    try:
        config = tiny_config(model_type, vocab_size=64, **arch.to_dict())
        model = AutoModelForCausalLM.from_config(config)
        model.save_pretrained(tmp_path)
        AutoModelForCausalLM.from_pretrained(tmp_path)
    except Exception:  # huggingface_hub's StrictDataclassClassValidationError, or a ValueError
        return False
    return True


@pytest.mark.parametrize("model_type", FAMILIES)
def test_rule_matches_installed_transformers(model_type: str, tmp_path) -> None:  # type: ignore[no-untyped-def]
    family = get_family(model_type)
    rng = random.Random(model_type)
    cases = [ArchConfig(1, 448, 32, 9, 3, 64), ArchConfig(1, 576, 32, 9, 3, 64), ArchConfig(1, 100, 32, 4, 2, 16)]
    cases += [ArchConfig(1, rng.randint(8, 200), 16, h, 1, 8) for h in (3, 5, 6, 7) for _ in range(2)]
    for i, arch in enumerate(cases):
        accepted = _transformers_accepts(model_type, arch, tmp_path / str(i))
        assert accepted == (family.loadable_problem(arch) is None), (model_type, arch.name)


def test_llama_refusal_names_nearest_loadable_sizes() -> None:
    problem = get_family("llama").loadable_problem(ArchConfig(24, 448, 1024, 9, 3, 64))
    assert problem is not None and "H441 or H450" in problem
