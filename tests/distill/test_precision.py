"""Mixed precision and chunked losses (#12): fp32 master weights, a frozen teacher, chunked KD / LM losses.

The master-weights test is the one that tells pure bf16 training from mixed precision: at lr 1e-5 an AdamW step
moves a weight by ~1e-5, far below bf16's spacing near 1 (2^-8 .. 2^-7), so RMSNorm weights held in bf16 never move.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from pathlib import Path

import pytest
import torch

from nas_minitron.distill.config import _NOT_FINGERPRINTED, DistillConfig
from nas_minitron.distill.losses import (
    TeacherTargets,
    chunked_logit_losses,
    forward_kl,
    next_token_loss,
    next_token_targets,
    teacher_topk_targets,
    topk_forward_kl,
    topk_targets,
)
from nas_minitron.distill.objective import final_hidden, output_head
from nas_minitron.distill.trainer import StepInfo, distill
from nas_minitron.errors import UserError
from tiny_models import FAMILIES, tiny_model

SEQ_LEN = 16
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _teacher():  # type: ignore[no-untyped-def]
    teacher = tiny_model("llama", seed=0)
    with torch.no_grad():
        teacher.lm_head.weight.mul_(30.0)  # peaked predictions: a large KL to learn from
    return teacher


def _student(seed: int = 1):  # type: ignore[no-untyped-def]
    return tiny_model("llama", seed=seed, num_hidden_layers=2, hidden_size=48, intermediate_size=64)


def _data(num: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 1024, (num, SEQ_LEN), generator=torch.Generator().manual_seed(seed))  # [N, T]


def _config(**overrides) -> DistillConfig:  # type: ignore[no-untyped-def]
    fields = dict(num_tokens=4 * SEQ_LEN * 4, seq_len=SEQ_LEN, batch_size=4, lr=1e-5, warmup_steps=1,
                  weight_decay=0.0, num_val_sequences=4, dtype="bf16")
    fields.update(overrides)
    return DistillConfig(**fields)


def _norm_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().float().clone() for n, p in model.named_parameters() if "norm" in n}


@pytest.mark.parametrize("master_weights", ["fp32", "model"])
def test_small_updates_move_weights_only_with_fp32_master_weights(master_weights: str) -> None:
    student = _student().to(torch.bfloat16)  # as transformers 5 loads a bf16 hub checkpoint
    before = _norm_weights(student)
    lines: list[str] = []
    result = distill(student, _data(8), _data(4, seed=9), _config(master_weights=master_weights),
                     teacher=_teacher(), log=lines.append)
    after = _norm_weights(student)
    moved = sum(int((after[n] != before[n]).sum()) for n in before) / sum(t.numel() for t in before.values())
    assert result.compute_dtype == "bfloat16" and result.device == "cpu" and len(lines) == 1
    if master_weights == "fp32":
        assert result.param_dtype == "float32" and {p.dtype for p in student.parameters()} == {torch.float32}
        assert "cast bfloat16 -> float32" in lines[0]
        assert moved > 0.9  # AdamW's ~1e-5 steps land in float32
        assert max(float((after[n] - before[n]).abs().max()) for n in before) < 1e-3
    else:  # pure bf16, the behaviour before #12: every RMSNorm update rounds away
        assert result.param_dtype == "bfloat16" and "cast" not in lines[0]
        assert moved == 0.0


def test_optimizer_state_is_fp32_and_resume_stays_bit_exact(tmp_path: Path) -> None:
    config = _config(num_tokens=4 * SEQ_LEN * 6, eval_every_tokens=4 * SEQ_LEN * 2, lr=1e-3)

    def run(directory: str, seed: int = 1, resume: bool = False, crash: bool = False) -> list[float]:
        steps: list[StepInfo] = []

        def on_checkpoint(path: Path) -> None:
            if crash and path.name == "step-00000002":
                raise KeyboardInterrupt

        distill(_student(seed).to(torch.bfloat16), _data(8), _data(4, seed=9), config, teacher=_teacher(),
                checkpoint_dir=tmp_path / directory, resume=resume, on_step=steps.append, on_checkpoint=on_checkpoint)
        return [s.loss for s in steps]

    straight = run("a")
    trainer = torch.load(next((tmp_path / "a").glob("step-*/trainer.pt")), weights_only=True)
    state = trainer["optimizer"]["state"]
    assert state and all(v.dtype == torch.float32 for s in state.values() for k, v in s.items() if k != "step")
    from safetensors.torch import load_file

    weights = load_file(next((tmp_path / "a").glob("step-*/student/model.safetensors")))
    assert {t.dtype for t in weights.values()} == {torch.float32}  # checkpoints hold the master weights
    with pytest.raises(KeyboardInterrupt):
        run("b", crash=True)
    assert run("b", seed=5, resume=True) == straight[2:]  # a fresh bf16 student: everything from the checkpoint


def test_teacher_is_frozen_and_keeps_its_dtype_on_cpu() -> None:
    teacher = _teacher().train()
    distill(_student(), _data(8), _data(4), _config(num_tokens=4 * SEQ_LEN * 2, lm_weight=0.5), teacher=teacher)
    params = list(teacher.parameters())
    assert not teacher.training and all(not p.requires_grad and p.grad is None for p in params)
    assert {p.dtype for p in params} == {torch.float32}  # cast to bf16 on CUDA only


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_on_cuda_the_teacher_runs_in_bf16_and_adamw_is_fused(monkeypatch: pytest.MonkeyPatch) -> None:
    built: list[torch.optim.AdamW] = []

    class Recorded(torch.optim.AdamW):
        def __init__(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
            super().__init__(*args, **kwargs)
            built.append(self)

    monkeypatch.setattr(torch.optim, "AdamW", Recorded)
    teacher, student = _teacher().cuda(), _student().to("cuda", torch.bfloat16)
    result = distill(student, _data(8), _data(4), _config(num_tokens=4 * SEQ_LEN * 2), teacher=teacher)
    assert built and all(opt.defaults.get("fused") for opt in built)
    assert {p.dtype for p in teacher.parameters()} == {torch.bfloat16}
    assert (result.param_dtype, result.compute_dtype, result.device) == ("float32", "bfloat16", "cuda:0")


def test_new_settings_are_validated_and_fingerprinted() -> None:
    with pytest.raises(UserError, match="master_weights must be one of.*'bf16'.*loss_chunk_tokens must be >= 1"):
        _config(master_weights="bf16", loss_chunk_tokens=0)
    base = _config()
    assert dataclasses.replace(base, loss_chunk_tokens=7).fingerprint() == base.fingerprint()  # rounding only
    assert dataclasses.replace(base, master_weights="model").fingerprint() != base.fingerprint()
    # at their defaults the new fields leave the fingerprint as it was before them: older checkpoints still resume
    old = {k: v for k, v in base.to_dict().items() if k not in (*_NOT_FINGERPRINTED, "master_weights")}
    assert base.fingerprint() == hashlib.sha256(json.dumps(old, sort_keys=True).encode()).hexdigest()


# --- chunked losses equal unchunked ones ------------------------------------------------------------------------

B, T, H, V = 2, 13, 16, 64  # N = 26 positions


def _problem(seed: int = 0):  # type: ignore[no-untyped-def]
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B * T, H, generator=g).requires_grad_()  # [N, H]
    head = torch.nn.Linear(H, V, bias=False)
    teacher_head = torch.nn.Linear(H + 3, V, bias=False)
    with torch.no_grad():
        head.weight.copy_(torch.randn(V, H, generator=g))
        teacher_head.weight.copy_(torch.randn(V, H + 3, generator=g))
    teacher_hidden = torch.randn(B * T, H + 3, generator=g)  # [N, H_t]
    tokens = torch.randint(0, V, (B, T), generator=g)  # [B, T]
    return hidden, head, teacher_hidden, teacher_head.requires_grad_(False), tokens


def _grads(loss: torch.Tensor, hidden: torch.Tensor, head: torch.nn.Linear) -> tuple[torch.Tensor, ...]:
    return torch.autograd.grad(loss, (hidden, head.weight))


CHUNKS = [1, 7, 13, 26, 100]  # 7 does not divide N = 26, 13 does, 100 > N


@pytest.mark.parametrize("chunk", CHUNKS)
def test_chunked_full_kd_and_lm_equal_unchunked_values_and_gradients(chunk: int) -> None:
    hidden, head, t_hidden, t_head, tokens = _problem()
    logits = head(hidden)  # [N, V]
    ref_kd = forward_kl(logits, t_head(t_hidden), temperature=2.0)
    ref_lm = next_token_loss(logits.view(B, T, V), tokens)
    ref = _grads(ref_kd + 0.3 * ref_lm, hidden, head)
    out = chunked_logit_losses(hidden, head, chunk, teacher=TeacherTargets(hidden=t_hidden, head=t_head),
                               lm_targets=next_token_targets(tokens), temperature=2.0)
    assert float(out["kd"].detach()) == pytest.approx(float(ref_kd.detach()), abs=1e-5, rel=1e-6)
    assert float(out["lm"].detach()) == pytest.approx(float(ref_lm.detach()), abs=1e-5, rel=1e-6)
    for ours, theirs in zip(_grads(out["kd"] + 0.3 * out["lm"], hidden, head), ref, strict=True):
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("chunk", CHUNKS)
def test_chunked_topk_kd_equals_unchunked_values_and_gradients(chunk: int) -> None:
    hidden, head, t_hidden, t_head, _ = _problem(1)
    ref_values, ref_indices = topk_targets(t_head(t_hidden), 5)  # [N, 5] each
    targets = teacher_topk_targets(t_hidden, t_head, 5, chunk)
    assert targets.indices is not None and torch.equal(targets.indices, ref_indices)
    torch.testing.assert_close(targets.logprobs, ref_values, atol=1e-5, rtol=0)
    ref = topk_forward_kl(head(hidden), ref_values.half(), ref_indices, temperature=1.5)  # a cache stores fp16
    cached = TeacherTargets(logprobs=ref_values.half(), indices=ref_indices)
    out = chunked_logit_losses(hidden, head, chunk, teacher=cached, temperature=1.5)
    assert set(out) == {"kd"} and float(out["kd"].detach()) == pytest.approx(float(ref.detach()), abs=1e-5, rel=1e-6)
    for ours, theirs in zip(_grads(out["kd"], hidden, head), _grads(ref, hidden, head), strict=True):
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


def test_chunked_losses_keep_no_full_logits_for_backward() -> None:
    """Tensors saved for backward: the unchunked loss keeps [N, V] ones, the chunked one nothing above N x H."""
    hidden, head, t_hidden, t_head, tokens = _problem(2)
    sizes: list[int] = []

    def record(t: torch.Tensor) -> torch.Tensor:
        sizes.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(record, lambda t: t):
        forward_kl(head(hidden), t_head(t_hidden)).backward()
    assert max(sizes) >= B * T * V  # the check sees full logits when they are kept
    sizes.clear()
    with torch.autograd.graph.saved_tensors_hooks(record, lambda t: t):
        out = chunked_logit_losses(hidden, head, 4, teacher=TeacherTargets(hidden=t_hidden, head=t_head),
                                   lm_targets=next_token_targets(tokens))
        (out["kd"] + out["lm"]).backward()
    assert max(sizes, default=0) <= max(B * T * H, 4 * V)


@pytest.mark.parametrize("family", FAMILIES)
def test_body_and_head_give_the_models_logits(family: str) -> None:
    """final_hidden + output_head (tied embeddings in qwen2/3) equal the model's own logits on every family."""
    model = tiny_model(family)
    tokens = _data(2)[:, :8]
    hidden, states = final_hidden(model, tokens, want_states=True)
    expected = model(input_ids=tokens, output_hidden_states=True)
    torch.testing.assert_close(output_head(model)(hidden), expected.logits, atol=1e-6, rtol=0)
    assert states is not None and len(states) == len(expected.hidden_states)


