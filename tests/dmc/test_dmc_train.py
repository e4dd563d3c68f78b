"""The retrofit: penalty, stages and ramp, a short run that compresses, an exact resume."""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path

import pytest
import torch

from nas_minitron.dmc import RetrofitConfig, compression_penalty, retrofit
from nas_minitron.dmc.attention import apply_dmc, decision_rows, dmc_modules
from nas_minitron.dmc.settings import DMCSettings
from nas_minitron.errors import UserError
from tiny_models import tiny_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_penalty_is_per_head_slot_over_the_depth_and_zero_once_the_prior_is_met() -> None:
    zeros = torch.zeros(2, 3, 2, 8)  # [L, B, H, T]
    assert float(compression_penalty(zeros, 4.0)) == pytest.approx(0.75)
    assert float(compression_penalty(zeros, 1.0)) == 0.0
    assert float(compression_penalty(torch.full_like(zeros, 0.8), 4.0)) == 0.0
    uneven = torch.zeros(1, 2, 1, 4)
    uneven[:, 0] = 1.0  # sequence 0 all merges, sequence 1 none: prior 0.5 -> (0 + 0.5) / 2, not clamp(0.5 - 0.5)
    assert float(compression_penalty(uneven, 2.0)) == pytest.approx(0.25)
    by_position = torch.zeros(3, 1, 1, 4)
    by_position[..., :2] = 1.0  # every layer merges the first half, none the second: mean alpha 0.5 = CR 2 overall,
    assert float(compression_penalty(by_position, 2.0)) == pytest.approx(0.25)  # but half the slots miss the prior
    one_layer = torch.zeros(4, 1, 2, 4)
    one_layer[0] = 1.0  # one layer of 4 merges everything: 1/4 of each slot's depth, short of CR 2's prior 0.5
    assert float(compression_penalty(one_layer, 2.0)) == pytest.approx(0.25)
    one_layer[1] = 1.0
    assert float(compression_penalty(one_layer, 2.0)) == 0.0


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


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
def test_decision_lr_scale_multiplies_only_the_decision_rows_update(family: str) -> None:
    """One stage-2 step from the same start: every parameter moves as without the scale except the rows of q[-1] /
    k[-1] (and their biases, Qwen3's norm weights), which move exactly `scale` times as far."""
    train, val = _data()
    moved = {}
    for scale in (1.0, 10.0):
        student = tiny_model(family, seed=0)
        teacher = copy.deepcopy(student).eval()
        apply_dmc(student)
        start = {n: p.detach().clone() for n, p in student.named_parameters()}
        config = RetrofitConfig(target_cr=2, num_tokens=2 * 32, seq_len=32, batch_size=2, fade_fraction=0,
                                finetune_fraction=0, decision_lr_scale=scale, warmup_fraction=0)
        retrofit(student, train, val, config, teacher=teacher)
        moved[scale] = {n: p.detach() - start[n] for n, p in student.named_parameters()}
    rows = {id(p): idx for p, idx in decision_rows(student)}
    names = {n: rows[id(p)] for n, p in student.named_parameters() if id(p) in rows}
    expected = {"q_proj.weight", "k_proj.weight"} | ({"q_proj.bias", "k_proj.bias"} if family == "qwen2" else set()) \
        | ({"q_norm.weight", "k_norm.weight"} if family == "qwen3" else set())
    assert {n.split("self_attn.")[1] for n in names} == expected
    for name, base in moved[1.0].items():
        scaled = moved[10.0][name]
        if name in names:
            idx = names[name]
            assert base[idx].abs().sum() > 0, name
            torch.testing.assert_close(scaled[idx], 10 * base[idx], rtol=1e-4, atol=1e-7)
            rest = torch.ones(base.shape[0], dtype=torch.bool)
            rest[idx] = False
            torch.testing.assert_close(scaled[rest], base[rest], rtol=0, atol=0)
        else:
            torch.testing.assert_close(scaled, base, rtol=0, atol=0, msg=name)


def test_decision_lr_scale_must_be_positive_and_the_new_defaults_keep_old_fingerprints() -> None:
    fields: dict[str, object] = dict(target_cr=2, num_tokens=1000, seq_len=32, batch_size=2)
    with pytest.raises(UserError, match="decision_lr_scale 0"):
        RetrofitConfig(**fields, decision_lr_scale=0)  # type: ignore[arg-type]
    default = RetrofitConfig(**fields)  # type: ignore[arg-type]
    assert RetrofitConfig(**fields, decision_lr_scale=30).fingerprint() != default.fingerprint()  # type: ignore[arg-type]
    data = {k: v for k, v in default.to_dict().items() if k not in ("keep_last_k", "checkpoint_every_steps",
                                                                     "decision_lr_scale", "reset_decision_rows")}
    assert default.fingerprint() == hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


def test_reset_decision_rows_zeroes_them_when_stage_2_begins() -> None:
    """fade 1 step, then 1 stage-2 step at a negligible learning rate: the decision rows (and k/q biases) are ~0
    afterwards, every other weight is as it was."""
    train, val = _data()
    student = tiny_model("qwen2", seed=0)
    teacher = copy.deepcopy(student).eval()
    apply_dmc(student)
    start = {n: p.detach().clone() for n, p in student.named_parameters()}
    config = RetrofitConfig(target_cr=2, num_tokens=4 * 2 * 32, seq_len=32, batch_size=2, fade_fraction=0.25,
                            finetune_fraction=0, lr=1e-12, warmup_fraction=0, reset_decision_rows=True)
    assert config.stage_steps() == (1, 3, 0)
    result = retrofit(student, train, val, config, teacher=teacher)
    assert result.metrics["achieved_cr"] == 1.0  # logit -5 everywhere: every head appends
    rows = {id(p): idx for p, idx in decision_rows(student)}
    for name, param in student.named_parameters():
        if id(param) in rows:
            assert start[name][rows[id(param)]].abs().max() > 1e-3, name
            assert param[rows[id(param)]].abs().max() < 1e-9, name
        else:
            torch.testing.assert_close(param, start[name], rtol=0, atol=1e-9, msg=name)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_bf16_retrofit_on_cuda_then_compressed_decoding_there(tmp_path: Path) -> None:
    """The search's dmc stage on a GPU: fp32 weights, bf16 compute, scaled and reset decision rows, a checkpoint;
    then greedy decoding with the compressed cache on CUDA equals the full hard-decision forward there."""
    from nas_minitron.dmc.cache import DMCCache

    student, teacher = _student_and_teacher()
    student.to("cuda")
    teacher.to("cuda")
    train, val = _data()
    config = RetrofitConfig(target_cr=2, num_tokens=20 * 4 * 32, seq_len=32, batch_size=4, lr=3e-3, dtype="bf16",
                            decision_lr_scale=10.0, reset_decision_rows=True)
    result = retrofit(student, train, val, config, teacher=teacher, checkpoint_dir=tmp_path / "ckpt")
    assert result.num_steps == 20 and (tmp_path / "ckpt" / "step-00000020").is_dir()
    assert all(p.dtype == torch.float32 and p.is_cuda for p in student.parameters())
    assert result.metrics["achieved_cr"] >= 1.0 and torch.isfinite(torch.tensor(result.metrics["val_kl"]))
    prompt = val[:2, :9].cuda()
    generated = student.generate(prompt, cache=DMCCache(), max_new_tokens=12, do_sample=False, pad_token_id=3)
    seq = prompt
    with torch.no_grad():
        for _ in range(12):
            seq = torch.cat([seq, student(seq, use_cache=False).logits[:, -1:].argmax(-1)], dim=1)
    assert torch.equal(generated, seq)
