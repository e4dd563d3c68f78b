"""DMC attention: the stock model when nothing merges, the training path's bias, the pooling, the refusals."""

from __future__ import annotations

import pytest
import torch
from dmc_helpers import mixed_decision_model
from transformers import GPT2Config, GPT2LMHeadModel

from nas_minitron.dmc.attention import (
    DMCAttention,
    apply_dmc,
    check_supported,
    collect_decisions,
    dmc_modules,
    rotate,
    set_dmc_state,
    windowed_pool,
)
from nas_minitron.dmc.settings import DMCSettings
from nas_minitron.errors import UserError
from tiny_models import FAMILIES, tiny_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.parametrize("family", FAMILIES)
def test_all_append_with_unfaded_channels_is_the_stock_model(family: str) -> None:
    model = tiny_model(family)
    ids = torch.randint(4, 1000, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        stock = model(ids, use_cache=False).logits
        apply_dmc(model)
        for relaxed in (False, True):  # the hard and the relaxed path both pool, bias and rotate
            set_dmc_state(model, mode="dmc", channel_scale=1.0, force_append=True, relaxed=relaxed)
            torch.testing.assert_close(model(ids, use_cache=False).logits, stock, atol=1e-5, rtol=0)
        set_dmc_state(model, mode="fade", channel_scale=1.0, relaxed=None)
        torch.testing.assert_close(model(ids, use_cache=False).logits, stock, atol=1e-5, rtol=0)
        # the faded limit (channels zeroed) is no longer the stock model, and is what DMC attention computes
        set_dmc_state(model, mode="fade", channel_scale=0.0)
        faded = model(ids, use_cache=False).logits
        assert (faded - stock).abs().max() > 1e-3
        set_dmc_state(model, mode="dmc", channel_scale=0.0, force_append=True)
        torch.testing.assert_close(model(ids, use_cache=False).logits, faded, atol=1e-5, rtol=0)
    # the state dict is the stock one: same names, same tensors
    assert set(model.state_dict()) == set(tiny_model(family).state_dict())


def test_windowed_pool_is_the_weighted_mean_of_the_last_window_tokens_of_a_run() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 1, 7, 3, generator=g)
    w = torch.rand(1, 1, 7, generator=g) + 0.1
    b = torch.tensor([[[0.0, 1, 1, 1, 1, 0, 1]]])  # runs: 0-4, 5-6
    out = windowed_pool(x, w, b, window=3)
    for i, first in enumerate([0, 0, 0, 1, 2, 5, 5]):  # window 3 within each run
        ww = w[0, 0, first : i + 1]
        expected = (ww[:, None] * x[0, 0, first : i + 1]).sum(0) / ww.sum()
        torch.testing.assert_close(out[0, 0, i], expected)


def _naive_dmc(attn: DMCAttention, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor,
               sin: torch.Tensor, merge: torch.Tensor) -> torch.Tensor:
    """The inference semantics written as a loop: entries list per head, merged or appended token by token."""
    B, Hq, T, D = q.shape
    H, G, win = k.shape[1], attn.num_key_value_groups, attn.settings.window
    w = attn.merge_weights(q)
    out = torch.zeros(B, Hq, T, D)
    for bi in range(B):
        for h in range(H):
            keys: list[torch.Tensor] = []
            values: list[torch.Tensor] = []
            run: list[int] = []
            for t in range(T):
                run = [*run, t] if (t > 0 and merge[bi, h, t]) else [t]
                part = run[-win:]
                ww = w[bi, h, part]
                k_mean = (ww[:, None] * k[bi, h, part]).sum(0) / ww.sum()
                v_mean = (ww[:, None] * v[bi, h, part]).sum(0) / ww.sum()
                k_rot = rotate(k_mean[None, None, None], cos[bi : bi + 1, t : t + 1], sin[bi : bi + 1, t : t + 1],
                               0.0)[0, 0, 0]
                if len(run) > 1:
                    keys[-1], values[-1] = k_rot, v_mean
                else:
                    keys.append(k_rot)
                    values.append(v_mean)
                for g in range(G):
                    qh = rotate(q[bi : bi + 1, h * G + g : h * G + g + 1, t : t + 1], cos[bi : bi + 1, t : t + 1],
                                sin[bi : bi + 1, t : t + 1], 0.0)[0, 0, 0]
                    probs = torch.softmax(torch.stack(keys) @ qh * attn.scaling, dim=0)
                    out[bi, h * G + g, t] = probs @ torch.stack(values)
    return out


@pytest.mark.parametrize("relaxed", [False, True])
def test_full_path_masks_merged_entries_like_a_token_by_token_cache(relaxed: bool) -> None:
    """Decision logits of +-50 make the relaxed alpha exactly 0 or 1 whatever the noise: its bias log(1 - alpha)
    must then hide every merged-over entry, as the hard path's mask and the naive loop do."""
    model = tiny_model("llama")
    attn = apply_dmc(model, DMCSettings(window=4))[0]
    g = torch.Generator().manual_seed(3)
    B, T, D = 2, 16, attn.head_dim
    q = torch.randn(B, 4, T, D, generator=g)
    k = torch.randn(B, 2, T, D, generator=g)
    v = torch.randn(B, 2, T, D, generator=g)
    merge = torch.rand(B, 2, T, generator=g) < 0.6
    k[..., -1] = torch.where(merge, 55.0, -45.0)  # logit = k[-1] - 5 = +-50
    positions = torch.arange(T)[None].expand(B, T)
    cos, sin = model.model.rotary_emb(torch.zeros(B, T, D), positions)
    out, _keys, _values, b = attn._full(q, k, v, cos, sin, None, relaxed=relaxed)
    assert torch.equal(b[..., 1:] > 0.5, merge[..., 1:])
    torch.testing.assert_close(out, _naive_dmc(attn, q, k, v, cos, sin, merge), atol=1e-5, rtol=0)


def test_relaxed_path_is_random_and_hard_path_is_not() -> None:
    model = mixed_decision_model("llama")
    ids = torch.randint(4, 1000, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        hard = [model(ids, use_cache=False).logits for _ in range(2)]
        set_dmc_state(model, relaxed=True)
        relaxed = [model(ids, use_cache=False).logits for _ in range(2)]
        decisions = collect_decisions(model)
    assert torch.equal(hard[0], hard[1]) and not torch.equal(relaxed[0], relaxed[1])
    assert decisions.shape == (3, 2, 2, 24) and 0 < float(decisions.mean()) < 1


def test_decisions_get_gradients_through_the_straight_through_estimator() -> None:
    model = mixed_decision_model("qwen2").train()
    ids = torch.randint(4, 1000, (2, 16), generator=torch.Generator().manual_seed(1))
    model(ids, use_cache=False)
    collect_decisions(model).mean().backward()
    k_proj = dmc_modules(model)[0].k_proj
    assert k_proj.weight.grad is not None and k_proj.weight.grad.abs().sum() > 0


def test_unsupported_models_are_refused() -> None:
    with pytest.raises(UserError, match="head_dim 2 is too small"):
        check_supported(tiny_model("llama", head_dim=2))
    with pytest.raises(UserError, match="sliding-window"):
        check_supported(tiny_model("qwen2", use_sliding_window=True, sliding_window=16, max_window_layers=0))
    with pytest.raises(UserError, match="model_type 'gpt2' has no DMC support"):
        apply_dmc(GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64)))
