"""Search pieces without a Ray cluster: proposals, winner selection, settings, deterministic Optuna proposals."""

from __future__ import annotations

import math
import random
from pathlib import Path

import pytest

from nas_minitron.arch import ArchConfig
from nas_minitron.distill.config import DistillConfig
from nas_minitron.errors import UserError
from nas_minitron.pipeline.settings import SearchSettings, differences, resolve_settings
from nas_minitron.search.proposals import DECISION_ORDER, decode, encode, param_name
from nas_minitron.search.winners import pareto_front, select_winners

ARCHS = [ArchConfig(layers, hidden, inter, heads, kv, 16)
         for layers in (2, 3) for hidden in (32, 48) for inter in (48, 64, 80) for heads, kv in ((2, 1), (4, 2))
         if (layers, hidden) != (3, 48)]


def test_decode_always_yields_a_candidate_and_encode_inverts_it() -> None:
    rng = random.Random(0)
    for _ in range(200):
        point = {param_name(axis): rng.random() for axis in DECISION_ORDER}
        assert decode(ARCHS, point) in ARCHS
    for arch in ARCHS:
        assert decode(ARCHS, encode(ARCHS, arch)) == arch


def test_decode_reaches_every_candidate_and_is_monotone_in_layers() -> None:
    rng = random.Random(1)
    seen = {decode(ARCHS, {param_name(a): rng.random() for a in DECISION_ORDER}) for _ in range(2000)}
    assert seen == set(ARCHS)
    low = decode(ARCHS, {param_name(a): 0.1 for a in DECISION_ORDER})
    high = decode(ARCHS, {**{param_name(a): 0.1 for a in DECISION_ORDER}, param_name("num_hidden_layers"): 0.9})
    assert low.num_hidden_layers < high.num_hidden_layers


def _row(name: str, kl: float, params: int, status: str = "COMPLETE") -> dict:
    return {"name": name, "val_kl": kl, "params": params, "status": status}


def test_winners_skip_failed_nan_and_duplicates() -> None:
    rows = [_row("a", 0.5, 10), _row("b", 0.1, 12, "FAILED"), _row("c", math.nan, 9), _row("d", 0.3, 11),
            _row("d", 0.2, 11), _row("e", 0.4, 8)]
    assert [r["name"] for r in select_winners(rows, ["val_kl"], 2)] == ["d", "e"]
    front = pareto_front(rows, ["val_kl", "params"])
    assert sorted(r["name"] for r in front) == ["d", "e"]  # a is dominated by e (0.4 < 0.5 and 8 < 10)
    assert [r["name"] for r in select_winners(rows, ["val_kl", "params"], 5)] == ["d", "e"]


def test_settings_precedence_and_validation(tmp_path: Path) -> None:
    yaml_file = tmp_path / "run.yaml"
    yaml_file.write_text("trials: 7\nshort_tokens: 1000\nobjectives: [val_kl, params]\n")
    settings = resolve_settings(yaml_file, {"trials": 9, "budget": None})
    assert (settings.trials, settings.short_tokens, settings.objectives) == (9, 1000, ("val_kl", "params"))
    with pytest.raises(UserError, match="objectives must be among"):
        resolve_settings(None, {"objectives": "val_kl,accuracy"})
    with pytest.raises(UserError, match=r"asha stops trials on one objective, but got 2 objectives"):
        resolve_settings(None, {"objectives": "val_kl,params", "asha": True})
    yaml_file.write_text("trails: 3\n")
    with pytest.raises(UserError, match=r"unknown settings \['trails'\]"):
        resolve_settings(yaml_file, {})
    saved = SearchSettings().to_dict() | {"teacher_params": 5}
    assert differences(saved, SearchSettings(max_concurrent=5)) == []  # runtime key and derived keys ignored
    assert differences(saved, SearchSettings(trials=5)) == ["trials: 4 -> 5"]


def _propose(seed: int, num_trials: int, tmp_path: Path) -> list[str]:
    """Drive the real StudySearch (Optuna in SQLite) one trial at a time, as Ray would with one trial at once."""
    from nas_minitron.search.protocol import TrialSpec
    from nas_minitron.search.tune import RayOptions, _search

    tmp_path.mkdir()
    spec = TrialSpec(run_dir=str(tmp_path), teacher_dir="", importance_dir="", train_path="", val_path="",
                     logit_cache_dir=None, candidates=tuple(a.name for a in ARCHS), head_dim=16,
                     distill=DistillConfig(num_tokens=64))
    search = _search(spec, RayOptions(seed=seed), enqueue=[ARCHS[3].name], num_trials=num_trials)
    search.set_search_properties(None, None, {})
    names = []
    for i in range(num_trials):
        config = search.suggest(f"t{i}")
        names.append(config["arch"])
        arch = ArchConfig.parse(config["arch"], 16)
        loss = 1.0 / (arch.hidden_size * arch.intermediate_size)  # any deterministic objective
        search.on_trial_complete(f"t{i}", {"val_kl": loss, "final": True})
    return names


