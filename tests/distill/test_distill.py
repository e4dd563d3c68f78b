from __future__ import annotations

import dataclasses
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nas_minitron.distill.config import DistillResult
from nas_minitron.distill.result import save_distilled
from nas_minitron.distill.trainer import DistillConfig, NonFiniteLossError, StepInfo, distill
from nas_minitron.errors import UserError
from tiny_models import tiny_model

SEQ_LEN = 16


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _teacher():  # type: ignore[no-untyped-def]
    """A tiny teacher with peaked predictions (scaled output head), so that KL to it is large at the start."""
    teacher = tiny_model("llama", seed=0)
    with torch.no_grad():
        teacher.lm_head.weight.mul_(30.0)
    return teacher


def _student(seed: int = 1, **overrides):  # type: ignore[no-untyped-def]
    fields = dict(num_hidden_layers=2, hidden_size=48, intermediate_size=64)
    fields.update(overrides)
    return tiny_model("llama", seed=seed, **fields)


def _data(num: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 1024, (num, SEQ_LEN), generator=torch.Generator().manual_seed(seed))  # [N, T]


def _config(**overrides) -> DistillConfig:  # type: ignore[no-untyped-def]
    fields = dict(num_tokens=4 * SEQ_LEN * 12, seq_len=SEQ_LEN, batch_size=4, lr=3e-3, warmup_steps=2,
                  eval_every_tokens=4 * SEQ_LEN * 4, num_val_sequences=8)
    fields.update(overrides)
    return DistillConfig(**fields)


def test_kd_lowers_validation_kl_and_reports_points() -> None:
    points = []
    data = _data(16)  # validation on the training sequences: the student must fit the teacher on them
    result = distill(_student(), data, data, _config(lr=1e-2), teacher=_teacher(), on_eval=points.append)
    assert [p.step for p in points] == [0, 4, 8, 12] and list(result.curve) == points
    assert math.isnan(points[0].train_loss) and all(math.isfinite(p.train_loss) for p in points[1:])
    assert points[-1].val_kl < points[1].val_kl < points[0].val_kl
    assert result.val_kl < 0.9 * points[0].val_kl
    assert result.num_tokens == 12 * 4 * SEQ_LEN and result.num_steps == 12


def test_intermediate_state_loss_trains_a_projection_with_auto_alpha() -> None:
    losses: list[StepInfo] = []
    config = _config(is_loss="cosine", num_tokens=4 * SEQ_LEN * 3, eval_every_tokens=0)
    result = distill(_student(), _data(8), _data(4, seed=9), config, teacher=_teacher(), on_step=losses.append)
    assert len(losses) == 3 and all(math.isfinite(s.loss) for s in losses)
    fixed = dataclasses.replace(config, is_loss="mse", is_alpha=0.5)
    assert math.isfinite(distill(_student(), _data(8), _data(4, seed=9), fixed, teacher=_teacher(),
                                 layer_map=(0, 2)).val_kl)
    assert result.num_steps == 3


def test_lm_only_training_without_a_teacher() -> None:
    config = _config(kd_weight=0.0, lm_weight=1.0, num_tokens=4 * SEQ_LEN * 8, lr=1e-2)
    data = _data(4)
    result = distill(_student(), data, data, config)
    assert math.isnan(result.val_kl) and result.val_loss < result.curve[0].val_loss


def test_grad_accumulation_matches_one_big_batch() -> None:
    data, val = _data(8), _data(4, seed=9)
    one = distill(_student(), data, val, _config(batch_size=8, num_tokens=8 * SEQ_LEN * 2), teacher=_teacher())
    two = distill(_student(), data, val, _config(batch_size=4, grad_accum=2, num_tokens=8 * SEQ_LEN * 2),
                  teacher=_teacher())
    assert two.num_steps == one.num_steps == 2
    assert two.val_kl == pytest.approx(one.val_kl, rel=1e-4)


