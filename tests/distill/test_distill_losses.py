from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from nas_minitron.distill.losses import (
    evenly_spaced_layer_map,
    forward_kl,
    intermediate_state_loss,
    topk_forward_kl,
    topk_targets,
)


def _logits(seed: int, shape=(2, 5, 50), scale: float = 3.0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale


def test_forward_kl_is_zero_on_itself_and_matches_definition() -> None:
    s, t = _logits(0), _logits(1)
    assert forward_kl(t, t).item() == pytest.approx(0.0, abs=1e-6)
    p = F.softmax(t, -1)
    expected = (p * (F.log_softmax(t, -1) - F.log_softmax(s, -1))).sum(-1).mean()
    assert forward_kl(s, t).item() == pytest.approx(expected.item(), rel=1e-5)


def test_temperature_softens_and_scales_by_t_squared() -> None:
    s, t = _logits(0), _logits(1)
    p = F.softmax(t / 2, -1)
    raw = (p * (F.log_softmax(t / 2, -1) - F.log_softmax(s / 2, -1))).sum(-1).mean()
    assert forward_kl(s, t, temperature=2.0).item() == pytest.approx(4 * raw.item(), rel=1e-5)


def test_topk_with_full_vocabulary_equals_full_kl() -> None:
    s, t = _logits(0), _logits(1)
    values, indices = topk_targets(t, 50)
    assert topk_forward_kl(s, values, indices).item() == pytest.approx(forward_kl(s, t).item(), rel=1e-5)


def test_topk_kl_is_a_lower_bound_and_exact_on_the_rest_bucket() -> None:
    s, t = _logits(0), _logits(1)
    values, indices = topk_targets(t, 5)
    sparse = topk_forward_kl(s, values, indices)
    assert 0 < sparse.item() < forward_kl(s, t).item()
    # by hand for one position: the (k+1)-outcome distributions
    p, q = F.softmax(t[0, 0], -1), F.softmax(s[0, 0], -1)
    top = indices[0, 0]
    rest_mask = torch.ones(50, dtype=torch.bool)
    rest_mask[top] = False
    p6 = torch.cat([p[top], p[rest_mask].sum()[None]])
    q6 = torch.cat([q[top], q[rest_mask].sum()[None]])
    one = topk_forward_kl(s[:1, :1], values[:1, :1], indices[:1, :1])
    assert one.item() == pytest.approx((p6 * (p6 / q6).log()).sum().item(), rel=1e-4)


def test_topk_handles_zero_rest_mass_with_finite_gradients() -> None:
    t = torch.full((1, 2, 8), -1e4)
    t[..., 3] = 0.0  # all teacher mass on one token: rest bucket exactly 0
    values, indices = topk_targets(t, 2)
    s = _logits(2, (1, 2, 8)).requires_grad_()
    loss = topk_forward_kl(s, values.half(), indices)
    loss.backward()
    assert math.isfinite(loss.item()) and torch.isfinite(s.grad).all()


def test_intermediate_state_losses() -> None:
    a, b = _logits(0, (2, 4, 8)), _logits(1, (2, 4, 8))
    assert intermediate_state_loss([a], [a * 3], "cosine").item() == pytest.approx(0.0, abs=1e-6)
    assert intermediate_state_loss([a], [b], "mse").item() == pytest.approx(F.mse_loss(a, b).item())
    with pytest.raises(ValueError, match="cosine"):
        intermediate_state_loss([a], [b], "l1")


def test_evenly_spaced_layer_map() -> None:
    assert evenly_spaced_layer_map(3, 3) == (0, 1, 2)
    assert evenly_spaced_layer_map(2, 4) == (1, 3)
    mapped = evenly_spaced_layer_map(20, 30)
    assert mapped[-1] == 29 and list(mapped) == sorted(set(mapped))
