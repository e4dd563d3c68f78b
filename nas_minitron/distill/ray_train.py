"""Scale-out: the same `distill()` as a Ray Train `TorchTrainer` job across N workers (gloo on CPU, NCCL on GPU).

Each worker loads the student (and the teacher, or opens the shared logit cache) itself, takes every N-th training
sequence (rank r: rows r, r+N, ...), wraps the student and calls `distill()`. Every validation point is reported
by all workers (`ray.train.report` is a barrier); rank 0 attaches its checkpoint, and a restarted job resumes from
`ray.train.get_checkpoint()`.

`strategy="ddp"`: `ray.train.torch.prepare_model` wraps the student in DistributedDataParallel.
`strategy="fsdp"`, for a student whose weights + optimizer state do not fit one device: FSDP2 (`fully_shard` per
decoder layer and on the root, `nas_minitron.distill.fsdp`), not Ray's FSDP1 wrapper. Gradients are clipped by the global
norm over all shards; checkpoints and `out_dir` hold the whole student, gathered to rank 0's CPU memory
(`from_pretrained`-loadable), with the full optimizer state keyed by parameter name, so an FSDP run resumes.
The teacher is not sharded: every worker holds a full copy.

Tested on CPU with 2 gloo workers: each strategy against one process over the same global batches
(tests/test_distill_ray.py), and FSDP resume bit-exact with `distill()` in 2 gloo processes without Ray
(tests/test_fsdp.py). Not tested: NCCL on GPUs, and a Ray job restarted from its checkpoint.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nas_minitron.distill.config import DistillConfig, DistillResult, EvalPoint
from nas_minitron.errors import UserError

if TYPE_CHECKING:
    import torch

__all__ = ["STRATEGIES", "distill_ray", "ray_env"]

STRATEGIES = ("ddp", "fsdp")


def ray_env() -> dict[str, str]:
    """Environment for a local Ray cluster that listens on loopback only and sends no usage stats."""
    return {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0"}


def _restore(checkpoint_dir: Path) -> bool:
    """Copy the job's latest reported checkpoint into this worker's checkpoint_dir; True when there was one."""
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return False
    with checkpoint.as_directory() as src:
        step = json.loads((Path(src) / "state.json").read_text())["step"]
        shutil.copytree(src, checkpoint_dir / f"step-{step:08d}")
    return True


def _train_loop(loop: dict[str, Any]) -> None:
    """Runs on every worker."""
    import ray.train
    import ray.train.torch
    import torch
    from transformers import AutoModelForCausalLM

    from nas_minitron.distill.trainer import distill
    from nas_minitron.distill.fsdp import full_student_state, shard_student
    from nas_minitron.distill.logit_cache import LogitCache

    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    torch.set_num_threads(loop["threads_per_worker"])
    device = ray.train.torch.get_device()
    student = AutoModelForCausalLM.from_pretrained(loop["student_dir"], dtype=torch.float32)
    sharded = loop["strategy"] == "fsdp"
    if sharded:  # FSDP2 per decoder layer; Ray's prepare_model would wrap with FSDP1
        shard_student(student.to(device), device.type)
    else:
        student = ray.train.torch.prepare_model(student, parallel_strategy="ddp")
    teacher = None
    if loop["teacher_dir"]:
        teacher = AutoModelForCausalLM.from_pretrained(loop["teacher_dir"], dtype=torch.float32).to(device).eval()
    cache = LogitCache.open(loop["logit_cache_dir"], verify=rank == 0) if loop["logit_cache_dir"] else None
    checkpoint_dir = Path(tempfile.mkdtemp(prefix=f"distill-rank{rank}-"))
    resume = _restore(checkpoint_dir)
    written: dict[str, Path] = {}

    def on_eval(point: EvalPoint) -> None:
        path = written.pop("path", None)
        checkpoint = ray.train.Checkpoint.from_directory(str(path)) if rank == 0 and path else None
        ray.train.report({**point.to_dict(), "rank": rank}, checkpoint=checkpoint)

    result = distill(
        student,
        loop["train_sequences"][rank::world],  # [N / world, T]
        loop["val_sequences"],
        loop["config"],
        teacher=teacher,
        logit_cache=cache,
        checkpoint_dir=checkpoint_dir,
        resume=resume,
        on_eval=on_eval,
        on_checkpoint=lambda path: written.__setitem__("path", path),
    )
    if not loop["out_dir"]:
        return
    state = full_student_state(student) if sharded else None  # a collective: every rank gathers, rank 0 receives
    if rank == 0:
        getattr(student, "module", student).save_pretrained(loop["out_dir"], state_dict=state)
        Path(loop["out_dir"], "distill.json").write_text(json.dumps(result.to_dict(), indent=1))


def distill_ray(
    student_dir: str | os.PathLike[str],
    train_sequences: torch.Tensor,
    val_sequences: torch.Tensor,
    config: DistillConfig,
    *,
    storage_path: str | os.PathLike[str],
    num_workers: int = 2,
    use_gpu: bool = False,
    strategy: str = "ddp",
    teacher_dir: str | os.PathLike[str] | None = None,
    logit_cache_dir: str | os.PathLike[str] | None = None,
    out_dir: str | os.PathLike[str] | None = None,
    name: str = "distill",
    threads_per_worker: int = 1,
) -> DistillResult:
    """Run `distill()` as a Ray Train job; returns rank 0's result (its curve from the reported points).

    Call after `ray.init` (or let Ray start a local cluster); the caller owns the cluster. `out_dir`, when
    given, receives rank 0's final student (on a shared filesystem in a multi-node cluster).
    """
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    if strategy not in STRATEGIES:
        raise UserError(f"strategy must be one of {STRATEGIES} but got {strategy!r}.")
    if train_sequences.shape[0] < num_workers * config.batch_size:
        raise UserError(f"training data has {train_sequences.shape[0]} sequences, fewer than one batch of "
                        f"{config.batch_size} for each of {num_workers} workers.")
    loop = {
        "student_dir": str(student_dir), "teacher_dir": str(teacher_dir) if teacher_dir else None,
        "logit_cache_dir": str(logit_cache_dir) if logit_cache_dir else None, "config": config,
        "train_sequences": train_sequences, "val_sequences": val_sequences, "strategy": strategy,
        "out_dir": str(out_dir) if out_dir else None, "threads_per_worker": threads_per_worker,
    }
    trainer = TorchTrainer(
        _train_loop,
        train_loop_config=loop,
        scaling_config=ray.train.ScalingConfig(num_workers=num_workers, use_gpu=use_gpu),
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        run_config=ray.train.RunConfig(storage_path=str(storage_path), name=name),
    )
    result = trainer.fit()
    if result.error is not None:
        raise result.error
    record = json.loads(Path(out_dir, "distill.json").read_text()) if out_dir else None
    if record is None:  # only the last reported point is available without out_dir
        point = EvalPoint.from_dict({k: v for k, v in result.metrics.items() if k in EvalPoint.__annotations__})
        return DistillResult((point,), point.val_loss, point.val_kl, point.num_tokens, point.step, point.wall_s)
    curve = tuple(EvalPoint.from_dict(p) for p in record["curve"])
    return DistillResult(curve, curve[-1].val_loss, curve[-1].val_kl, record["num_tokens"], record["num_steps"],
                         record["wall_s"], record["resumed_from_step"])
