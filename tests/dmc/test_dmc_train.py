"""The retrofit: penalty, stages and ramp, a short run that compresses, an exact resume."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from nas_minitron.dmc import RetrofitConfig, compression_penalty, retrofit
from nas_minitron.dmc.attention import apply_dmc, dmc_modules
from nas_minitron.dmc.settings import DMCSettings
from nas_minitron.errors import UserError
from tiny_models import tiny_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_penalty_is_per_sequence_and_zero_once_the_prior_is_met() -> None:
    zeros = torch.zeros(2, 3, 2, 8)  # [L, B, H, T]
    assert float(compression_penalty(zeros, 4.0)) == pytest.approx(0.75)
    assert float(compression_penalty(zeros, 1.0)) == 0.0
    assert float(compression_penalty(torch.full_like(zeros, 0.8), 4.0)) == 0.0
    uneven = torch.zeros(1, 2, 1, 4)
    uneven[:, 0] = 1.0  # sequence 0 all merges, sequence 1 none: prior 0.5 -> (0 + 0.5) / 2, not clamp(0.5 - 0.5)
    assert float(compression_penalty(uneven, 2.0)) == pytest.approx(0.25)


def test_stages_fade_and_ramp() -> None:
    config = RetrofitConfig(target_cr=4, num_tokens=100 * 32, seq_len=32, batch_size=1, fade_fraction=0.1,
                            finetune_fraction=0.2)
    assert config.total_steps == 100 and config.stage_steps() == (10, 70, 20)
    points = [config.point(s) for s in range(100)]
    assert [p.stage for p in points] == [1] * 10 + [2] * 70 + [3] * 20
    assert points[0].channel_scale == 1.0 and points[4].channel_scale == pytest.approx(0.5)
    assert all(p.channel_scale == 0.0 for p in points[8:])  # zero from 0.8 of stage 1 on
    assert all(p.target_cr == 1.0 for p in points[:10])
    ramp = [p.target_cr for p in points[10:80]]
    assert ramp == pytest.approx([1 + 3 * (i + 1) / 70 for i in range(70)])  # linear, the target on its last step
    assert all(p.target_cr == 4.0 for p in points[80:]) and points[80].prior == pytest.approx(0.75)


@pytest.mark.parametrize("bad, match", [
    (dict(target_cr=0.5), "target compression ratio 0.5"),
    (dict(num_tokens=10), "less than one optimizer step"),
    (dict(loss="mse"), "loss 'mse'"),
    (dict(fade_fraction=0.5, finetune_fraction=0.5), "leave room"),
])
def test_bad_settings_are_refused(bad: dict[str, object], match: str) -> None:
    fields: dict[str, object] = dict(target_cr=2, num_tokens=1000, seq_len=32, batch_size=2)
    with pytest.raises(UserError, match=match):
        RetrofitConfig(**{**fields, **bad})  # type: ignore[arg-type]


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randint(4, 1024, (64, 32), generator=g), torch.randint(4, 1024, (8, 32), generator=g)


def _student_and_teacher(seed: int = 0) -> tuple[torch.nn.Module, torch.nn.Module]:
    student = tiny_model("llama", seed=seed)
    teacher = copy.deepcopy(student).eval()
    apply_dmc(student, DMCSettings())
    return student, teacher


def test_a_short_retrofit_compresses_toward_the_target() -> None:
    student, teacher = _student_and_teacher()
    train, val = _data()
    config = RetrofitConfig(target_cr=4, num_tokens=100 * 4 * 32, seq_len=32, batch_size=4, lr=3e-3)
    steps = []
    result = retrofit(student, train, val, config, teacher=teacher, on_step=steps.append)
    assert result.num_steps == 100 and [s.stage for s in steps].count(1) == 10
    assert all(s.achieved_cr == 1.0 for s in steps[:10])
    assert result.metrics["achieved_cr"] > 2.0, result.metrics  # from 1.0 (a fresh model appends everything)
    assert len(result.metrics["per_layer_cr"]) == 3 and len(result.metrics["per_head_cr"][0]) == 2
    assert all(m.mode == "dmc" and m.channel_scale == 0.0 for m in dmc_modules(student))
    assert not student.training and result.metrics["val_kl"] is not None


def test_lm_loss_needs_no_teacher_and_kd_does() -> None:
    student, _teacher = _student_and_teacher()
    train, val = _data()
    config = RetrofitConfig(target_cr=2, num_tokens=4 * 2 * 32, seq_len=32, batch_size=2, loss="lm")
    assert retrofit(student, train, val, config).metrics["val_kl"] is None
    with pytest.raises(UserError, match="needs a teacher"):
        retrofit(student, train, val, RetrofitConfig(target_cr=2, num_tokens=64, seq_len=32, batch_size=2))


def test_resume_is_exact(tmp_path: Path) -> None:
    train, val = _data()
    config = RetrofitConfig(target_cr=3, num_tokens=12 * 2 * 32, seq_len=32, batch_size=2, lr=3e-3,
                            checkpoint_every_steps=4)
    whole, teacher = _student_and_teacher()
    retrofit(whole, train, val, config, teacher=teacher, checkpoint_dir=tmp_path / "a")
    first, teacher = _student_and_teacher()
    retrofit(first, train, val, config, teacher=teacher, checkpoint_dir=tmp_path / "b", stop_after_steps=5)
    assert (tmp_path / "b" / "step-00000005").is_dir()
    resumed, teacher = _student_and_teacher()
    result = retrofit(resumed, train, val, config, teacher=teacher, checkpoint_dir=tmp_path / "b", resume=True)
    assert result.num_steps == 12
    for (name, a), b in zip(whole.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    other = RetrofitConfig(target_cr=2, num_tokens=12 * 2 * 32, seq_len=32, batch_size=2, lr=3e-3)
    with pytest.raises(UserError, match="other distillation settings"):
        retrofit(_student_and_teacher()[0], train, val, other, teacher=teacher, checkpoint_dir=tmp_path / "b",
                 resume=True)
    fewer_kv, teacher = tiny_model("llama", num_key_value_heads=1), None
    apply_dmc(fewer_kv)
    with pytest.raises(UserError, match="belongs to student"):
        retrofit(fewer_kv, train, val, config, teacher=copy.deepcopy(fewer_kv), checkpoint_dir=tmp_path / "b",
                 resume=True)
