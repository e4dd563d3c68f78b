"""Search spaces, presets and candidate enumeration: exact against published Minitron models, complete against
brute force on small spaces, and every emitted candidate allowed, loadable and in budget."""

from __future__ import annotations

import dataclasses
import itertools
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from nas_minitron.arch import ArchConfig, Budget, count_params, prune_problems
from nas_minitron.errors import UserError
from nas_minitron.families import describe, get_family
from nas_minitron.space.candidates import (
    CANDIDATE_COLUMNS,
    Candidate,
    axis_values,
    best_pure_depth,
    best_pure_width,
    budget_window,
    candidate_problem,
    count_combinations,
    default_space,
    enumerate_candidates,
    flops_per_token,
    kv_bytes_per_token,
)
from nas_minitron.space.presets import load_preset, preset_names, resolve_teacher_config
from nas_minitron.space.spaces import AXES, Axis, Constraints, SearchSpace, load_space, space_names, spaces_dir

PUBLISHED_PARAMS = {
    "llama-3.1-8b": 8_030_261_248,
    "mistral-nemo-12b": 12_247_782_400,
    "smollm2-135m": 134_515_008,
    "qwen2.5-7b": 7_615_616_512,  # published as 7.61B; this is the exact config-only count
}


def _teacher(name: str) -> tuple[dict, ArchConfig, int]:
    config = load_preset(name)
    family, arch = describe(config)
    return config, arch, count_params(arch, family.invariants_from_config(config))


# ---- presets ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(PUBLISHED_PARAMS))
def test_preset_counts_match_published(name: str) -> None:
    assert _teacher(name)[2] == PUBLISHED_PARAMS[name]


def test_smollm2_preset_facts() -> None:
    config, arch, _ = _teacher("smollm2-135m")
    assert config["architectures"] == ["LlamaForCausalLM"] and config["tie_word_embeddings"] is True
    assert arch == ArchConfig(30, 576, 1536, 9, 3, 64) and config["vocab_size"] == 49152


@pytest.mark.parametrize("name", preset_names())
def test_presets_read_the_same_through_transformers(name: str, tmp_path: Path) -> None:
    """A preset is a valid config.json: transformers reads it back to the same shape and invariants."""
    config = load_preset(name)
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    via_hf = resolve_teacher_config(str(path))
    family = get_family(config["model_type"])
    assert family.arch_from_config(via_hf) == family.arch_from_config(config)
    assert family.invariants_from_config(via_hf) == family.invariants_from_config(config)


def test_unknown_preset_lists_presets() -> None:
    with pytest.raises(UserError, match="llama-3.1-8b"):
        load_preset("llama-9")


# ---- exactness against published Minitron models -------------------------------------------------------------
@pytest.mark.parametrize("space_name", [None, "llama-3.1-8b"])
def test_llama_minitron_4b_width_and_depth(space_name: str | None) -> None:
    config = load_preset("llama-3.1-8b")
    space = default_space(config) if space_name is None else load_space(space_name, config)
    found = {c.name: c.params for c in enumerate_candidates(space, config, Budget.parse("4.5B").resolve(0), 0.01)}
    assert found["L32-H3072-I9216-A32-KV8"] == 4_512_746_496
    assert found["L16-H4096-I14336-A32-KV8"] == 4_540_469_248


@pytest.mark.parametrize("space_name", [None, "mistral-nemo-12b"])
def test_mn_minitron_8b(space_name: str | None) -> None:
    config = load_preset("mistral-nemo-12b")
    space = default_space(config) if space_name is None else load_space(space_name, config)
    found = {c.name: c.params for c in enumerate_candidates(space, config, 8_400_000_000)}
    assert found["L40-H4096-I11520-A32-KV8"] == 8_414_105_600


# ---- every candidate is allowed; nothing allowed is missed ------------------------------------------------------
def _spaces() -> list[tuple[str, SearchSpace, float]]:
    out = []
    for name in ("tiny", "smollm2-135m", "qwen2.5-7b", "llama-3.1-8b"):
        config = load_preset(name)
        out.append((name, default_space(config), 0.6))
        out.append((name, load_space(name, config), 0.75))
    return out