def test_same_seed_proposes_same_candidates(tmp_path: Path) -> None:
    first = _propose(3, 8, tmp_path / "a")
    assert first[0] == ARCHS[3].name  # the enqueued baseline comes first
    assert first == _propose(3, 8, tmp_path / "b")
    assert first != _propose(4, 8, tmp_path / "c")


def test_failed_and_errored_trials_are_fail_in_optuna(tmp_path: Path) -> None:
    import optuna

    from nas_minitron.search.protocol import TrialSpec
    from nas_minitron.search.tune import RayOptions, _search, optuna_numbers, study_storage_url

    spec = TrialSpec(run_dir=str(tmp_path), teacher_dir="", importance_dir="", train_path="", val_path="",
                     logit_cache_dir=None, candidates=tuple(a.name for a in ARCHS), head_dim=16,
                     distill=DistillConfig(num_tokens=64))
    search = _search(spec, RayOptions(), enqueue=[], num_trials=3)
    search.set_search_properties(None, None, {})
    for trial_id in ("ok", "nan", "crash", "stopped"):
        search.suggest(trial_id)
    search.on_trial_complete("ok", {"val_kl": 0.5, "final": True})
    search.on_trial_complete("stopped", {"val_kl": 0.7, "final": False})  # ended by ASHA before its last step
    search.on_trial_complete("nan", {"val_kl": float("inf"), "failed": True})
    search.on_trial_complete("crash", {"val_kl": 0.1}, error=True)  # stock OptunaSearch would say COMPLETE
    study = optuna.load_study(study_name="nas-minitron", storage=study_storage_url(tmp_path, None))
    states = {t.user_attrs["ray_trial_id"]: t.state.name for t in study.trials}
    assert states == {"ok": "COMPLETE", "nan": "FAIL", "crash": "FAIL", "stopped": "PRUNED"}
    assert optuna_numbers(study_storage_url(tmp_path, None)) == {"ok": 0, "nan": 1, "crash": 2, "stopped": 3}


@pytest.mark.parametrize(("num_steps", "evals", "expected"), [
    (4, 2, [0, 2, 4]), (8, 2, [0, 4, 8]), (4, 3, [0, 2, 4]), (5, 2, [0, 3, 5]), (3, 10, [0, 1, 2, 3]), (1, 2, [0, 1]),
])
def test_distillations_validate_at_most_evals_per_trial_times(num_steps: int, evals: int, expected: list[int]) -> None:
    """The trainer's real schedule for the interval the search computes: step 0, then <= evals points, last included."""
    import torch

    from nas_minitron.distill.trainer import DistillConfig, distill
    from nas_minitron.pipeline.stages import validate_at_most
    from tiny_models import tiny_model

    seq_len, batch = 8, 2
    config = validate_at_most(DistillConfig(num_tokens=num_steps * seq_len * batch, seq_len=seq_len, batch_size=batch,
                                            lr=1e-3, num_val_sequences=2), evals)
    data = torch.randint(0, 1024, (num_steps * batch, seq_len), generator=torch.Generator().manual_seed(0))
    result = distill(tiny_model("llama", seed=1), data, data[:2], config, teacher=tiny_model("llama", seed=0))
    assert [p.step for p in result.curve] == expected


def test_every_setting_has_a_search_flag() -> None:
    """A SearchSettings field without a flag could only be set through --config; the README names the flags."""
    import argparse
    import dataclasses

    from nas_minitron.commands.search import register

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    search = parser.parse_args(["search"])
    assert {f.name for f in dataclasses.fields(SearchSettings)} <= set(vars(search))


def test_a_run_directory_made_before_the_rung_search_resumes_only_as_the_search_it_ran() -> None:
    import json as _json

    from nas_minitron.pipeline.settings import SearchSettings, differences

    saved = _json.loads(_json.dumps(SearchSettings(strategy="sample").to_dict()))
    for key in ("strategy", "rungs", "eta", "screen", "stop_when_stable"):
        del saved[key]  # config.json of a run made before these settings existed
    assert differences(saved, SearchSettings(strategy="sample")) == []
    assert differences(saved, SearchSettings()) == ["strategy: 'sample' -> 'rungs'"]
