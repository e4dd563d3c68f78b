"""What the integrity checks cost (`nas_minitron.integrity`): sha256 throughput, and a full verification as a ratio
to writing and to loading the same artifact, measured in one run; then what that means at 8B scale.

One ~512 MiB safetensors file (a float32 tensor, as a student's or checkpoint's weights) is written with
`safetensors.torch.save_file`, its checksum recorded (`write_checksums`: the one read-back after writing), loaded
back with `load_file`, and verified: sizes only (a stat per file) and in full (sha256). Loading and hashing both read
the file from the page cache it was just written through, so the ratio is hashing against a warm read, the case
where hashing is most visible; on a cold disk both are bounded by the disk and the ratio approaches 1.

    python benchmarks/bench_integrity.py [--mib 512]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import platform
import tempfile
import time
from pathlib import Path

import safetensors.torch as st
import torch

from nas_minitron.integrity import verify_checksums, write_checksums

# Artifact sizes at 8B scale (bytes), for the projection.
GB = 1e9
TOPK, SHORT_TOKENS = 64, 100_000_000  # a search's logit cache: top-64 over a 100M-token trial stream
SIZES_8B = {
    "student / winner, bf16 (8e9 params x 2 B)": 8e9 * 2,
    "trainer checkpoint (fp32 weights + Adam m, v: 8e9 x 12 B)": 8e9 * 12,
    f"logit cache (top-{TOPK}: float16 + int32 = 6 B per entry, {SHORT_TOKENS / 1e6:.0f}M tokens)":
        SHORT_TOKENS * TOPK * 6,
    "token files (int64, 100M + 100M tokens)": 200e6 * 8,
}


def _timed(action) -> float:  # type: ignore[no-untyped-def]
    start = time.perf_counter()
    action()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=512, help="size of the test file in MiB (default 512)")
    args = parser.parse_args()
    nbytes = args.mib << 20
    torch.manual_seed(0)
    tensor = torch.randn(nbytes // 4)  # float32
    print(f"machine: {platform.node()} {platform.machine()}, {os.cpu_count()} CPUs, load average "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}; torch {torch.__version__}")
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_DIR")) as tmp:
        root = Path(tmp)
        file = root / "model.safetensors"
        write_s = _timed(lambda: (st.save_file({"w": tensor}, str(file)), os.sync()))
        record_s = _timed(lambda: write_checksums(root))
        # load_file memory-maps: `clone` makes it read every byte, as loading weights into a model does
        load_s = _timed(lambda: st.load_file(str(file))["w"].clone())
        cheap_s = _timed(lambda: verify_checksums(root, "bench file", "", full=False))
        full_s = _timed(lambda: verify_checksums(root, "bench file", "", full=True))
        raw = _timed(lambda: hashlib.sha256(memoryview(tensor.numpy()).cast("B")).hexdigest())
    file_mb = nbytes / 1e6
    rate = file_mb / full_s
    print(f"file: {file_mb:,.0f} MB float32 safetensors")
    print(f"sha256 in memory (hashlib, one call): {file_mb / raw:,.0f} MB/s")
    print(f"sha256 of the file (integrity, 1 MiB blocks): {rate:,.0f} MB/s")
    print(f"write (save_file + sync) {write_s:.2f} s; checksum record after writing {record_s:.2f} s "
          f"= {record_s / write_s:.2f}x the write")
    print(f"load (load_file + copy, page cache) {load_s:.2f} s; full verify {full_s:.2f} s = "
          f"{full_s / load_s:.2f}x the load; size check {cheap_s * 1e6:.0f} us")
    print(f"at 8B scale, a full verification at {rate:,.0f} MB/s on one core:")
    for what, size in SIZES_8B.items():
        print(f"  {what}: {size / GB:,.1f} GB -> {size / 1e6 / rate:,.0f} s")


if __name__ == "__main__":
    main()
