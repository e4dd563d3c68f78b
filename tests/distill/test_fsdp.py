"""FSDP2 without Ray: `distill()` in 2 gloo processes on CPU resumes exactly and equals one process; the bf16
mixed-precision policy computes in bf16 over fp32 parameters and gradients.

The student is a tied-embedding qwen2 narrower than its teacher, so the objective's projection (a plain parameter)
is optimized and clipped together with the sharded ones.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from nas_minitron.distill.trainer import DistillConfig, EvalPoint, distill
from tiny_models import tiny_model

SEQ_LEN = 16
WORLD = 2


def _config(batch_size: int) -> DistillConfig:
    return DistillConfig(num_tokens=4 * SEQ_LEN * 4, seq_len=SEQ_LEN, batch_size=batch_size, lr=3e-3, warmup_steps=1,
                         eval_every_tokens=4 * SEQ_LEN * 2, num_val_sequences=4, is_loss="cosine", is_alpha=1.0,
                         lm_weight=0.3, clip_norm=0.5)


def _models(student_seed: int = 1):  # type: ignore[no-untyped-def]
    teacher = tiny_model("qwen2", seed=0)
    student = tiny_model("qwen2", seed=student_seed, num_hidden_layers=2, hidden_size=32, intermediate_size=64)
    return teacher, student


def _data() -> torch.Tensor:
    return torch.randint(0, 1024, (16, SEQ_LEN), generator=torch.Generator().manual_seed(0))  # [N, T]


class _Crash(Exception):
    pass


def _without_wall(curve: list[dict[str, float | None]]) -> list[dict[str, float | None]]:
    return [{k: v for k, v in point.items() if k != "wall_s"} for point in curve]  # EvalPoint.to_dict: NaN -> None


def _clipped_norm() -> float:
    """The norm `clip_grad_norm_` finds for all-ones gradients on a sharded student plus one plain parameter."""
    from nas_minitron.distill.fsdp import clip_grad_norm_, shard_student

    _, student = _models()
    shard_student(student, "cpu")
    params = [*student.parameters(), torch.nn.Parameter(torch.zeros(10))]
    for param in params:
        param.grad = torch.ones_like(param)  # a DTensor like its sharded parameter
    total = float(clip_grad_norm_(params, 0.5))
    coef = 0.5 / (total + 1e-6)
    assert all(torch.allclose(p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad,
                              torch.full(p.shape, coef)) for p in params)
    return total


def _mixed_precision_dtypes() -> dict[str, list[str]]:
    """Dtypes seen by a student sharded with the bf16 policy: its parameters, its logits (no autocast), its grads."""
    from nas_minitron.distill.fsdp import shard_student

    _, student = _models()
    shard_student(student, "cpu", bf16=True)
    logits = student(_data()[:2]).logits  # [2, T, V]
    logits.float().logsumexp(-1).mean().backward()
    return {"params": sorted({str(p.dtype) for p in student.parameters()}), "logits": [str(logits.dtype)],
            "grads": sorted({str(p.grad.dtype) for p in student.parameters() if p.grad is not None})}


def _worker(rank: int, tmp: str) -> None:
    """Straight run into a/, a run that stops after its step-2 checkpoint into b/, its resumption from b/."""
    import torch.distributed as dist

    from nas_minitron.distill.fsdp import shard_student

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/store", rank=rank, world_size=WORLD)
    data, curves = _data(), {"clip_norm": _clipped_norm(), "bf16": _mixed_precision_dtypes()}
    for name, directory, resume, student_seed in (("straight", "a", False, 1), ("stopped", "b", False, 1),
                                                  ("resumed", "b", True, 5)):
        teacher, student = _models(student_seed)  # seed 5: the resumed run's weights must come from the checkpoint

        def on_eval(point: EvalPoint, name: str = name) -> None:
            if name == "stopped" and point.step == 2:
                raise _Crash

        shard_student(student, "cpu")
        try:
            result = distill(student, data[rank::WORLD], data[:4], _config(2), teacher=teacher,
                             checkpoint_dir=Path(tmp, directory), resume=resume, on_eval=on_eval)
        except _Crash:
            dist.barrier()  # rank 0 writes its step-2 checkpoint before any rank looks for it
            continue
        curves[name] = {"curve": [p.to_dict() for p in result.curve], "resumed_from": result.resumed_from_step}
    Path(tmp, f"rank{rank}.json").write_text(json.dumps(curves))
    dist.destroy_process_group()


@pytest.mark.usefixtures("one_torch_thread")
def test_fsdp_resume_in_two_gloo_processes_reproduces_the_uninterrupted_run(tmp_path: Path) -> None:
    import torch.multiprocessing as mp

    mp.spawn(_worker, args=(str(tmp_path),), nprocs=WORLD)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(WORLD)]
    for name in ("straight", "resumed"):  # every rank reports the same metrics
        assert _without_wall(ranks[0][name]["curve"]) == _without_wall(ranks[1][name]["curve"])
    num_params = sum(p.numel() for p in _models()[1].parameters())  # tied embeddings counted once
    assert ranks[0]["clip_norm"] == pytest.approx(math.sqrt(num_params + 10), rel=1e-6)  # global, not a shard's
    # the bf16 policy: bf16 compute over fp32 master weights, gradients reduced into fp32 shards
    assert ranks[0]["bf16"] == {"params": ["torch.float32"], "logits": ["torch.bfloat16"], "grads": ["torch.float32"]}
    straight, resumed = ranks[0]["straight"], ranks[0]["resumed"]
    assert resumed["resumed_from"] == 2
    assert _without_wall(resumed["curve"]) == _without_wall(straight["curve"])  # bit-exact

    teacher, student = _models()
    data = _data()
    order = torch.cat([torch.stack([data[0::2][2 * k : 2 * k + 2], data[1::2][2 * k : 2 * k + 2]]).reshape(4, -1)
                       for k in range(4)])  # [16, T]: global batch k = rank 0's batch k then rank 1's
    single = distill(student, order, data[:4], _config(4), teacher=teacher)
    for ours, theirs in zip(straight["curve"], single.curve, strict=True):
        assert ours["val_kl"] == pytest.approx(theirs.val_kl, rel=1e-4)
        assert ours["val_loss"] == pytest.approx(theirs.val_loss, rel=1e-5)
