from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from nas_minitron.arch import ArchConfig
from nas_minitron.errors import UserError
from nas_minitron.families import describe_model
from nas_minitron.prune.importance import _finalize, _per_sequence, compute_importance
from nas_minitron.prune.keep import keep_all, keep_from_scores
from nas_minitron.prune.lm_loss import lm_loss, skipped_layers
from nas_minitron.prune.scores import ImportanceScores
from nas_minitron.prune.surgery import materialize
from tiny_models import FAMILIES, tiny_model


def _batches(num: int = 6, seq_len: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.randint(4, 1024, (num, seq_len), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("family", FAMILIES)
def test_shapes_for_every_family(family: str) -> None:
    model = tiny_model(family)
    scores = compute_importance(model, _batches(), batch_size=4, window_sizes=(1, 2))
    cfg = model.config
    assert scores.heads.shape == (3, cfg.num_attention_heads)
    assert scores.neurons.shape == (3, cfg.intermediate_size)
    assert scores.channels.shape == (cfg.hidden_size,)
    assert set(scores.layers) == {"block_importance", "loss_drop"}
    assert all(v.shape == (3,) for v in scores.layers.values())
    assert {k: v.shape for k, v in scores.windows.items()} == {1: (3,), 2: (2,)}
    tensors = [scores.heads, scores.neurons, scores.channels, *scores.layers.values(), *scores.windows.values()]
    assert all(t.dtype == torch.float32 and t.isfinite().all() for t in tensors)
    assert scores.meta["num_tokens"] == 6 * 16 and scores.meta["criterion"] == "activation"


def test_width_only_pass_has_no_layer_scores() -> None:
    scores = compute_importance(tiny_model(), _batches(), layer_metrics=False)
    assert scores.layers == {} and scores.windows == {} and scores.meta["layer_loss"] is False


def test_zero_contribution_units_score_lowest() -> None:
    model = tiny_model("llama")
    d = model.config.head_dim
    with torch.no_grad():
        layer = model.model.layers[1]
        layer.self_attn.v_proj.weight[d : 2 * d].zero_()  # KV head 1 → query heads 2, 3 output exactly zero
        layer.mlp.up_proj.weight[5].zero_()  # neuron 5: silu(gate) * 0 = 0 into down_proj
        model.model.embed_tokens.weight[:, 7].zero_()  # channel 7 zero in the residual stream...
        for lin in (*(layer_.self_attn.o_proj for layer_ in model.model.layers),
                    *(layer_.mlp.down_proj for layer_ in model.model.layers)):
            lin.weight[7].zero_()  # ...and nothing ever writes into it
    scores = compute_importance(model, _batches(), layer_metrics=False)
    assert scores.heads[1, 2:].max() == 0 and scores.heads[1, :2].min() > 0
    assert int(scores.neurons[1].argmin()) == 5 and scores.neurons[1, 5] == 0
    assert int(scores.channels.argmin()) == 7 and scores.channels[7] == 0


def test_head_with_zeroed_o_proj_columns_scores_lowest() -> None:
    model = tiny_model("qwen2")
    d = model.config.head_dim
    with torch.no_grad():
        model.model.layers[0].self_attn.o_proj.weight[:, 3 * d : 4 * d].zero_()  # head 3 writes nothing
    scores = compute_importance(model, _batches(), layer_metrics=False)
    assert int(scores.heads[0].argmin()) == 3 and scores.heads[0, 3] == 0 and scores.heads[0, :3].min() > 0
    paper = compute_importance(model, _batches(), layer_metrics=False, head_metric="attn_output")
    assert paper.heads[0, 3] > 0  # the pre-o_proj norm cannot see it
    with pytest.raises(UserError, match="--head-metric must be one of"):
        compute_importance(model, _batches(), head_metric="gradient")


def test_aggregations_on_a_hand_made_case() -> None:
    # two sequences of per-token values for one unit: [1, 3] and [0, 0]; second sequence has one padding token
    values = torch.tensor([[[1.0], [3.0]], [[4.0], [100.0]]])  # [B=2, T=2, U=1]
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    mean = _per_sequence(values, mask, "mean")  # [[2], [4]]
    l2 = _per_sequence(values, mask, "l2")  # [[sqrt 10], [4]]
    assert torch.allclose(mean, torch.tensor([[2.0], [4.0]]))
    assert torch.allclose(l2, torch.tensor([[math.sqrt(10)], [4.0]]))
    assert torch.allclose(_finalize(mean.pow(2).sum(0), 2, "l2"), torch.tensor([math.sqrt(20)]))
    assert torch.allclose(_finalize(mean.sum(0), 2, "mean"), torch.tensor([3.0]))


def test_aggregation_choices_change_scores_consistently() -> None:
    model, batches = tiny_model(), _batches()
    runs = {(b, s): compute_importance(model, batches, batch_agg=b, seq_agg=s, layer_metrics=False)
            for b in ("l2", "mean") for s in ("mean", "l2")}
    # batch l2 ≥ sqrt(N) * batch mean (power-mean inequality), equality only if all sequences agree
    n = batches.shape[0]
    for s in ("mean", "l2"):
        ratio = runs[("l2", s)].neurons / runs[("mean", s)].neurons
        assert (ratio >= math.sqrt(n) * (1 - 1e-5)).all() and not torch.allclose(ratio, torch.full_like(ratio, n**0.5))
    # seq l2 over T tokens ≥ sqrt(T) * seq mean, likewise
    t = batches.shape[1]
    assert (runs[("mean", "l2")].heads >= math.sqrt(t) * runs[("mean", "mean")].heads * (1 - 1e-5)).all()
    with pytest.raises(UserError, match="--batch-agg must be one of l2, mean, but got 'max'"):
        compute_importance(model, batches, batch_agg="max")
    with pytest.raises(UserError, match="--seq-agg must be one of"):
        compute_importance(model, batches, seq_agg="median")


def test_padding_is_masked() -> None:
    model = tiny_model()
    batches = _batches(4, 12)
    mask = torch.ones_like(batches)
    mask[1, 8:] = 0
    mask[3, 5:] = 0
    other = batches.clone()
    other[1, 8:] = 7
    other[3, 5:] = 9
    kwargs = dict(window_sizes=(1,), attention_mask=mask)
    a = compute_importance(model, batches, **kwargs)
    b = compute_importance(model, other, **kwargs)
    for name in ("heads", "neurons", "channels"):
        assert torch.allclose(getattr(a, name), getattr(b, name), atol=1e-6), name
    for name in a.layers:
        assert torch.allclose(a.layers[name], b.layers[name], atol=1e-5), name
    assert a.meta["num_tokens"] == 4 * 12 - 4 - 7
    unmasked = compute_importance(model, batches, window_sizes=(1,))
    assert not torch.allclose(a.neurons, unmasked.neurons)


def test_layer_losses_match_skipping_layers() -> None:
    model, batches = tiny_model(), _batches()
    scores = compute_importance(model, batches, window_sizes=(1, 2), batch_size=4)
    base = lm_loss(model, batches)
    assert math.isclose(scores.meta["base_loss"], base, rel_tol=1e-5)
    with skipped_layers(model, (1, 2)):
        assert len(model.model.layers) == 1
        assert math.isclose(float(scores.windows[2][1]), lm_loss(model, batches), rel_tol=1e-5)
    assert len(model.model.layers) == 3  # restored
    with skipped_layers(model, (0,)):
        assert math.isclose(float(scores.layers["loss_drop"][0]), lm_loss(model, batches) - base, abs_tol=1e-5)
    assert torch.allclose(scores.windows[1] - base, scores.layers["loss_drop"], atol=1e-5)


def test_skipping_equals_materialized_depth_pruning() -> None:
    model, batches = tiny_model("qwen3"), _batches()
    _, arch = describe_model(model)
    full = keep_all(arch)
    keep = dataclasses.replace(full, layers=(0, 2), neurons=full.neurons[:2], kv_groups=full.kv_groups[:2],
                               heads=full.heads[:2])
    student = materialize(model, dataclasses.replace(arch, num_hidden_layers=2), keep)
    with skipped_layers(model, (1,)):
        skipped = lm_loss(model, batches)
    assert math.isclose(skipped, lm_loss(student, batches), rel_tol=1e-5)


def test_bad_inputs_are_user_errors() -> None:
    model = tiny_model()
    with pytest.raises(UserError, match="max_position_embeddings=256"):
        compute_importance(model, _batches(1, 300))
    with pytest.raises(UserError, match="window sizes must lie in"):
        compute_importance(model, _batches(), window_sizes=(3,))
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[0, 0] = float("nan")
    with pytest.raises(UserError, match="layer 1: MLP intermediate"):
        compute_importance(model, _batches(), layer_metrics=False)


def test_record_round_trips_and_feeds_keep(tmp_path) -> None:  # type: ignore[no-untyped-def]
    model = tiny_model()
    scores = compute_importance(model, _batches(), window_sizes=(1, 2))
    scores.save(tmp_path)
    loaded = ImportanceScores.load(tmp_path)
    assert torch.equal(loaded.neurons, scores.neurons) and torch.equal(loaded.windows[2], scores.windows[2])
    assert loaded.meta["batch_agg"] == "l2" and loaded.meta["window_sizes"] == [1, 2]
    _, arch = describe_model(model)
    target = ArchConfig.parse("L1-H48-I64-A2-KV1", arch.head_dim)
    keep = keep_from_scores(loaded, arch, target)
    assert keep.layers == ((2,) if int(scores.windows[2].argmin()) == 0 else (0,))  # the best window of 2 dropped
    student = materialize(model, target, keep)
    assert student.config.num_hidden_layers == 1
