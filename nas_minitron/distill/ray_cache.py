"""The teacher-logit cache at scale: its shards spread over Ray workers, one teacher per worker.

`build_logit_cache_ray` starts `workers` Ray actors (one GPU each with `use_gpu`, the teacher in bf16 with TF32
matmuls; else `threads` CPUs each, float32), checks that every one loaded the same weights (their
`weights_fingerprint`), and hands them the pending shards of a `CacheBuild` one at a time (`ray.util.ActorPool`,
the next shard to whichever worker finishes first). A worker memory-maps the sequences from the build's
`tokens.npy` and writes its shard's files straight into the build directory (the run directory, shared by every
node: the search's pre-flight checks that), each shard read back and checksummed once when written. A killed build
keeps its finished shards; the rerun computes only the others. The driver never loads the teacher.

Equal to `build_logit_cache` in one process over the same sequences and dtype (tests/distill/test_cache_build.py,
2 CPU workers). Not run yet: CUDA workers (no GPU was lent to this project so far; scripts/gpu_check.sh runs them).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nas_minitron._lazy import lazy_import
from nas_minitron.distill.logit_cache import CacheBuild, LogitCache, write_shard
from nas_minitron.errors import UserError

if TYPE_CHECKING:
    import numpy as np
    import ray
    import ray.util as ray_util
    import torch
else:
    np = lazy_import("numpy")
    ray = lazy_import("ray")
    ray_util = lazy_import("ray.util")
    torch = lazy_import("torch")

__all__ = ["build_logit_cache_ray"]


class _TeacherWorker:
    """One Ray actor: a frozen teacher on its device, writing the shards it is given."""

    def __init__(self, teacher_dir: str, use_gpu: bool, threads: int) -> None:
        from nas_minitron.teacher import load_teacher, local_teacher_dir

        torch.set_num_threads(max(1, threads))
        if use_gpu:
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        dtype = torch.bfloat16 if use_gpu else torch.float32
        self.error: UserError | None = None
        try:
            self.teacher = load_teacher(local_teacher_dir(teacher_dir), dtype=dtype,
                                        device="cuda" if use_gpu else "cpu")[0]
        except UserError as err:  # raised from `fingerprint`: an actor that dies in __init__ loses its exception
            self.error = err
            return
        self.teacher.requires_grad_(False)

    def fingerprint(self) -> str:
        from nas_minitron.teacher import weights_fingerprint

        if self.error is not None:
            raise self.error
        return weights_fingerprint(self.teacher)

    def write(self, partial: str, shard: int, lo: int, hi: int, topk: int, batch_size: int) -> dict[str, Any]:
        tokens = np.load(Path(partial) / "tokens.npy", mmap_mode="r")
        return write_shard(self.teacher, tokens[lo:hi], partial, shard, topk, batch_size)


def _user_error(err: Exception) -> UserError | None:
    """The UserError a Ray actor raised (a damaged teacher file, say), or None."""
    cause = getattr(err, "cause", None)
    if isinstance(cause, UserError):
        return UserError(str(cause))
    return None


def build_logit_cache_ray(
    teacher_dir: str,
    sequences: np.ndarray | torch.Tensor,
    out_dir: str | Path,
    topk: int,
    batch_size: int,
    *,
    workers: int,
    use_gpu: bool,
    vocab_size: int,
    tokenizer_fingerprint: str | None,
    shard_sequences: int = 1024,
    threads: int = 1,
    log: Callable[[str], None] = lambda _line: None,
) -> LogitCache:
    """Build the cache of the teacher at `teacher_dir` over sequences [N, T] on `workers` Ray actors (Ray must be
    initialized); returns it opened. See the module docstring."""
    started = time.monotonic()
    options: dict[str, Any] = {"num_gpus": 1, "num_cpus": 1} if use_gpu else {"num_cpus": max(1, threads)}
    actor = ray.remote(**options)(_TeacherWorker)
    actors: list[Any] = [actor.remote(teacher_dir, use_gpu, threads) for _ in range(workers)]
    try:
        try:
            prints = set(ray.get([a.fingerprint.remote() for a in actors]))
        except ray.exceptions.RayTaskError as err:
            raise _user_error(err) or err from None
        if len(prints) != 1:
            raise UserError(f"the logit cache's {workers} workers loaded different weights from {teacher_dir!r} "
                            f"(fingerprints {sorted(prints)}): its nodes do not see the same teacher files.")
        build = CacheBuild.begin(out_dir, sequences, topk=topk, vocab_size=vocab_size,
                                 shard_sequences=shard_sequences, dtype="bf16" if use_gpu else "float32",
                                 teacher_fingerprint=prints.pop(), tokenizer_fingerprint=tokenizer_fingerprint)
        done = len(build.bounds) - len(build.pending)
        if done:
            log(f"logit cache: {done} of {len(build.bounds)} shards kept from an interrupted build")
        pool = ray_util.ActorPool(actors)

        def submit(worker: Any, shard: int) -> Any:
            lo, hi = build.bounds[shard]
            return worker.write.remote(str(build.partial), shard, lo, hi, topk, batch_size)

        try:
            for record in pool.map_unordered(submit, build.pending):
                done += 1
                log(f"logit cache: shard {record['shard']} written ({done}/{len(build.bounds)})")
        except ray.exceptions.RayTaskError as err:
            raise _user_error(err) or err from None
        return build.finish({"workers": workers, "device": "cuda" if use_gpu else "cpu",
                             "build_seconds": round(time.monotonic() - started, 3),
                             "resumed_shards": len(build.bounds) - len(build.pending)})
    finally:
        for a in actors:
            ray.kill(a)