@pytest.mark.parametrize(("teacher", "space", "fraction"), _spaces(), ids=lambda v: getattr(v, "name", str(v)))
def test_every_candidate_is_exact_allowed_and_in_budget(teacher: str, space: SearchSpace, fraction: float) -> None:
    config, arch, params = _teacher(teacher)
    family = get_family(config["model_type"])
    budget = Budget(fraction=fraction).resolve(params)
    candidates = enumerate_candidates(space, config, budget)
    assert candidates
    lo, hi = budget_window(budget, space.tolerance)
    allowed = axis_values(space, arch)
    distances = [abs(c.distance_params) for c in candidates]
    assert distances == sorted(distances)
    for c in candidates:
        assert c.params == count_params(c.arch, family.invariants_from_config(config))
        assert family.loadable_problem(c.arch) is None
        assert prune_problems(c.arch, arch) == []
        assert c.arch.num_attention_heads % c.arch.num_key_value_heads == 0
        assert lo <= c.params <= hi and c.distance_params == c.params - budget
        assert all(getattr(c.arch, axis) in allowed[axis] for axis in AXES)
        assert c.arch != arch
        assert candidate_problem(c.arch, space, config, budget) is None


def _brute_force(space: SearchSpace, config: dict, budget: int) -> set[str]:
    _, teacher = describe(config)
    values = axis_values(space, teacher)
    names = set()
    for shape in itertools.product(*(values[axis] for axis in AXES)):
        if shape[3] % shape[4]:
            continue
        arch = ArchConfig(*shape, head_dim=teacher.head_dim)
        if candidate_problem(arch, space, config, budget) is None:
            names.add(arch.name)
    return names


@pytest.mark.parametrize("fraction", [0.3, 0.55, 0.9])
def test_enumeration_equals_brute_force_on_tiny(fraction: float) -> None:
    config, _, params = _teacher("tiny")
    for space in (default_space(config), load_space("tiny", config)):
        budget = Budget(fraction=fraction).resolve(params)
        expected = _brute_force(space, config, budget)
        try:
            got = {c.name for c in enumerate_candidates(space, config, budget)}
        except UserError:
            got = set()
        assert got == expected


