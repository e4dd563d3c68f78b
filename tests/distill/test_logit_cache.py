from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from nas_minitron.distill.logit_cache import LogitCache, build_logit_cache
from nas_minitron.distill.losses import topk_targets
from nas_minitron.distill.trainer import DistillConfig, StepInfo, distill
from nas_minitron.errors import UserError
from tiny_models import tiny_model, tiny_tokenizer

SEQ_LEN = 16


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _data(num: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 1024, (num, SEQ_LEN), generator=torch.Generator().manual_seed(seed))  # [N, T]


def test_cache_round_trip_in_shards(tmp_path: Path) -> None:
    teacher = tiny_model("llama", seed=0)
    data = _data(10)
    cache = build_logit_cache(teacher, data, tmp_path / "c", topk=8, batch_size=3, shard_sequences=4,
                              tokenizer=tiny_tokenizer())
    manifest = json.loads((tmp_path / "c" / "manifest.json").read_text())
    assert [s["stop"] for s in manifest["shards"]] == [4, 8, 10] and manifest["topk"] == 8
    assert manifest["files"]["logprobs-0"]["dtype"] == "float16" and len(manifest["tokenizer_fingerprint"]) == 64
    opened = LogitCache.open(tmp_path / "c")
    assert isinstance(opened.logprobs[0], np.memmap) and cache.num_sequences == 10
    rows = data[[9, 2, 5]]  # any order, across shards
    logprobs, indices = opened.lookup(rows)
    with torch.no_grad():
        expected_values, expected_indices = topk_targets(teacher(input_ids=rows).logits, 8)
    assert torch.equal(indices, expected_indices)
    assert torch.allclose(logprobs, expected_values, atol=1e-2)  # float16 storage
    with pytest.raises(UserError, match="not in logit cache"):
        opened.lookup(_data(1, seed=3))


def test_cache_refuses_truncation(tmp_path: Path) -> None:
    build_logit_cache(tiny_model("llama"), _data(4), tmp_path / "c", topk=4, batch_size=4)
    shard = tmp_path / "c" / "indices-00000.npy"
    shard.write_bytes(shard.read_bytes()[:-8])
    with pytest.raises(UserError, match="truncated"):
        LogitCache.open(tmp_path / "c")
    with pytest.raises(UserError, match="not a logit cache"):
        LogitCache.open(tmp_path)


def test_training_from_the_cache_matches_a_live_top_k_teacher(tmp_path: Path) -> None:
    """Same sequences, same top-k: the cached run follows the live-teacher run up to float16 rounding."""
    teacher = tiny_model("llama", seed=0)
    train, val = _data(8), _data(4, seed=9)
    cache = build_logit_cache(teacher, torch.cat([train, val]), tmp_path / "c", topk=32, batch_size=4)
    config = DistillConfig(num_tokens=4 * SEQ_LEN * 3, seq_len=SEQ_LEN, batch_size=4, lr=1e-3, topk=32)
    runs = []
    for kwargs in ({"teacher": teacher}, {"logit_cache": cache}):
        steps: list[StepInfo] = []
        student = tiny_model("llama", seed=1, num_hidden_layers=2)
        result = distill(student, train, val, config, on_step=steps.append, **kwargs)
        runs.append(([s.loss for s in steps], result))
    (live, live_result), (cached, cached_result) = runs
    assert cached == pytest.approx(live, rel=1e-3)
    assert cached_result.val_loss == pytest.approx(live_result.val_loss, rel=1e-4)
    # validation KL: full with a live teacher, top-k + rest from the cache (a lower bound of the full KL)
    assert 0 < cached_result.val_kl < live_result.val_kl


def test_cache_vocabulary_must_match_the_student(tmp_path: Path) -> None:
    cache = build_logit_cache(tiny_model("llama"), _data(4), tmp_path / "c", topk=4, batch_size=4)
    config = DistillConfig(num_tokens=4 * SEQ_LEN, seq_len=SEQ_LEN, batch_size=4, topk=4)
    with pytest.raises(UserError, match="vocabulary"):
        distill(tiny_model("llama", vocab_size=512), _data(4), _data(4), config, logit_cache=cache)