def _losses_and_curve(student, config, ckpt: Path, resume: bool = False, crash_at: int | None = None):  # type: ignore[no-untyped-def]
    steps: list[StepInfo] = []

    def crash(path: Path) -> None:
        if crash_at is not None and path.name == f"step-{crash_at:08d}":
            raise KeyboardInterrupt

    result = distill(student, _data(12), _data(6, seed=9), config, teacher=_teacher(), checkpoint_dir=ckpt,
                     resume=resume, on_step=steps.append, on_checkpoint=crash)
    return [s.loss for s in steps], result


def test_resume_reproduces_the_uninterrupted_run_exactly(tmp_path: Path) -> None:
    config = _config(is_loss="cosine", lm_weight=0.3)  # the projection and its optimizer state are resumed too
    straight, full = _losses_and_curve(_student(), config, tmp_path / "a")
    with pytest.raises(KeyboardInterrupt):
        _losses_and_curve(_student(), config, tmp_path / "b", crash_at=4)
    # a fresh student object: everything must come from the checkpoint
    second, resumed = _losses_and_curve(_student(seed=5), config, tmp_path / "b", resume=True)
    assert resumed.resumed_from_step == 4 and len(second) == len(straight) - 4
    assert second == straight[4:]  # bit-exact on CPU float32
    assert [p.val_loss for p in resumed.curve] == [p.val_loss for p in full.curve]
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == ["step-00000008", "step-00000012"]  # keep_last_k


def test_refuses_existing_checkpoints_without_resume(tmp_path: Path) -> None:
    config = _config(num_tokens=4 * SEQ_LEN * 4)
    distill(_student(), _data(8), _data(4), config, teacher=_teacher(), checkpoint_dir=tmp_path)
    with pytest.raises(UserError, match="--resume"):
        distill(_student(), _data(8), _data(4), config, teacher=_teacher(), checkpoint_dir=tmp_path)


def test_refuses_truncated_and_foreign_checkpoints(tmp_path: Path) -> None:
    config = _config(num_tokens=4 * SEQ_LEN * 4)
    distill(_student(), _data(8), _data(4), config, teacher=_teacher(), checkpoint_dir=tmp_path / "c")
    with pytest.raises(UserError, match="belongs to student"):
        distill(_student(hidden_size=32), _data(8), _data(4), config, teacher=_teacher(),
                checkpoint_dir=tmp_path / "c", resume=True)
    with pytest.raises(UserError, match="other distillation settings"):
        distill(_student(), _data(8), _data(4), dataclasses.replace(config, lr=1e-2), teacher=_teacher(),
                checkpoint_dir=tmp_path / "c", resume=True)
    shutil.copytree(tmp_path / "c", tmp_path / "t")
    weights = next((tmp_path / "t").glob("step-*/student/model.safetensors"))
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(UserError, match="truncated"):
        distill(_student(), _data(8), _data(4), config, teacher=_teacher(), checkpoint_dir=tmp_path / "t",
                resume=True)
    (weights.parent.parent / "state.json").unlink()
    with pytest.raises(UserError, match="incomplete or truncated"):
        distill(_student(), _data(8), _data(4), config, teacher=_teacher(), checkpoint_dir=tmp_path / "t",
                resume=True)


def test_non_finite_loss_stops_at_once_naming_the_step() -> None:
    student = _student()
    with torch.no_grad():
        student.model.norm.weight.fill_(float("nan"))
    with pytest.raises(NonFiniteLossError, match="step 1") as info:
        distill(student, _data(8), _data(4), _config(), teacher=_teacher())
    assert isinstance(info.value, RuntimeError) and info.value.step == 1


def test_bad_inputs_are_user_errors() -> None:
    with pytest.raises(UserError, match="fewer than one batch"):
        distill(_student(), _data(3), _data(4), _config(), teacher=_teacher())
    with pytest.raises(UserError, match="vocabulary"):
        distill(_student(vocab_size=512), _data(8), _data(4), _config(), teacher=_teacher())
    with pytest.raises(UserError, match="empty"):
        distill(_student(), [], _data(4), _config(), teacher=_teacher())
    with pytest.raises(UserError, match="batch_size must be >= 1.*lr must be > 0"):
        _config(batch_size=0, lr=0.0)


