"""Scale-out: the same `distill()` as a Ray Train `TorchTrainer` job across N workers (gloo on CPU, NCCL on GPU).

Each worker loads the student (and the teacher, or opens the shared logit cache) itself, takes every N-th training
sequence (rank r: rows r, r+N, ...), wraps the student and calls `distill()`. Every validation point is reported
by all workers (`ray.train.report` is a barrier); rank 0 attaches its checkpoint, and a restarted job resumes from
`ray.train.get_checkpoint()`.

`strategy="ddp"`: `ray.train.torch.prepare_model` wraps the student in DistributedDataParallel.
`strategy="fsdp"`, for a student whose weights + optimizer state do not fit one device: FSDP2 (`fully_shard` per
decoder layer and on the root, `nas_minitron.distill.fsdp`), not Ray's FSDP1 wrapper. Gradients are clipped by the
global norm over all shards; checkpoints and `out_dir` hold the whole student, gathered to rank 0's CPU memory
(`from_pretrained`-loadable), with the full optimizer state keyed by parameter name, so an FSDP run resumes.
The teacher is not sharded: every worker holds a full copy.

Tested on CPU with 2 gloo workers: each strategy against one process over the same global batches
(tests/distill/test_distill_ray.py), and FSDP resume bit-exact with `distill()` in 2 gloo processes without Ray
(tests/distill/test_fsdp.py). Not tested: NCCL on GPUs, and a Ray job restarted from its checkpoint.

The only module of `nas_minitron.distill` that imports ray (lazily: importing it loads neither ray nor torch).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from nas_minitron._lazy import lazy_import
from nas_minitron.distill.config import DistillConfig, DistillResult, EvalPoint
from nas_minitron.distill.fsdp import full_student_state, shard_student
from nas_minitron.distill.logit_cache import LogitCache
from nas_minitron.distill.result import RECORD_FILE, save_distilled
from nas_minitron.distill.trainer import distill
from nas_minitron.errors import UserError

if TYPE_CHECKING:
    import ray.train as train_api
    import ray.train.torch as train_torch
    import torch
    import transformers
    from torch.nn.parallel import DistributedDataParallel
    from transformers import PreTrainedModel
else:
    train_api = lazy_import("ray.train")
    train_torch = lazy_import("ray.train.torch")
    torch = lazy_import("torch")
    transformers = lazy_import("transformers")

__all__ = ["STRATEGIES", "distill_ray", "ray_env"]

STRATEGIES = ("ddp", "fsdp")


def ray_env() -> dict[str, str]:
    """Environment for a local Ray cluster that listens on loopback only and sends no usage stats."""
    return {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0"}


def _restore(checkpoint_dir: Path) -> bool:
    """Copy the job's latest reported checkpoint into this worker's checkpoint_dir; True when there was one."""
    checkpoint = train_api.get_checkpoint()
    if checkpoint is None:
        return False
    with checkpoint.as_directory() as src:
        step = json.loads((Path(src) / "state.json").read_text())["step"]
        shutil.copytree(src, checkpoint_dir / f"step-{step:08d}")
    return True


def _train_loop(loop: dict[str, Any]) -> None:
    """Runs on every worker."""
    context = train_api.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    torch.set_num_threads(loop["threads_per_worker"])
    device = train_torch.get_device()
    model = transformers.AutoModelForCausalLM.from_pretrained(loop["student_dir"], dtype=torch.float32)
    sharded = loop["strategy"] == "fsdp"
    student: PreTrainedModel | DistributedDataParallel = model
    if sharded:  # FSDP2 per decoder layer; Ray's prepare_model would wrap with FSDP1
        shard_student(model.to(device), device.type)  # type: ignore[arg-type]  # transformers' wrapped `to` loses torch's signature
    else:
        student = cast("DistributedDataParallel", train_torch.prepare_model(model, parallel_strategy="ddp"))
    teacher = None
    if loop["teacher_dir"]:
        teacher = transformers.AutoModelForCausalLM.from_pretrained(loop["teacher_dir"], dtype=torch.float32)
        teacher.to(device).eval()  # type: ignore[arg-type]  # transformers' wrapped `to` loses torch's signature
    cache = LogitCache.open(loop["logit_cache_dir"], verify=rank == 0) if loop["logit_cache_dir"] else None
    checkpoint_dir = Path(tempfile.mkdtemp(prefix=f"distill-rank{rank}-"))
    resume = _restore(checkpoint_dir)
    written: dict[str, Path] = {}

    def on_eval(point: EvalPoint) -> None:
        path = written.pop("path", None)
        checkpoint = train_api.Checkpoint.from_directory(str(path)) if rank == 0 and path else None
        train_api.report({**point.to_dict(), "rank": rank}, checkpoint=checkpoint)

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
    state = full_student_state(model) if sharded else None  # a collective: every rank gathers, rank 0 receives
    if rank == 0:  # `model` is the HF model under the DDP wrapper; no tokenizer is loaded on the workers
        save_distilled(loop["out_dir"], model, None, result, config=loop["config"],
                       teacher=loop["teacher_dir"], student_source=loop["student_dir"],
                       logit_cache=loop["logit_cache_dir"], state_dict=state)


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
    given, receives rank 0's final student and its distill.json (`save_distilled`; on a shared filesystem in a
    multi-node cluster).
    """
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
    trainer = train_torch.TorchTrainer(
        _train_loop,
        train_loop_config=loop,
        scaling_config=train_api.ScalingConfig(num_workers=num_workers, use_gpu=use_gpu),
        torch_config=train_torch.TorchConfig(backend="nccl" if use_gpu else "gloo"),
        run_config=train_api.RunConfig(storage_path=str(storage_path), name=name),
    )
    result = trainer.fit()
    if result.error is not None:
        raise result.error
    if out_dir:
        return DistillResult.from_dict(json.loads(Path(out_dir, RECORD_FILE).read_text()))
    # only the last reported point is available without out_dir
    metrics = result.metrics or {}
    point = EvalPoint.from_dict({k: v for k, v in metrics.items() if k in EvalPoint.__annotations__})
    return DistillResult((point,), point.val_loss, point.val_kl, point.num_tokens, point.step, point.wall_s)
