"""The successive-halving rules (search/rungs.py): the ladder, promotion, intervals, rank statistics."""

from __future__ import annotations

import math
import random

import pytest

from nas_minitron.errors import UserError
from nas_minitron.search.rungs import (
    bootstrap_interval,
    crowding_distance,
    default_rungs,
    kendall_tau,
    nondominated_fronts,
    parse_rungs,
    promote,
    quota,
    rung_stats,
    spearman,
    stable,
)


def test_parse_rungs_rounds_to_steps_and_puts_zero_first() -> None:
    assert parse_rungs("0,1k,4k", 4096, 1024) == (0, 1024, 4096)
    assert parse_rungs("1024,4096", 4096, 1024) == (0, 1024, 4096)
    assert parse_rungs("0, 100", 4096, 1024) == (0, 1024)  # at least one step
    assert parse_rungs("0,1.5k", 4096, 512) == (0, 1536)


@pytest.mark.parametrize(("text", "words"), [
    ("0,4k,1k", "must increase"), ("0,1k,1100", "must increase"), ("0,8k", "above --short-tokens"),
    ("0,abc", "token counts"), ("", "at least one"),
])
def test_parse_rungs_refuses(text: str, words: str) -> None:
    with pytest.raises(UserError, match=words):
        parse_rungs(text, 4096, 1024)


def test_default_rungs_grow_by_eta_down_to_one_step() -> None:
    assert default_rungs(4096, 3, 1024) == (0, 1024, 4096)
    assert default_rungs(4096, 2, 1024) == (0, 1024, 2048, 4096)  # at most 4 rungs
    assert default_rungs(16384, 4, 1024) == (0, 1024, 4096, 16384)
    assert default_rungs(1024, 3, 1024) == (0, 1024)


def test_quota() -> None:
    assert quota(30, 3) == 10 and quota(10, 3) == 4 and quota(1, 3) == 1
    assert quota(5, 3, keep_at_least=3) == 3 and quota(2, 3, keep_at_least=3) == 2


def _rows(values: dict[str, float], seqs: dict[str, list[float]] | None = None) -> list[dict[str, object]]:
    return [{"name": n, "val_kl": v, "val_kl_seq": (seqs or {}).get(n, [])} for n, v in values.items()]


def test_promote_keeps_best_quota_and_never_failed() -> None:
    rows = _rows({"a": 1.0, "b": 3.0, "c": 2.0, "d": math.nan, "e": 5.0, "f": 4.0})
    decision = promote(rows, ["val_kl"], 3)
    assert decision.promoted == ("a", "c")  # ceil(5 usable / 3) = 2
    assert "d" in decision.stopped and decision.quota == 2
    assert decision.ranks == {"a": 1, "c": 2, "b": 3, "f": 4, "e": 5}


def test_promote_keeps_candidates_the_sequences_cannot_separate() -> None:
    rng = random.Random(0)
    base = [rng.uniform(1, 5) for _ in range(32)]  # sequence difficulty, shared by every candidate
    seqs = {"a": [x for x in base], "b": [x + 0.5 for x in base],
            "c": [x + 0.5 + rng.gauss(0, 0.02) for x in base],  # = b up to noise: inseparable from b
            "d": [x + 2.0 for x in base]}
    values = {n: sum(v) / len(v) for n, v in seqs.items()}
    rows = _rows(values, seqs)
    plain = promote(rows, ["val_kl"], 2)  # quota 2: a and whichever of b, c is lower
    tied = promote(rows, ["val_kl"], 2, seq_key="val_kl_seq")
    assert len(plain.promoted) == 2 and not plain.tied
    assert set(tied.promoted) == {"a", "b", "c"} and len(tied.tied) == 1 and "d" in tied.stopped
    # the marginal intervals of a and b overlap (sequence difficulty dominates), yet the paired rule separates them
    low_b, _ = bootstrap_interval(seqs["b"])
    _, high_a = bootstrap_interval(seqs["a"])
    assert low_b < high_a and "b" not in tied.tied


def test_promote_multi_objective_keeps_the_pareto_set() -> None:
    # (val_kl, params): the front is a, b, c; d and e are dominated
    values = {"a": (1.0, 9.0), "b": (2.0, 5.0), "c": (4.0, 1.0), "d": (3.0, 6.0), "e": (5.0, 9.5)}
    rows = [{"name": n, "val_kl": v[0], "params": v[1]} for n, v in values.items()]
    decision = promote(rows, ["val_kl", "params"], 2)  # quota 3 = the front's size
    assert set(decision.promoted) == {"a", "b", "c"}
    fronts = nondominated_fronts([values[n] for n in values])
    assert fronts == [[0, 1, 2], [3], [4]]
    crowd = crowding_distance([values[n] for n in values], fronts[0])
    assert crowd[0] == crowd[2] == math.inf and math.isfinite(crowd[1])
    small = promote(rows, ["val_kl", "params"], 5)  # quota 1: an end of the front (infinite crowding)
    assert small.promoted[0] in ("a", "c")


def test_rank_statistics() -> None:
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert kendall_tau([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(4 / 6)
    assert math.isnan(spearman([1], [1]))
    stats = rung_stats(1, 1024, {"a": 1.0, "b": 2.0, "c": 3.0}, {"a": 2.0, "b": 1.0, "c": 3.0, "z": 0.5}, 2)
    assert stats.top1_same is False and stats.topk_agreement == 1.0 and stats.num == 3
    assert stats.kendall == pytest.approx(1 / 3)


def test_stable_needs_two_stable_comparisons() -> None:
    same = rung_stats(1, 1, {"a": 1.0, "b": 2.0, "c": 3.0}, {"a": 1.0, "b": 2.0, "c": 3.0}, 2)
    flip = rung_stats(2, 2, {"a": 2.0, "b": 1.0, "c": 3.0}, {"a": 1.0, "b": 2.0, "c": 3.0}, 2)
    first = rung_stats(0, 0, {"a": 1.0}, None, 1)
    assert not stable([first, same]) and stable([first, same, same]) and not stable([first, same, flip])


def test_a_rung_result_with_a_non_finite_objective_is_failed_and_never_promoted(tmp_path: object) -> None:
    from pathlib import Path

    from nas_minitron.atomic import write_json_atomic
    from nas_minitron.distill.config import DistillConfig
    from nas_minitron.search.halving import _read_rung
    from nas_minitron.search.protocol import TrialSpec, rung_result_path

    run_dir = Path(str(tmp_path))
    spec = TrialSpec(run_dir=str(run_dir), teacher_dir="", importance_dir="", train_path="", val_path="",
                     logit_cache_dir=None, candidates=("a", "b", "c"), head_dim=8,
                     distill=DistillConfig(num_tokens=64))
    for name, value in (("a", 1.0), ("b", math.nan), ("c", 2.0)):
        write_json_atomic(rung_result_path(run_dir, 1, name), {"metrics": {"val_kl": value, "val_kl_seq": [value] * 4}})
    rows = _read_rung(spec, 1, 64, ["a", "b", "c", "d"], ["val_kl"], [], seed=0)  # d: no result at all
    status = {r.name: r.status for r in rows}
    assert status == {"a": "COMPLETE", "b": "FAILED", "c": "COMPLETE", "d": "FAILED"}
    decision = promote([r.objective_row(["val_kl"]) for r in rows], ["val_kl"], 2)
    assert decision.promoted == ("a",) and {"b", "d"} <= set(decision.stopped)
