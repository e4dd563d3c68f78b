from __future__ import annotations

import pytest
import torch

from nas_minitron.arch import ArchConfig
from nas_minitron.errors import UserError
from nas_minitron.evaluate.speed import SpeedResult, kv_cache_bytes, measure_speed
from tiny_models import tiny_model


def test_measure_speed_record_is_sane() -> None:
    model = tiny_model("llama")
    result = measure_speed(model, 2, 16, "cpu", 3, label="tiny")
    assert isinstance(result, SpeedResult)
    assert (result.model, result.batch_size, result.seq_len, result.num_decode_tokens) == ("tiny", 2, 16, 3)
    assert result.prefill_tok_s > 0 and result.decode_tok_s > 0
    assert result.prefill_tok_s == pytest.approx(2 * 16 / result.prefill_s)
    assert result.decode_tok_s == pytest.approx(2 * 3 / result.decode_s)
    assert result.peak_mem_bytes >= 0 and result.peak_mem_method in ("rss_sampled", "ru_maxrss_delta")
    assert result.params == sum(p.numel() for p in model.parameters())
    assert (result.device, result.dtype) == ("cpu", "float32")
    # 2 (K, V) * 3 layers * 2 KV heads * head_dim 16 * 4 bytes * batch 2 * seq 16
    assert result.kv_cache_bytes == 2 * 3 * 2 * 16 * 4 * 2 * 16


def test_kv_cache_bytes_matches_the_real_cache() -> None:
    model = tiny_model("qwen3", num_key_value_heads=1, head_dim=24)
    input_ids = torch.randint(0, 1024, (3, 10))
    with torch.inference_mode():
        cache = model(input_ids=input_ids, use_cache=True).past_key_values
    real = sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers)
    assert kv_cache_bytes(model.config, 3, 10, 4) == real


def test_kv_cache_bytes_from_an_arch_config() -> None:
    arch = ArchConfig(30, 576, 1536, 9, 3, 64)  # SmolLM2-135M
    assert kv_cache_bytes(arch, 1, 2048, 2) == 2 * 30 * 3 * 64 * 2 * 2048


@pytest.mark.parametrize("bad", [dict(batch_size=0), dict(seq_len=-1), dict(num_decode_tokens=0)])
def test_measure_speed_refuses_bad_shapes(bad: dict[str, int]) -> None:
    args = dict(batch_size=1, seq_len=4, device="cpu", num_decode_tokens=1) | bad
    with pytest.raises(UserError, match=next(iter(bad))):
        measure_speed(tiny_model("llama"), **args)


@pytest.mark.skipif(not __import__("os").path.exists("/proc/self/statm"), reason="needs /proc/self/statm")
def test_cpu_peak_memory_is_not_hidden_by_memory_the_heap_already_freed() -> None:
    """A search driver measures speed after bigger steps freed memory into malloc's arenas; growth must still show."""
    from nas_minitron.evaluate.speed import _PeakMemory

    chunk = 64 * 1024  # below glibc's mmap threshold: served from the heap
    held, pins = [], []
    for _ in range(3200):  # ~200 MiB of heap chunks, each pinned in place by a small allocation after it
        held.append(bytearray(chunk))
        pins.append(bytearray(1024))
    del held  # freed holes the heap keeps (they cannot coalesce into the top and be trimmed automatically)
    with _PeakMemory(torch.device("cpu")) as peak:
        again = [bytearray(chunk) for _ in range(1600)]  # ~100 MiB, which fits in the holes
    del again, pins
    assert peak.method == "rss_sampled" and peak.peak_bytes > 50 * 2**20