@pytest.mark.parametrize("topk", [0, 8])
def test_distill_curve_does_not_depend_on_the_chunk(topk: int) -> None:
    """Chunk 7 (not dividing B*T = 64) vs one chunk larger than B*T: the same run up to float rounding."""
    config = _config(num_tokens=4 * SEQ_LEN * 4, eval_every_tokens=4 * SEQ_LEN * 2, lr=3e-3, dtype="float32",
                     lm_weight=0.3, topk=topk)
    runs = []
    for chunk in (7, 1000):
        steps: list[StepInfo] = []
        result = distill(_student(), _data(8), _data(4, seed=9), dataclasses.replace(config, loss_chunk_tokens=chunk),
                         teacher=_teacher(), on_step=steps.append)
        runs.append(([s.loss for s in steps], result))
    (loss_a, a), (loss_b, b) = runs
    assert loss_a == pytest.approx(loss_b, rel=1e-5) and len(a.curve) == len(b.curve) == 3
    for p, q in zip(a.curve, b.curve, strict=True):
        assert p.val_loss == pytest.approx(q.val_loss, rel=1e-5) and p.val_kl == pytest.approx(q.val_kl, rel=1e-4)
        assert math.isfinite(p.val_kl)


def test_activation_checkpointing_with_the_body_call_changes_nothing() -> None:
    """The student's body runs with HF gradient checkpointing too (recomputed layers, the same losses)."""
    config = _config(num_tokens=4 * SEQ_LEN * 3, lr=3e-3, dtype="float32", lm_weight=0.3, loss_chunk_tokens=16)
    plain: list[float] = []
    checkpointed: list[float] = []
    distill(_student(), _data(8), _data(4), config, teacher=_teacher(), on_step=lambda s: plain.append(s.loss))
    student = _student()
    distill(student, _data(8), _data(4), dataclasses.replace(config, grad_checkpointing=True), teacher=_teacher(),
            on_step=lambda s: checkpointed.append(s.loss))
    assert any(getattr(m, "gradient_checkpointing", False) for m in student.modules())  # it was on
    assert checkpointed == pytest.approx(plain, rel=1e-6) and len(plain) == 3
