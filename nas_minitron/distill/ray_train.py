"""Scale-out: the same `distill()` as a Ray Train `TorchTrainer` job across N workers (gloo on CPU, NCCL on GPU).

Each worker loads the student (fp32: the master weights) and the teacher (frozen; bf16 when the run computes in
bf16), or opens the shared logit cache, itself; it reads the token tensors from their files (passed by path, never
through the Ray config) and takes every N-th training sequence (rank r: rows r, r+N, ...), wraps the student and
calls `distill()`. Every validation point is reported by all workers (`ray.train.report` is a barrier).
Checkpoints: into the caller's `checkpoint_dir` (shared by all ranks, rank 0 writes; the search's winners use
this, so a crashed driver resumes them), or else attached to rank 0's reports, a restarted job resuming from
`ray.train.get_checkpoint()`.

`strategy="ddp"`: `ray.train.torch.prepare_model` wraps the student in DistributedDataParallel.
`strategy="fsdp"`, for a student whose weights + optimizer state do not fit one device: FSDP2 (`fully_shard` per
decoder layer and on the root, `nas_minitron.distill.fsdp`), not Ray's FSDP1 wrapper; with `config.dtype == "bf16"`
under the bf16/fp32 mixed-precision policy (bf16 compute, fp32 master weights and gradient reduction). Gradients
are clipped by the global norm over all shards; checkpoints and `out_dir` hold the whole student, gathered to rank
0's CPU memory (`from_pretrained`-loadable), with the full optimizer state keyed by parameter name, so an FSDP run
resumes. The teacher is not sharded: every worker holds a full copy.

Tested on CPU with 2 gloo workers: each strategy against one process over the same global batches, FSDP2 with the
bf16 policy within a stated tolerance of one bf16-autocast process, and a run resumed from `checkpoint_dir`
(tests/distill/test_distill_ray.py); FSDP resume bit-exact with `distill()` in 2 gloo processes without Ray
(tests/distill/test_fsdp.py). Not tested: NCCL on GPUs, and a Ray job restarted from Ray's own checkpoint.

With `distill.ray_cache`, the only modules of `nas_minitron.distill` that import ray (lazily: importing them loads
neither ray nor torch).
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
from nas_minitron.teacher import local_teacher_dir
from nas_minitron.tokens import open_tokens

if TYPE_CHECKING:
    import ray
    import ray.train as train_api
    import ray.train.torch as train_torch
    import torch
    import transformers
    from torch.nn.parallel import DistributedDataParallel
    from transformers import PreTrainedModel
else:
    ray = lazy_import("ray")
    train_api = lazy_import("ray.train")
    train_torch = lazy_import("ray.train.torch")
    torch = lazy_import("torch")
    transformers = lazy_import("transformers")

__all__ = ["FAULT_ENV", "STRATEGIES", "check_cluster", "distill_ray", "fault_after_checkpoint", "ray_env"]

STRATEGIES = ("ddp", "fsdp")
FAULT_ENV = "NAS_MINITRON_FAULT_DISTILL"  # fault injection for tests: `fault_after_checkpoint`


def ray_env() -> dict[str, str]:
    """Environment for a local Ray cluster that listens on loopback only and sends no usage stats."""
    return {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0"}


def check_cluster(num_workers: int, use_gpu: bool, flag: str) -> None:
    """UserError (naming `flag`) when the connected Ray cluster has fewer GPUs (or CPUs) than `num_workers`.

    Ray Train would otherwise wait for the resources forever, printing nothing.
    """
    total = ray.cluster_resources()
    kind = "GPU" if use_gpu else "CPU"
    if num_workers > total.get(kind, 0):
        raise UserError(f"{flag} {num_workers} but the Ray cluster has {total.get(kind, 0):g} {kind}s; "
                        f"valid: 1..{int(total.get(kind, 0))}.")


def fault_after_checkpoint(name: str, step: int) -> None:
    """Fault injection for tests: with NAS_MINITRON_FAULT_DISTILL=<name>, the run called `name` raises at its first
    checkpointed validation point (step > 0), as a crash after a checkpoint would stop it. No-op unless set."""
    if step > 0 and os.environ.get(FAULT_ENV) == name:
        raise RuntimeError(f"injected fault ({FAULT_ENV}={name}) after the step-{step} checkpoint")


def _restore(checkpoint_dir: Path) -> bool:
    """Copy the job's latest reported checkpoint into this worker's checkpoint_dir; True when there was one."""
    checkpoint = train_api.get_checkpoint()
    if checkpoint is None:
        return False
    with checkpoint.as_directory() as src:
        step = json.loads((Path(src) / "state.json").read_text())["step"]
        shutil.copytree(src, checkpoint_dir / f"step-{step:08d}")
    return True


def _models(loop: dict[str, Any], device: torch.device) -> tuple[PreTrainedModel, PreTrainedModel | None]:
    """(fp32 student on `device`, unsharded; frozen eval teacher or None, bf16 when the run computes in bf16)."""
    config: DistillConfig = loop["config"]
    model = transformers.AutoModelForCausalLM.from_pretrained(loop["student_dir"], dtype=torch.float32)
    model.to(device)  # type: ignore[arg-type]  # transformers' wrapped `to` loses torch's signature
    if not loop["teacher_dir"]:
        return model, None
    dtype = torch.bfloat16 if config.dtype == "bf16" else torch.float32  # frozen: no master weights needed
    # a hub teacher's snapshot folder at its pinned commit, fetched into this node's HF cache if not shared
    teacher = transformers.AutoModelForCausalLM.from_pretrained(local_teacher_dir(loop["teacher_dir"]), dtype=dtype)
    teacher.to(device).eval()  # type: ignore[arg-type]  # transformers' wrapped `to` loses torch's signature
    teacher.requires_grad_(False)
    return model, teacher


def _train_loop(loop: dict[str, Any]) -> None:
    """Runs on every worker."""
    context = train_api.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    torch.set_num_threads(loop["threads_per_worker"])
    device = train_torch.get_device()
    config: DistillConfig = loop["config"]
    model, teacher = _models(loop, device)
    sharded = loop["strategy"] == "fsdp"
    student: PreTrainedModel | DistributedDataParallel = model
    if sharded:  # FSDP2 per decoder layer; Ray's prepare_model would wrap with FSDP1
        shard_student(model, device.type, bf16=config.dtype == "bf16")
    else:
        student = cast("DistributedDataParallel", train_torch.prepare_model(model, parallel_strategy="ddp"))
    cache = LogitCache.open(loop["logit_cache_dir"], verify=rank == 0) if loop["logit_cache_dir"] else None
    if loop["checkpoint_dir"]:  # the caller's directory (shared by all ranks); Ray keeps no copy
        checkpoint_dir, resume, via_ray = Path(loop["checkpoint_dir"]), loop["resume"], False
    else:
        checkpoint_dir = Path(tempfile.mkdtemp(prefix=f"distill-rank{rank}-"))
        resume, via_ray = _restore(checkpoint_dir), True
    written: dict[str, Path] = {}

    def on_eval(point: EvalPoint) -> None:
        path = written.pop("path", None)
        attach = via_ray and rank == 0 and path is not None
        checkpoint = train_api.Checkpoint.from_directory(str(path)) if attach else None
        train_api.report({**point.to_dict(), "rank": rank}, checkpoint=checkpoint)
        fault_after_checkpoint(loop["name"], point.step)  # every rank: no rank is left waiting in a collective

    result = distill(
        student,
        open_tokens(loop["train_path"]).batches(config.batch_size, rank, world),  # rows rank::world, read as used
        open_tokens(loop["val_path"]).tensor(),  # [V, T]
        config,
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
        save_distilled(loop["out_dir"], model, None, result, config=config,
                       teacher=loop["teacher_dir"], student_source=loop["student_dir"],
                       logit_cache=loop["logit_cache_dir"], state_dict=state)


def distill_ray(
    student_dir: str | os.PathLike[str],
    train_path: str | os.PathLike[str],
    val_path: str | os.PathLike[str],
    config: DistillConfig,
    *,
    storage_path: str | os.PathLike[str],
    num_workers: int = 2,
    use_gpu: bool = False,
    strategy: str = "ddp",
    teacher_dir: str | os.PathLike[str] | None = None,
    logit_cache_dir: str | os.PathLike[str] | None = None,
    out_dir: str | os.PathLike[str] | None = None,
    checkpoint_dir: str | os.PathLike[str] | None = None,
    resume: bool = False,
    name: str = "distill",
    threads_per_worker: int = 1,
) -> DistillResult:
    """Run `distill()` as a Ray Train job; returns rank 0's result (its curve from the reported points).

    The token streams go to the workers by path (`nas_minitron.tokens` directories, or an older run's
    `data.save_sequences` files; [N, T] and [V, T]): each worker memory-maps them and reads only its own rows
    (rank::world) as it trains, so nothing large passes through Ray's object store or any worker's memory. With
    `checkpoint_dir` (on a filesystem every node sees), rank 0 checkpoints there and every rank resumes from its
    newest checkpoint when `resume`, as `distill()` does in one process; without it, checkpoints go to Ray
    (`storage_path`) and a restarted job resumes from `ray.train.get_checkpoint()`. Call after `ray.init` (or let
    Ray start a local cluster); the caller owns the cluster. `out_dir`, when given, receives rank 0's final student
    and its distill.json (`save_distilled`; on a shared filesystem in a multi-node cluster).
    """
    if strategy not in STRATEGIES:
        raise UserError(f"strategy must be one of {STRATEGIES} but got {strategy!r}.")
    num_train = open_tokens(train_path).num_sequences
    if num_train < num_workers * config.batch_size:
        raise UserError(f"training data has {num_train} sequences, fewer than one batch of "
                        f"{config.batch_size} for each of {num_workers} workers.")
    loop = {
        "student_dir": str(student_dir), "teacher_dir": str(teacher_dir) if teacher_dir else None,
        "logit_cache_dir": str(logit_cache_dir) if logit_cache_dir else None, "config": config,
        "train_path": str(Path(train_path).resolve()), "val_path": str(Path(val_path).resolve()),
        "strategy": strategy, "out_dir": str(out_dir) if out_dir else None, "threads_per_worker": threads_per_worker,
        "checkpoint_dir": str(Path(checkpoint_dir).resolve()) if checkpoint_dir else None, "resume": resume,
        "name": name,
    }
    trainer = train_torch.TorchTrainer(
        _train_loop,
        train_loop_config=loop,
        scaling_config=train_api.ScalingConfig(num_workers=num_workers, use_gpu=use_gpu),
        torch_config=train_torch.TorchConfig(backend="nccl" if use_gpu else "gloo"),
        run_config=train_api.RunConfig(storage_path=str(Path(storage_path).resolve()), name=name),
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
