"""The logit cache's build: chunked top-k equals the full logits', a killed build resumes shard by shard to the same
bytes, 2 Ray workers build what one process builds, and opening the cache reads no shard's bytes."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch

from nas_minitron.distill import logit_cache as lc
from nas_minitron.distill.losses import topk_targets
from nas_minitron.teacher import load_teacher, tokenizer_fingerprint
from tiny_models import FAMILIES, save_tiny_teacher, tiny_model

TOPK, SEQ_LEN = 8, 12


def _files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.suffix == ".npy"}


@pytest.mark.parametrize("family", FAMILIES)
def test_chunked_topk_equals_the_full_logits(family: str) -> None:
    teacher = tiny_model(family).eval()
    ids = torch.randint(0, teacher.config.vocab_size, (3, SEQ_LEN), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want_values, want_ids = topk_targets(teacher(input_ids=ids).logits, TOPK)
        values, indices = lc.teacher_topk(teacher, ids, TOPK, chunk_tokens=5)  # 36 positions: 8 chunks, one short
    torch.testing.assert_close(values, want_values, rtol=1e-5, atol=1e-5)
    assert torch.equal(indices, want_ids)


def test_a_killed_build_resumes_to_the_same_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    teacher = tiny_model("llama").eval()
    sequences = torch.randint(0, 1024, (7, SEQ_LEN), generator=torch.Generator().manual_seed(1))
    whole = lc.build_logit_cache(teacher, sequences, tmp_path / "whole", TOPK, 2, shard_sequences=2)
    assert len(whole.manifest["shards"]) == 4 and whole.manifest["resumed_shards"] == 0

    real, calls = lc.write_shard, []

    def dies_at_the_third(*args, **kwargs):  # type: ignore[no-untyped-def]
        calls.append(args[3])
        if len(calls) == 3:
            raise KeyboardInterrupt  # the driver killed while the third shard is being written
        return real(*args, **kwargs)

    monkeypatch.setattr(lc, "write_shard", dies_at_the_third)
    with pytest.raises(KeyboardInterrupt):
        lc.build_logit_cache(teacher, sequences, tmp_path / "cache", TOPK, 2, shard_sequences=2)
    assert not (tmp_path / "cache").exists() and (tmp_path / "cache.partial" / "shard-00001.json").is_file()
    # a half-written file of shard 2 left behind is not taken for a shard
    (tmp_path / "cache.partial" / ".logprobs-00002.npy.tmp").write_bytes(b"half")
    monkeypatch.setattr(lc, "write_shard", real)
    resumed = lc.build_logit_cache(teacher, sequences, tmp_path / "cache", TOPK, 2, shard_sequences=2)
    assert resumed.manifest["resumed_shards"] == 2 and not (tmp_path / "cache.partial").exists()
    assert _files(tmp_path / "cache") == _files(tmp_path / "whole")
    assert resumed.manifest["files"] == whole.manifest["files"]
    lc.LogitCache.open(tmp_path / "cache", verify=True)  # every sha256 recorded is the file's

    # finished, but the process died before its stage's marker: the rerun keeps the cache, computing nothing
    monkeypatch.setattr(lc, "write_shard", dies_at_the_third)
    calls.clear()
    again = lc.build_logit_cache(teacher, sequences, tmp_path / "cache", TOPK, 2, shard_sequences=2, overwrite=True)
    assert calls == [] and again.manifest == resumed.manifest
    monkeypatch.setattr(lc, "write_shard", real)

    # another teacher (or top-k, shard size, sequences) never reuses shards: the build starts again
    monkeypatch.setattr(lc, "write_shard", dies_at_the_third)
    calls.clear()
    with pytest.raises(KeyboardInterrupt):
        lc.build_logit_cache(teacher, sequences, tmp_path / "other", TOPK, 2, shard_sequences=2)
    monkeypatch.setattr(lc, "write_shard", real)
    other = lc.build_logit_cache(tiny_model("llama", seed=3).eval(), sequences, tmp_path / "other", TOPK, 2,
                                 shard_sequences=2)
    assert other.manifest["resumed_shards"] == 0
    assert other.manifest["teacher_fingerprint"] != whole.manifest["teacher_fingerprint"]


def test_opening_the_cache_reads_no_shard_bytes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    teacher = tiny_model("llama").eval()
    sequences = torch.randint(0, 1024, (4, SEQ_LEN), generator=torch.Generator().manual_seed(2))
    lc.build_logit_cache(teacher, sequences, tmp_path / "cache", TOPK, 2, shard_sequences=2)
    shard = tmp_path / "cache" / "logprobs-00001.npy"
    data = bytearray(shard.read_bytes())
    data[-3] ^= 0xFF  # same size, other bytes: only a full read would see it
    shard.write_bytes(bytes(data))
    hashed: list[Path] = []
    monkeypatch.setattr("nas_minitron.integrity.file_sha256", lambda path: hashed.append(path) or "")
    cache = lc.LogitCache.open(tmp_path / "cache")
    assert hashed == [] and len(cache.logprobs) == 2
    monkeypatch.undo()
    with pytest.raises(Exception, match="sha256 mismatch"):
        lc.LogitCache.open(tmp_path / "cache", verify=True)


@pytest.fixture(scope="module")
def ray_cluster():  # type: ignore[no-untyped-def]
    from nas_minitron.distill.ray_train import ray_env

    os.environ.update(ray_env())
    import ray

    repo = str(Path(__file__).parents[2])
    env = {k: os.environ[k] for k in ("HF_HOME", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE") if k in os.environ}
    ray.init(num_cpus=2, include_dashboard=False, _temp_dir=tempfile.mkdtemp(prefix="r", dir="/tmp"),
             log_to_driver=False, runtime_env={"env_vars": {**env, **ray_env(), "PYTHONPATH": repo}})
    yield
    ray.shutdown()


def test_two_ray_workers_build_what_one_process_builds(tmp_path: Path, ray_cluster: None) -> None:
    from nas_minitron.distill.ray_cache import build_logit_cache_ray

    where = save_tiny_teacher(tmp_path / "teacher")
    teacher, tokenizer = load_teacher(str(where))
    sequences = torch.randint(0, 1024, (9, SEQ_LEN), generator=torch.Generator().manual_seed(4))
    one = lc.build_logit_cache(teacher, sequences, tmp_path / "one", TOPK, 2, tokenizer=tokenizer, shard_sequences=2)
    lines: list[str] = []
    two = build_logit_cache_ray(str(where), sequences, tmp_path / "two", TOPK, 2, workers=2, use_gpu=False,
                                vocab_size=1024, tokenizer_fingerprint=tokenizer_fingerprint(tokenizer),
                                shard_sequences=2, log=lines.append)
    assert two.manifest["workers"] == 2 and len(two.manifest["shards"]) == 5 and len(lines) == 5
    assert _files(tmp_path / "two") == _files(tmp_path / "one")
    for key in ("teacher_fingerprint", "tokenizer_fingerprint", "files", "shards", "dtype"):
        assert two.manifest[key] == one.manifest[key], key
    assert np.array_equal(np.asarray(two.tokens), sequences.numpy())


def test_a_damaged_teacher_in_a_ray_worker_is_one_clear_error(tmp_path: Path, ray_cluster: None) -> None:
    from nas_minitron.distill.ray_cache import build_logit_cache_ray
    from nas_minitron.errors import UserError

    where = save_tiny_teacher(tmp_path / "teacher")
    weights = where / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(UserError, match="model.safetensors"):
        build_logit_cache_ray(str(where), torch.zeros(2, SEQ_LEN, dtype=torch.long), tmp_path / "cache", TOPK, 2,
                              workers=2, use_gpu=False, vocab_size=1024, tokenizer_fingerprint=None)
    assert not (tmp_path / "cache").exists()


def _cache_arrays(directory: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    cache = lc.LogitCache.open(directory, verify=True)
    return (np.asarray(cache.tokens), np.concatenate([np.asarray(a) for a in cache.logprobs]),
            np.concatenate([np.asarray(a) for a in cache.indices]))


@pytest.mark.slow  # two tiny searches (~55 s); test_two_ray_workers_build_what_one_process_builds stays in CI
def test_search_builds_the_same_cache_on_two_ray_workers(tiny_teacher_dir: Path, tmp_path: Path) -> None:
    import json

    from cli_helpers import search
    from nas_minitron.pipeline.run_dir import stage_marker

    for name, extra in (("driver", ()), ("workers", ("--cache-workers", "2"))):
        done = search(tiny_teacher_dir, tmp_path / name, "--stop-after", "logit_cache", *extra)
        assert done.returncode == 0, done.stderr[-3000:]
    marker = json.loads(stage_marker(tmp_path / "workers", "logit_cache").read_text())
    assert marker["cache_workers"] == 2 and marker["cache_shards"] >= 2 and marker["cache_bytes"] > 0
    assert "by 2 worker(s)" in done.stdout + done.stderr
    for mine, theirs in zip(_cache_arrays(tmp_path / "workers" / "logit_cache"),
                            _cache_arrays(tmp_path / "driver" / "logit_cache"), strict=True):
        assert np.array_equal(mine, theirs)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_workers_build_a_bf16_cache_close_to_the_cpu_one(tmp_path: Path, ray_cluster: None) -> None:
    """The GPU path of --cache-gpus: a Ray worker per GPU, the teacher in bf16; its top-k against float32 on CPU."""
    from nas_minitron.distill.ray_cache import build_logit_cache_ray

    where = save_tiny_teacher(tmp_path / "teacher")
    teacher, tokenizer = load_teacher(str(where))
    sequences = torch.randint(0, 1024, (8, SEQ_LEN), generator=torch.Generator().manual_seed(5))
    cpu = lc.build_logit_cache(teacher, sequences, tmp_path / "cpu", TOPK, 4, tokenizer=tokenizer, shard_sequences=2)
    gpus = min(2, torch.cuda.device_count())
    gpu = build_logit_cache_ray(str(where), sequences, tmp_path / "gpu", TOPK, 4, workers=gpus, use_gpu=True,
                                vocab_size=1024, tokenizer_fingerprint=tokenizer_fingerprint(tokenizer),
                                shard_sequences=2)
    assert gpu.manifest["dtype"] == "bf16" and gpu.manifest["device"] == "cuda" and gpu.manifest["workers"] == gpus
    top1_cpu = np.concatenate([np.asarray(a)[..., 0] for a in cpu.indices])
    top1_gpu = np.concatenate([np.asarray(a)[..., 0] for a in gpu.indices])
    assert (top1_cpu == top1_gpu).mean() > 0.9  # bf16 reorders near-ties only
    best_cpu = np.concatenate([np.asarray(a)[..., 0] for a in cpu.logprobs]).astype(np.float32)
    best_gpu = np.concatenate([np.asarray(a)[..., 0] for a in gpu.logprobs]).astype(np.float32)
    assert np.abs(best_cpu - best_gpu).max() < 0.1
