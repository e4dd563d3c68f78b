"""`nas-minitron prune` and `inspect` end to end in a subprocess, on tiny teachers of every family."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config

from nas_minitron.arch import ArchConfig, count_params
from nas_minitron.families import get_family
from tiny_models import FAMILIES


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "nas_minitron", *args], capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("model_type", FAMILIES)
def test_prune_writes_loadable_student_with_counted_params(
    model_type: str, tiny_teacher_dirs: dict[str, Path], tmp_path: Path
) -> None:
    arch = "L2-H48-I50-A2-KV1"
    out = tmp_path / "student"
    result = cli("prune", "--teacher", str(tiny_teacher_dirs[model_type]), "--arch", arch, "--out", str(out))
    assert result.returncode == 0, result.stderr
    student = AutoModelForCausalLM.from_pretrained(out)
    config = student.config.to_dict()
    family = get_family(model_type)
    expected = count_params(ArchConfig.parse(arch, 16), family.invariants_from_config(config))
    assert sum(p.numel() for p in student.parameters()) == expected
    plan = json.loads((out / "pruning.json").read_text())
    assert plan["arch_name"] == arch and plan["criterion"] == "magnitude" and plan["params"] == expected
    assert len(plan["keep"]["hidden"]) == 48 and len(plan["keep"]["layers"]) == 2
    assert (out / "tokenizer.json").is_file()

    shown = json.loads(cli("inspect", str(out), "--json").stdout)
    assert shown["family"] == model_type and shown["arch"] == arch
    assert shown["params"] == shown["weights_params"] == expected


def test_plan_rederives_the_same_student(tiny_teacher_dir: Path, tmp_path: Path) -> None:
    first, second = tmp_path / "a", tmp_path / "b"
    result = cli("prune", "--teacher", str(tiny_teacher_dir), "--arch", "L2-H40-I64-A2-KV2", "--criterion",
                 "random", "--seed", "7", "--out", str(first))
    assert result.returncode == 0, result.stderr
    result = cli("prune", "--plan", str(first / "pruning.json"), "--out", str(second))
    assert result.returncode == 0, result.stderr
    a = AutoModelForCausalLM.from_pretrained(first).state_dict()
    b = AutoModelForCausalLM.from_pretrained(second).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((first / "pruning.json").read_text()) == json.loads((second / "pruning.json").read_text())


def test_random_seeds_give_different_students(tiny_teacher_dir: Path, tmp_path: Path) -> None:
    plans = []
    for seed in ("1", "2"):
        out = tmp_path / seed
        assert cli("prune", "--teacher", str(tiny_teacher_dir), "--arch", "L3-H32-I48-A4-KV2", "--criterion",
                   "random", "--seed", seed, "--out", str(out)).returncode == 0
        plans.append(json.loads((out / "pruning.json").read_text())["keep"])
    assert plans[0]["hidden"] != plans[1]["hidden"]


def _gpt2_dir(tmp_path: Path) -> Path:
    config = GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50, bos_token_id=0, eos_token_id=0)
    config.save_pretrained(tmp_path / "gpt2")
    return tmp_path / "gpt2"


@pytest.mark.parametrize(
    ("case", "needle"),
    [
        ("larger", "H128 exceeds the teacher's H64"),
        ("kv", "valid KV counts: [1, 3]"),
        ("unloadable", "nearest loadable hidden sizes: H60 or H64"),
        ("family", "supported model types: llama, mistral, qwen2, qwen3"),
        ("missing", "not found"),
        ("badname", "arch name must look like"),
    ],
)
def test_bad_input_one_line_exit_2_no_output(case: str, needle: str, tiny_teacher_dir: Path, tmp_path: Path) -> None:
    teacher, arch = str(tiny_teacher_dir), "L2-H48-I50-A2-KV1"
    if case == "larger":
        arch = "L3-H128-I96-A4-KV2"
    elif case == "kv":
        arch = "L3-H64-I96-A3-KV2"
    elif case == "unloadable":
        arch = "L3-H62-I96-A4-KV2"
    elif case == "family":
        teacher = str(_gpt2_dir(tmp_path))
    elif case == "missing":
        teacher = str(tmp_path / "no-such-teacher")
    else:
        arch = "L3-H64"
    out = tmp_path / "out"
    result = cli("prune", "--teacher", teacher, "--arch", arch, "--out", str(out))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], result.stderr
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_existing_output_needs_overwrite(tiny_teacher_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    result = cli("prune", "--teacher", str(tiny_teacher_dir), "--arch", "L2-H48-I50-A2-KV1", "--out", str(out))
    assert result.returncode == 2 and "--overwrite" in result.stderr
    assert (out / "keep.txt").read_text() == "user data"
    result = cli("prune", "--teacher", str(tiny_teacher_dir), "--arch", "L2-H48-I50-A2-KV1", "--out", str(out),
                 "--overwrite")
    assert result.returncode == 0 and not (out / "keep.txt").exists() and (out / "pruning.json").exists()
