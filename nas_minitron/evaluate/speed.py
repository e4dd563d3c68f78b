"""Model speed at a given batch and sequence length: prefill and decode tokens/s, peak memory, KV-cache bytes.

Usable as a report axis and as a search objective. Timings are wall-clock on whatever device the model runs on;
peak memory is `torch.cuda.max_memory_allocated` on CUDA (exact, tensors only) and, on CPU, the peak resident set
size above the pre-measurement level, sampled every millisecond from /proc/self/statm after the C heap's free
pages are returned to the OS (glibc `malloc_trim`); approximate: it includes anything else the process allocates
meanwhile. Where /proc is missing it falls back to the growth of the process's lifetime peak RSS (`ru_maxrss`),
which reads 0 if an earlier step already went higher.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import resource
import threading
import time
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from nas_minitron._lazy import lazy_import
from nas_minitron.errors import UserError

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel
else:
    torch = lazy_import("torch")

__all__ = ["SpeedResult", "kv_cache_bytes", "measure_speed"]


@dataclass(frozen=True)
class SpeedResult:
    """One speed measurement. Tokens/s count every sequence of the batch; decode is greedy, one token per step."""

    model: str
    params: int
    batch_size: int
    seq_len: int
    num_decode_tokens: int
    prefill_tok_s: float
    decode_tok_s: float
    prefill_s: float
    decode_s: float
    peak_mem_bytes: int
    peak_mem_method: str  # "cuda_max_memory_allocated" | "rss_sampled" | "ru_maxrss_delta"
    kv_cache_bytes: int  # at batch_size x seq_len, from the config
    device: str
    dtype: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def kv_cache_bytes(config: Any, batch_size: int, seq_len: int, bytes_per_value: int) -> int:
    """2 (K and V) * layers * KV heads * head_dim * bytes * batch * seq, from a HF config (or ArchConfig)."""
    num_layers = int(config.num_hidden_layers)
    num_kv_heads = int(getattr(config, "num_key_value_heads", None) or config.num_attention_heads)
    head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)
    return 2 * num_layers * num_kv_heads * head_dim * bytes_per_value * batch_size * seq_len


class _PeakMemory:
    """Peak memory above the starting level during a `with` block, by the best method the device allows."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.peak_bytes = 0
        self.method = ""
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> _PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._start = torch.cuda.memory_allocated(self.device)
            self.method = "cuda_max_memory_allocated"
        elif os.path.exists("/proc/self/statm"):
            _trim_heap()  # freed-but-cached heap pages would otherwise absorb the growth and hide it
            self._start = self._rss_bytes()
            self._max = self._start
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
            self.method = "rss_sampled"
        else:
            self._start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
            self.method = "ru_maxrss_delta"
        return self

    def __exit__(self, *exc: object) -> None:
        if self.method == "cuda_max_memory_allocated":
            torch.cuda.synchronize(self.device)
            self.peak_bytes = max(0, torch.cuda.max_memory_allocated(self.device) - self._start)
        elif self.method == "rss_sampled":
            self._stop.set()
            assert self._thread is not None
            self._thread.join()
            self.peak_bytes = max(0, max(self._max, self._rss_bytes()) - self._start)
        else:
            self.peak_bytes = max(0, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - self._start)

    @staticmethod
    def _rss_bytes() -> int:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def _sample(self) -> None:
        while not self._stop.wait(0.001):
            self._max = max(self._max, self._rss_bytes())


def _trim_heap() -> None:
    """Return the C heap's free pages to the OS (glibc `malloc_trim`; a no-op elsewhere).

    A process that has already run bigger steps (a search driver after distillation) keeps their freed memory in
    malloc's arenas; a new allocation reuses it without raising RSS, and the sampled peak would read ~0.
    """
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        if libc is not None and hasattr(libc, "malloc_trim"):
            libc.malloc_trim(0)
    except OSError:
        pass


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_speed(
    model: PreTrainedModel,
    batch_size: int,
    seq_len: int,
    device: str = "cpu",
    num_decode_tokens: int = 32,
    *,
    label: str = "model",
    seed: int = 0,
) -> SpeedResult:
    """Prefill `batch_size` x `seq_len` random tokens, then greedily decode `num_decode_tokens` with the KV cache.

    The model is moved to `device` and left there. Random tokens are fine for speed: the work does not depend on
    the values.
    """
    for name, value in (("batch_size", batch_size), ("seq_len", seq_len), ("num_decode_tokens", num_decode_tokens)):
        if not isinstance(value, int) or value < 1:
            raise UserError(f"{name} must be a positive integer, but got {name}={value!r}.")
    target = torch.device(device)
    model.to(target).eval()  # type: ignore[arg-type]  # transformers' wrapped `to` loses torch's signature
    dtype = next(model.parameters()).dtype
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, model.config.vocab_size, (batch_size, seq_len), generator=generator).to(target)
    with torch.inference_mode():
        model(input_ids=input_ids[:, : min(8, seq_len)], use_cache=True)  # warm-up: kernels, allocator, lazy init
        _sync(target)
        with _PeakMemory(target) as peak:
            started = time.perf_counter()
            out = model(input_ids=input_ids, use_cache=True)  # logits [B, S, V]
            _sync(target)
            prefill_s = time.perf_counter() - started
            # transformers >= 5.23 names the KV cache `cache` (`past_key_values` is deprecated, removed in 5.40)
            past, next_ids = out.cache, out.logits[:, -1:].argmax(-1)  # next_ids [B, 1]
            started = time.perf_counter()
            for _ in range(num_decode_tokens):
                out = model(input_ids=next_ids, cache=past, use_cache=True)
                past, next_ids = out.cache, out.logits[:, -1:].argmax(-1)
            _sync(target)
            decode_s = time.perf_counter() - started
    return SpeedResult(
        model=label,
        params=sum(p.numel() for p in model.parameters()),
        batch_size=batch_size,
        seq_len=seq_len,
        num_decode_tokens=num_decode_tokens,
        prefill_tok_s=batch_size * seq_len / prefill_s,
        decode_tok_s=batch_size * num_decode_tokens / decode_s,
        prefill_s=prefill_s,
        decode_s=decode_s,
        peak_mem_bytes=int(peak.peak_bytes),
        peak_mem_method=peak.method,
        kv_cache_bytes=kv_cache_bytes(model.config, batch_size, seq_len, dtype.itemsize),
        device=str(target),
        dtype=str(dtype).removeprefix("torch."),
    )