@pytest.mark.parametrize("model_type", ["mistral", "qwen2", "qwen3"])
def test_enumeration_equals_brute_force_for_other_families(model_type: str) -> None:
    config = {**load_preset("tiny"), "model_type": model_type, "tie_word_embeddings": model_type != "mistral"}
    family = get_family(model_type)
    params = count_params(family.arch_from_config(config), family.invariants_from_config(config))
    space = default_space(config)
    candidates = enumerate_candidates(space, config, params // 2)
    assert {c.name for c in candidates} == _brute_force(space, config, params // 2)
    # these families load any hidden size: shapes a Llama config would refuse are candidates here
    assert any(c.arch.hidden_size % c.arch.num_attention_heads for c in candidates)


def test_enumeration_equals_brute_force_on_smollm2_space() -> None:
    config, _, _ = _teacher("smollm2-135m")
    space = dataclasses.replace(load_space("smollm2-135m", config), num_hidden_layers=Axis(values=(12, 20, 29)))
    got = {c.name for c in enumerate_candidates(space, config, 90_000_000)}
    assert got == _brute_force(space, config, 90_000_000) and len(got) > 10


def test_family_rules_decide_loadability() -> None:
    """Llama students keep hidden % heads == 0; Qwen2 students need not."""
    for name, must_divide in (("llama-3.1-8b", True), ("qwen2.5-7b", False)):
        config, _, params = _teacher(name)
        candidates = enumerate_candidates(default_space(config), config, params // 2)
        divides = {c.arch.hidden_size % c.arch.num_attention_heads == 0 for c in candidates}
        assert divides == ({True} if must_divide else {True, False})


def test_max_count_is_a_prefix() -> None:
    config, _, params = _teacher("smollm2-135m")
    space = default_space(config)
    full = enumerate_candidates(space, config, params // 2)
    assert enumerate_candidates(space, config, params // 2, max_count=7) == full[:7]


# ---- metrics and constraints -----------------------------------------------------------------------------------
def test_kv_bytes_and_flops_formulas() -> None:
    config, arch, params = _teacher("llama-3.1-8b")
    inv = get_family("llama").invariants_from_config(config)
    assert kv_bytes_per_token(arch) == 2 * 32 * 8 * 128 * 2
    # untied: the input embedding table is a lookup, the lm_head a matmul
    assert flops_per_token(arch, inv, seq_len=1000) == 2 * (params - 128256 * 4096) + 4 * 32 * 32 * 128 * 1000
    small, small_arch, small_params = _teacher("smollm2-135m")
    small_inv = get_family("llama").invariants_from_config(small)
    # tied: the shared table is the lm_head, so every parameter counts
    assert flops_per_token(small_arch, small_inv, seq_len=10) == 2 * small_params + 4 * 30 * 9 * 64 * 10


@pytest.mark.parametrize("limit", ["max_kv_bytes_per_token", "max_flops_per_token", "max_memory_bytes"])
def test_constraints_exclude_and_only_exclude(limit: str) -> None:
    config, _, params = _teacher("tiny")
    free = dataclasses.replace(default_space(config), constraints=Constraints(batch_size=2, seq_len=64))
    budget = params // 2
    unconstrained = enumerate_candidates(free, config, budget)
    metric = {
        "max_kv_bytes_per_token": lambda c: c.kv_bytes_per_token,
        "max_flops_per_token": lambda c: c.flops_per_token,
        "max_memory_bytes": lambda c: 2 * c.params + 2 * 64 * c.kv_bytes_per_token,
    }[limit]
    values = sorted(metric(c) for c in unconstrained)
    cap = values[len(values) // 2]
    space = dataclasses.replace(free, constraints=Constraints(**{limit: cap}, batch_size=2, seq_len=64))
    constrained = enumerate_candidates(space, config, budget)
    expected = [c.name for c in unconstrained if metric(c) <= cap]
    assert [c.name for c in constrained] == expected and 0 < len(expected) < len(unconstrained)


# ---- axes, default space, budgets -----------------------------------------------------------------------------
def test_axis_resolution() -> None:
    assert Axis(multiple_of=128, max_prune_ratio=0.5).resolve(1000) == [512, 640, 768, 896, 1000]
    assert Axis(multiple_of=1, max_prune_ratio=0.3).resolve(10) == [7, 8, 9, 10]  # 10 * 0.7 is 7.000000000000001
    assert Axis(multiple_of=4, min_value=3, max_value=12).resolve(16) == [4, 8, 12]
    assert Axis(values=(8, 2, 4, 32)).resolve(16) == [2, 4, 8]


def test_default_space_steps_and_bounds() -> None:
    config, arch, _ = _teacher("llama-3.1-8b")
    values = axis_values(default_space(config), arch)
    assert values["hidden_size"][:2] == [2048, 2176] and values["hidden_size"][-1] == 4096
    assert values["intermediate_size"][0] == 3584 and values["intermediate_size"][1] - 3584 == 256
    assert values["num_hidden_layers"] == list(range(16, 33))
    assert values["num_key_value_heads"] == [4, 8]
    assert count_combinations(default_space(config), arch) == 17 * 17 * 43 * 17 * 2


@pytest.mark.parametrize(
    ("text", "expected"),
    [("4B", 4_000_000_000), ("4.5e9", 4_500_000_000), ("500M", 500_000_000), ("90M", 90_000_000),
     ("0.5x", 4_015_130_624)],
)
def test_budget_parse(text: str, expected: int) -> None:
    assert Budget.parse(text).resolve(8_030_261_248) == expected


@pytest.mark.parametrize("text", ["4Q", "abc", "", "-1B", "1x", "0x", "1.5x", "0"])
def test_budget_parse_refuses(text: str) -> None:
    with pytest.raises(UserError, match="budget"):
        Budget.parse(text)


def test_budget_at_or_above_teacher() -> None:
    config, _, params = _teacher("tiny")
    for budget in (params, params + 1):
        with pytest.raises(UserError, match=f"below the teacher's {params:,}"):
            enumerate_candidates(default_space(config), config, budget)


def test_budget_below_smallest_candidate_names_it() -> None:
    config, arch, _ = _teacher("llama-3.1-8b")
    smallest = ArchConfig(16, 2048, 3584, 16, 4, 128)  # every axis at the default space's minimum
    smallest_params = count_params(smallest, get_family("llama").invariants_from_config(config))
    with pytest.raises(UserError, match=f"{smallest.name} with {smallest_params:,} parameters"):
        enumerate_candidates(default_space(config), config, 500_000_000)


def test_no_candidate_within_tolerance_names_the_nearest() -> None:
    config, _, params = _teacher("tiny")
    space = SearchSpace("coarse", *(Axis(values=(v,)) for v in (2, 64, 96, 4)), Axis(values=(2,)))
    # the only allowed student is L2 (the teacher has 3 layers); ask for something in between
    l2 = count_params(ArchConfig(2, 64, 96, 4, 2, 16), get_family("llama").invariants_from_config(config))
    with pytest.raises(UserError, match=r"nearest: L2-H64-I96-A4-KV2 \(") as err:
        enumerate_candidates(space, config, (l2 + params) // 2, tolerance=0.01)
    assert "within ±1.0%" in str(err.value)


def test_bad_tolerance() -> None:
    config, _, params = _teacher("tiny")
    with pytest.raises(UserError, match="tolerance"):
        enumerate_candidates(default_space(config), config, params // 2, tolerance=1.5)


# ---- define-by-run helpers ---------------------------------------------------------------------------------------
def test_candidate_problem_names_each_reason() -> None:
    config, arch, params = _teacher("llama-3.1-8b")
    space = default_space(config)
    budget = 4_500_000_000
    assert candidate_problem(ArchConfig(32, 3072, 9216, 32, 8, 128), space, config, budget, 0.01) is None
    assert "is the teacher itself" in candidate_problem(arch, space, config, budget)
    assert "hidden_size=3000 is not allowed" in candidate_problem(ArchConfig(32, 3000, 9216, 32, 8, 128), space,
                                                                  config, budget)
    unloadable = ArchConfig(32, 3072 + 128, 9216, 24, 8, 128)  # 3200 % 24 != 0
    assert "not a multiple of num_attention_heads" in candidate_problem(unloadable, space, config, budget)
    assert "outside ±1.0%" in candidate_problem(ArchConfig(16, 4096, 14336, 32, 8, 128), space, config,
                                                                      5_000_000_000, 0.01)
    limited = dataclasses.replace(space, constraints=Constraints(max_kv_bytes_per_token=65536))
    assert "max_kv_bytes_per_token" in candidate_problem(ArchConfig(32, 3072, 9216, 32, 8, 128), limited, config,
                                                         budget, 0.01)


def test_best_pure_width_and_depth() -> None:
    config, arch, _ = _teacher("llama-3.1-8b")
    space = default_space(config)
    budget = 4_500_000_000
    everything = enumerate_candidates(space, config, budget, 0.01)
    width = best_pure_width(space, config, budget, 0.01)
    depth = best_pure_depth(space, config, budget, 0.01)
    assert width == next(c for c in everything if c.arch.num_hidden_layers == arch.num_hidden_layers)
    assert depth is not None and depth.name == "L16-H4096-I14336-A32-KV8"
    assert best_pure_depth(space, config, 7_000_000_000, 0.0001) is None


def test_candidate_record_round_trip() -> None:
    config, _, params = _teacher("tiny")
    candidate = enumerate_candidates(default_space(config), config, params // 2)[0]
    assert tuple(candidate.row()) == CANDIDATE_COLUMNS
    assert Candidate.from_dict(candidate.to_dict()) == candidate
    assert candidate.budget_params == params // 2


# ---- search-space files -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", space_names())
def test_every_shipped_space_is_valid(name: str) -> None:
    declared = yaml.safe_load((spaces_dir() / f"{name}.yaml").read_text())["teacher"]
    # a space file is named after the preset it was written for, optionally with a suffix (smollm2-135m-cpu)
    assert declared in preset_names() and (name == declared or name.startswith(f"{declared}-"))
    config, arch, params = _teacher(declared)
    space = load_space(name, config)
    assert space.name == name and space.source == str(spaces_dir() / f"{name}.yaml")
    assert all(axis_values(space, arch)[axis] for axis in AXES)
    assert enumerate_candidates(space, config, Budget(fraction=0.7).resolve(params), max_count=3)


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "space.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    ("text", "field", "value"),
    [
        ("axes: {hidden_size: {multiple_of: 0}}", "axes.hidden_size.multiple_of", "0"),
        ("axes: {hidden: [32]}", "axes.hidden", "unknown axis"),
        ("axes: {num_hidden_layers: [1, 7]}", "axes.num_hidden_layers.values", "7"),
        ("axes: {hidden_size: {min: 16, max_prune_ratio: 0.5}}", "axes.hidden_size", "max_prune_ratio=0.5"),
        ("axes: {hidden_size: {max_prune_ratio: 1.5}}", "axes.hidden_size.max_prune_ratio", "1.5"),
        ("axes: {hidden_size: {max: 128}}", "axes.hidden_size.max", "128"),
        ("axes: {hidden_size: {min: 100}}", "axes.hidden_size", "100"),
        ("axes: {hidden_size: {step: 16}}", "axes.hidden_size", "'step'"),
        ("tolerance: 2", "tolerance", "2"),
        ("constraints: {max_memory_bytes: lots}", "constraints.max_memory_bytes", "'lots'"),
        ("constraints: {max_watts: 3}", "constraints", "'max_watts'"),
        ("- 1\n- 2", "mapping", "[1, 2]"),
    ],
)
def test_schema_errors_name_file_field_and_value(tmp_path: Path, text: str, field: str, value: str) -> None:
    path = _write(tmp_path, text)
    with pytest.raises(UserError) as err:
        load_space(str(path), load_preset("tiny"))
    message = str(err.value)
    assert str(path) in message and field in message and value in message


def test_schema_errors_are_reported_together(tmp_path: Path) -> None:
    path = _write(tmp_path, "tolerance: -1\naxes: {hidden_size: {multiple_of: 0}}\n")
    with pytest.raises(UserError, match="tolerance.*; axes.hidden_size.multiple_of"):
        load_space(str(path), load_preset("tiny"))


def test_space_file_parses_numbers_and_defaults(tmp_path: Path) -> None:
    path = _write(tmp_path, "axes: {num_hidden_layers: [2, 3]}\nconstraints: {max_memory_bytes: 16e9, seq_len: 128}\n")
    config, arch, _ = _teacher("tiny")
    space = load_space(str(path), config)
    assert space.constraints.max_memory_bytes == 16_000_000_000 and space.constraints.seq_len == 128
    values = axis_values(space, arch)
    assert values["num_hidden_layers"] == [2, 3] and values["hidden_size"] == [64]  # left out: not pruned


def test_unknown_space_name_and_missing_file() -> None:
    with pytest.raises(UserError, match="tiny"):
        load_space("no-such-space", load_preset("tiny"))
    with pytest.raises(UserError, match="does not exist"):
        load_space("missing/space.yaml", load_preset("tiny"))


def test_enumeration_stays_light() -> None:
    """Planning a search imports neither torch nor transformers."""
    code = (
        "import sys; from nas_minitron.space.presets import load_preset; "
        "from nas_minitron.space import candidates as s; "
        "c = load_preset('llama-3.1-8b'); s.enumerate_candidates(s.load_space('llama-3.1-8b', c), c, 4_500_000_000);"
        "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
