"""The teacher-logit cache build (#13 item 2): in one process vs spread over Ray workers, on the embedded SmolLM2-135M
and builtin train sequences, measured in one run; plus the chunked output head's peak memory against full logits.

    python benchmarks/bench_logit_cache.py [--sequences 32] [--seq-len 256] [--topk 64] [--workers 2]

Every variant must produce the same cache (checked: identical arrays), so the times compare the same work. On a CPU
box the Ray workers split the cores the single process would use (1 thread each vs all of them): the comparison
says what sharding costs or gains there, not what 8 GPUs would give.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from nas_minitron.data import take_sequences
from nas_minitron.distill.logit_cache import LogitCache, build_logit_cache, teacher_topk
from nas_minitron.distill.losses import topk_targets
from nas_minitron.runtime import release_host_memory
from nas_minitron.teacher import DEFAULT_TEACHER, load_teacher, resolve_teacher_dir, tokenizer_fingerprint


def _arrays(cache: LogitCache) -> list[np.ndarray]:
    return [np.concatenate([np.asarray(a) for a in cache.logprobs]),
            np.concatenate([np.asarray(a) for a in cache.indices])]


def _peak_bytes(fn) -> int:  # type: ignore[no-untyped-def]
    """Peak growth of this process's RSS while fn runs, sampled every 10 ms (tensors above glibc's mmap threshold,
    32 MiB at most, are mapped and unmapped on their own, so the large ones show up and go away)."""
    import psutil

    me = psutil.Process()
    before = me.memory_info().rss
    peak = before
    import threading

    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.wait(0.01):
            peak = max(peak, me.memory_info().rss)

    thread = threading.Thread(target=sample)
    thread.start()
    fn()
    done.set()
    thread.join()
    return peak - before


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sequences", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--topk", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--memory-batch", type=int, default=16,
                        help="sequences of the memory comparison (more positions than one 1024-position chunk)")
    args = parser.parse_args()
    print(f"machine: {platform.node()} {os.cpu_count()} CPUs, torch {torch.__version__}, "
          f"load {os.getloadavg()[0]:.2f}; {time.strftime('%Y-%m-%d %H:%M')}")
    teacher_dir = resolve_teacher_dir(DEFAULT_TEACHER)
    teacher, tokenizer = load_teacher(DEFAULT_TEACHER)
    sequences = take_sequences("builtin", tokenizer, "train", args.seq_len, args.sequences, 0)
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        one = build_logit_cache(teacher, sequences, Path(tmp) / "one", args.topk, args.batch_size,
                                tokenizer=tokenizer, shard_sequences=max(1, args.sequences // (4 * args.workers)))
        t_one = time.perf_counter() - started
        tokens = args.sequences * args.seq_len
        print(f"one process ({torch.get_num_threads()} threads): {t_one:.1f} s, {tokens / t_one:,.0f} tok/s, "
              f"{len(one.manifest['shards'])} shards")

        from nas_minitron.distill.ray_cache import build_logit_cache_ray
        from nas_minitron.search.tune import RayOptions, connect_ray

        connect_ray(RayOptions(dashboard=False))
        started = time.perf_counter()
        many = build_logit_cache_ray(teacher_dir, sequences, Path(tmp) / "many", args.topk, args.batch_size,
                                     workers=args.workers, use_gpu=False, vocab_size=int(teacher.config.vocab_size),
                                     tokenizer_fingerprint=tokenizer_fingerprint(tokenizer),
                                     shard_sequences=max(1, args.sequences // (4 * args.workers)))
        t_many = time.perf_counter() - started
        same = all(np.array_equal(a, b) for a, b in zip(_arrays(one), _arrays(many), strict=True))
        print(f"{args.workers} Ray workers (1 thread each, teacher loaded by each): {t_many:.1f} s "
              f"({many.manifest['build_seconds']:.1f} s inside), {tokens / t_many:,.0f} tok/s; "
              f"ratio one / workers {t_one / t_many:.2f}; identical arrays: {same}")
        assert same

    batch = sequences[: args.memory_batch]
    with torch.no_grad():  # the chunked head first: whatever the first leaves in the heap favours the second
        chunked = _peak_bytes(lambda: teacher_topk(teacher, batch, args.topk))
        release_host_memory()
        full = _peak_bytes(lambda: topk_targets(teacher(input_ids=batch).logits, args.topk))
    print(f"peak RSS growth of one batch ({len(batch)} x {args.seq_len}): full logits {full / 2**20:,.0f} MiB, "
          f"chunked head {chunked / 2**20:,.0f} MiB (ratio {full / max(1, chunked):.1f}x)")


if __name__ == "__main__":
    main()
