"""The compressed cache: token-by-token decoding equals the full hard-decision forward, and generate() runs on it."""

from __future__ import annotations

import pytest
import torch
from dmc_helpers import mixed_decision_model

from nas_minitron.dmc.attention import collect_decisions
from nas_minitron.dmc.cache import DMCCache, cache_stats
from tiny_models import FAMILIES

pytestmark = pytest.mark.usefixtures("one_torch_thread")

T = 40


def _ids(batch: int = 2, length: int = T) -> torch.Tensor:
    return torch.randint(4, 1000, (batch, length), generator=torch.Generator().manual_seed(7))


@pytest.mark.parametrize("family", FAMILIES)
def test_token_by_token_decoding_equals_the_full_hard_forward(family: str) -> None:
    model = mixed_decision_model(family)
    ids = _ids()
    with torch.no_grad():
        full = model(ids, use_cache=False).logits  # [B, T, V]
        decisions = collect_decisions(model)  # [L, B, H, T]
        cache = DMCCache()
        steps = [model(ids[:, t : t + 1], cache=cache, use_cache=True).logits for t in range(T)]
    share = float(decisions.mean())
    assert 0.1 < share < 0.9, f"the test needs both merges and appends, got a merge share of {share:.2f}"
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=0)
    stats = cache_stats(cache)
    L, B, H, _ = decisions.shape
    assert stats["tokens"] == L * B * H * T
    assert stats["entries"] == int((decisions < 0.5).sum())  # one entry per append (token 0 always appends)
    assert stats["cr"] == pytest.approx(1 / (1 - share))
    assert stats["entry_bytes"] <= stats["allocated_bytes"] < 2 * L * B * H * T * model.config.head_dim * 4


@pytest.mark.parametrize("split", [1, 17, T - 1])
def test_prefill_then_chunked_decoding_equals_the_full_forward(split: int) -> None:
    model = mixed_decision_model("qwen3")
    ids = _ids()
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
        cache = DMCCache()
        first = model(ids[:, :split], cache=cache, use_cache=True).logits
        rest = model(ids[:, split:], cache=cache, use_cache=True).logits
    assert cache.get_seq_length() == T
    torch.testing.assert_close(torch.cat([first, rest], dim=1), full, atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_generate_with_the_compressed_cache_is_greedy_decoding_of_the_full_forward(family: str) -> None:
    model = mixed_decision_model(family)
    prompt = _ids(length=9)
    cache = DMCCache()
    generated = model.generate(prompt, cache=cache, max_new_tokens=20, do_sample=False, pad_token_id=3)
    seq = prompt
    with torch.no_grad():
        for _ in range(20):
            seq = torch.cat([seq, model(seq, use_cache=False).logits[:, -1:].argmax(-1)], dim=1)
    assert torch.equal(generated, seq)
    assert cache_stats(cache)["cr"] > 1.05


def test_decoding_from_a_stock_cache_is_refused() -> None:
    model = mixed_decision_model("llama")
    with pytest.raises(ValueError, match="DMCCache"):
        model.generate(_ids(length=5), max_new_tokens=3, do_sample=False, pad_token_id=3)


def test_beam_reordering_keeps_every_buffer_consistent() -> None:
    model = mixed_decision_model("mistral")
    ids = _ids(batch=3, length=12)
    with torch.no_grad():
        cache = DMCCache()
        model(ids, cache=cache, use_cache=True)
        cache.reorder_cache(torch.tensor([2, 0]))
        nxt = model(ids[[2, 0], -1:], cache=cache, use_cache=True).logits
        full = model(torch.cat([ids[[2, 0]], ids[[2, 0], -1:]], dim=1), use_cache=False).logits[:, -1:]
    torch.testing.assert_close(nxt, full, atol=1e-5, rtol=0)


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_padded_prompts_are_refused_and_full_masks_accepted(impl: str) -> None:
    """The compressed path attends with its own causal mask: a padded prompt would attend to its padding, so it is
    refused; an all-ones mask (None under sdpa, the plain causal 4D mask under eager) decodes as without one."""
    model = mixed_decision_model("llama")
    model.config._attn_implementation = impl
    ids = torch.randint(4, 1000, (2, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        plain = model(input_ids=ids, cache=DMCCache(), use_cache=True).logits
        ones = model(input_ids=ids, attention_mask=torch.ones_like(ids), cache=DMCCache(), use_cache=True).logits
        assert torch.equal(plain, ones)
        mask = torch.ones_like(ids)
        mask[0, :2] = 0  # left padding of the first prompt
        with pytest.raises(ValueError, match="does not support padded prompts"):
            model(input_ids=ids, attention_mask=mask, cache=DMCCache(), use_cache=True)