def test_iterable_batches_resume_by_position(tmp_path: Path) -> None:
    batches = list(_data(12).split(4))  # three [4, T] micro-batches, re-iterable
    config = _config(num_tokens=4 * SEQ_LEN * 6)
    straight: list[StepInfo] = []
    distill(_student(), batches, _data(4), config, teacher=_teacher(), on_step=straight.append)
    resumed: list[StepInfo] = []

    def crash(path: Path) -> None:
        if path.name == "step-00000004":
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        distill(_student(), batches, _data(4), config, teacher=_teacher(), checkpoint_dir=tmp_path,
                on_checkpoint=crash)
    distill(_student(), batches, _data(4), config, teacher=_teacher(), checkpoint_dir=tmp_path, resume=True,
            on_step=resumed.append)
    assert [s.loss for s in resumed] == [s.loss for s in straight[4:]]


def test_save_distilled_writes_a_loadable_student_and_one_record(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    student, config = _student(), _config(num_tokens=4 * SEQ_LEN * 2)
    result = distill(student, _data(8), _data(4, seed=1), config, teacher=_teacher())
    out = save_distilled(tmp_path / "out", student, None, result, config=config, teacher="t", data="builtin",
                         extra_files={"pruning.json": "{}"})
    record = json.loads((out / "distill.json").read_text())
    assert list(record) == ["teacher", "student", "data", "logit_cache", "config", "num_tokens", "num_steps",
                            "val_loss", "val_kl", "wall_s", "resumed_from_step", "device", "param_dtype",
                            "compute_dtype", "curve"]
    assert record["config"] == config.to_dict() and record["student"] is None and record["curve"][0]["step"] == 0
    assert (record["device"], record["param_dtype"], record["compute_dtype"]) == ("cpu", "float32", "float32")
    assert DistillResult.from_dict(record) == result
    old = {k: v for k, v in record.items() if k not in ("device", "param_dtype", "compute_dtype")}  # before #12
    assert DistillResult.from_dict(old) == dataclasses.replace(result, device=None, param_dtype=None,
                                                               compute_dtype=None)
    assert (out / "pruning.json").read_text() == "{}"
    loaded = AutoModelForCausalLM.from_pretrained(out)
    assert all(torch.equal(a, b) for a, b in zip(loaded.parameters(), student.parameters(), strict=True))


def test_importing_distill_stays_light() -> None:
    code = ("import sys, nas_minitron.distill, nas_minitron.distill.ray_train, nas_minitron.distill.result; "
            "print(sorted(m for m in ('torch', 'ray', 'transformers', 'numpy', 'safetensors') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_time_based_checkpoints_between_validations_resume_exactly(tmp_path: Path) -> None:
    """checkpoint_minutes: a checkpoint whenever that much wall time has passed (here: every step), even where no
    validation falls; a run killed between validations resumes from the newest one, bit-exact."""
    config = _config(eval_every_tokens=4 * SEQ_LEN * 12, checkpoint_minutes=1e-9)  # validation at 0 and 12 only
    straight, full = _losses_and_curve(_student(), config, tmp_path / "a")
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["step-00000011", "step-00000012"]  # keep_last_k
    steps: list[float] = []

    def crash(info: StepInfo) -> None:
        steps.append(info.loss)
        if info.step == 6:  # the step-5 checkpoint is written; step 6's is not
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        distill(_student(), _data(12), _data(6, seed=9), config, teacher=_teacher(), checkpoint_dir=tmp_path / "b",
                on_step=crash)
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == ["step-00000004", "step-00000005"]
    second, resumed = _losses_and_curve(_student(seed=5), config, tmp_path / "b", resume=True)
    assert resumed.resumed_from_step == 5 and second == straight[5:]
    assert [p.val_loss for p in resumed.curve] == [p.val_loss for p in full.curve]
    untimed = _config(eval_every_tokens=4 * SEQ_LEN * 12)
    _losses_and_curve(_student(), untimed, tmp_path / "c")
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == ["step-00000012"]  # off by default
