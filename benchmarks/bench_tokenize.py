"""Tokenization throughput: `data.take_sequences` (one document at a time, one thread, an int64 tensor) against
`tokens.write_stream` (batched Rust tokenizer in this process, or a pool of processes; uint16 shards on disk), on
the builtin corpus's train split with the embedded SmolLM2 tokenizer, measured in one run. Every variant must yield
the same sequences (checked), so the numbers compare the same work: reading the documents, tokenizing, packing.

    python benchmarks/bench_tokenize.py [--tokens 2600000] [--seq-len 2048] [--procs 1,2,4]
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

import torch

from nas_minitron.data import take_sequences
from nas_minitron.teacher import DEFAULT_TEACHER, load_teacher_tokenizer, resolve_teacher_dir
from nas_minitron.tokens import write_stream


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=2_600_000, help="at most ~2.7M: the builtin train split")
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--procs", default="1,2", help="process counts to time (1: batched in this process)")
    args = parser.parse_args()
    tokenizer = load_teacher_tokenizer(resolve_teacher_dir(DEFAULT_TEACHER))
    num = args.tokens // args.seq_len
    print(f"{platform.node()} {os.cpu_count()} CPUs, {time.strftime('%Y-%m-%d')}; builtin train split, "
          f"{num} x {args.seq_len} tokens, {DEFAULT_TEACHER} tokenizer (vocab {len(tokenizer)})")
    start = time.perf_counter()
    expected = take_sequences("builtin", tokenizer, "train", args.seq_len, num)  # [num, T]
    base_s = time.perf_counter() - start
    rate = num * args.seq_len / base_s
    print(f"take_sequences         {base_s:7.2f} s  {rate:12,.0f} tok/s  1.00x  (int64 in RAM: "
          f"{expected.numel() * 8 / 2**20:,.0f} MiB)")
    for procs in (int(p) for p in args.procs.split(",")):
        with tempfile.TemporaryDirectory() as tmp:
            start = time.perf_counter()
            stream = write_stream(Path(tmp) / "s", "builtin", tokenizer, "train", args.seq_len, num,
                                  shard_sequences=max(1, num // 8), num_proc=procs)
            wall_s = time.perf_counter() - start
            assert torch.equal(stream.tensor(), expected), "write_stream differs from take_sequences"
            disk = sum(p.stat().st_size for p in Path(tmp, "s").glob("*.npy"))
        label = "1 process" if procs == 1 else f"{procs} processes"
        print(f"write_stream {label:<11}{wall_s:7.2f} s  {num * args.seq_len / wall_s:12,.0f} tok/s  "
              f"{base_s / wall_s:.2f}x  (shards on disk: {disk / 2**20:,.1f} MiB)")


if __name__ == "__main__":
    main()
