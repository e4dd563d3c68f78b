"""The foundation's acceptance checks on the real embedded teacher, SmolLM2-135M (slow: ~1 min)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from nas_minitron.families import describe_model
from nas_minitron.prune.keep import keep_all
from nas_minitron.prune.surgery import materialize
from nas_minitron.teacher import load_teacher

pytestmark = [pytest.mark.slow, pytest.mark.ci]


@pytest.fixture(scope="module")
def smollm2():  # type: ignore[no-untyped-def]
    return load_teacher("smollm2-135m")


def test_teacher_facts_and_identity(smollm2) -> None:  # type: ignore[no-untyped-def]
    teacher, tokenizer = smollm2
    _, arch = describe_model(teacher)
    assert arch.name == "L30-H576-I1536-A9-KV3"
    assert sum(p.numel() for p in teacher.parameters()) == 134_515_008
    student = materialize(teacher, arch, keep_all(arch))
    ids = tokenizer("The quick brown fox jumps over the lazy dog. def main():", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(student(ids).logits, teacher(ids).logits)


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "nas_minitron", *args], capture_output=True, text=True, timeout=600)


def test_mixed_prune_loads_with_counted_params(tmp_path: Path) -> None:
    out = tmp_path / "student"
    result = _cli("prune", "--teacher", "smollm2-135m", "--arch", "L24-H432-I1024-A6-KV3", "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert "65,049,264 parameters" in result.stdout
    student = AutoModelForCausalLM.from_pretrained(out)
    assert sum(p.numel() for p in student.parameters()) == 65_049_264


def test_unloadable_arch_is_refused(tmp_path: Path) -> None:
    out = tmp_path / "student"
    result = _cli("prune", "--teacher", "smollm2-135m", "--arch", "L24-H448-I1024-A9-KV3", "--out", str(out))
    assert result.returncode == 2 and "H441 or H450" in result.stderr
    assert not out.exists()
