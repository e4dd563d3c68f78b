from __future__ import annotations

import pytest

from nas_minitron.arch import ArchConfig, Budget, Invariants, count_params, prune_problems
from nas_minitron.errors import UserError

LLAMA_31_8B = ArchConfig(32, 4096, 14336, 32, 8, 128)
LLAMA_31_8B_INV = Invariants(vocab_size=128256, tie_word_embeddings=False)
SMOLLM2 = ArchConfig(30, 576, 1536, 9, 3, 64)
SMOLLM2_INV = Invariants(vocab_size=49152, tie_word_embeddings=True)


def test_name_round_trip() -> None:
    arch = ArchConfig(32, 3072, 9216, 32, 8, 128)
    assert arch.name == "L32-H3072-I9216-A32-KV8"
    assert ArchConfig.parse(arch.name, head_dim=128) == arch
    assert ArchConfig.from_dict(arch.to_dict()) == arch


@pytest.mark.parametrize("bad", ["L32-H3072-I9216-A32", "l32-h1-i1-a1-kv1", "L32-H3072-I9216-A32-KV8x", ""])
def test_parse_rejects_malformed_names(bad: str) -> None:
    with pytest.raises(UserError, match="L32-H3072-I9216-A32-KV8"):
        ArchConfig.parse(bad, head_dim=64)


def test_heads_must_divide_by_kv_heads() -> None:
    with pytest.raises(UserError, match=r"valid KV counts: \[1, 3, 9\]"):
        ArchConfig(2, 576, 1536, 9, 2, 64)


def test_published_counts() -> None:
    assert count_params(LLAMA_31_8B, LLAMA_31_8B_INV) == 8_030_261_248
    assert count_params(SMOLLM2, SMOLLM2_INV) == 134_515_008
    # Llama-3.1-Minitron-4B-Width and -Depth
    assert count_params(ArchConfig(32, 3072, 9216, 32, 8, 128), LLAMA_31_8B_INV) == 4_512_746_496
    assert count_params(ArchConfig(16, 4096, 14336, 32, 8, 128), LLAMA_31_8B_INV) == 4_540_469_248


def test_prune_problems_name_every_axis() -> None:
    assert prune_problems(SMOLLM2, SMOLLM2) == []
    problems = prune_problems(ArchConfig(31, 600, 1600, 12, 4, 64), SMOLLM2)
    assert [p.split()[0] for p in problems] == ["L31", "H600", "I1600", "A12", "KV4"]
    # 6 heads in 2 groups would need 3 heads per group: fine; 6 heads in 1 group needs 6 > 3
    assert prune_problems(ArchConfig(30, 576, 1536, 6, 2, 64), SMOLLM2) == []
    assert "query heads per KV group" in prune_problems(ArchConfig(30, 576, 1536, 6, 1, 64), SMOLLM2)[0]


@pytest.mark.parametrize(
    ("text", "params", "fraction"),
    [("4B", 4_000_000_000, None), ("4.5e9", 4_500_000_000, None), ("500M", 500_000_000, None),
     ("90M", 90_000_000, None), ("0.5x", None, 0.5), ("1.5b", 1_500_000_000, None), ("12000", 12000, None)],
)
def test_budget_parse(text: str, params: int | None, fraction: float | None) -> None:
    budget = Budget.parse(text)
    assert (budget.num_params, budget.fraction) == (params, fraction)


def test_budget_resolve_fraction() -> None:
    assert Budget.parse("0.5x").resolve(134_515_008) == 67_257_504


@pytest.mark.parametrize("bad", ["4Q", "half", "1.5x", "0x", "-3B", "", "B"])
def test_budget_rejects(bad: str) -> None:
    with pytest.raises(UserError, match="budget"):
        Budget.parse(bad)
