"""Surgery preserves the function: identity, permutations, and removal of units that contribute nothing."""

from __future__ import annotations

import random

import pytest
import torch
from transformers import AutoModelForCausalLM

from nas_minitron.arch import ArchConfig
from nas_minitron.errors import UserError
from nas_minitron.families import describe_model
from nas_minitron.prune.baselines import magnitude_scores
from nas_minitron.prune.keep import KeepIndices, keep_all, keep_from_scores
from nas_minitron.prune.surgery import materialize
from tiny_models import FAMILIES, tiny_model

TOKENS = torch.randint(4, 1024, (2, 24), generator=torch.Generator().manual_seed(0))


def _logits(model) -> torch.Tensor:  # type: ignore[no-untyped-def]
    with torch.no_grad():
        return model(TOKENS).logits


def _replace(keep: KeepIndices, **changes) -> KeepIndices:  # type: ignore[no-untyped-def]
    data = keep.to_dict()
    data.update(changes)
    return KeepIndices.from_dict(data)


@pytest.mark.parametrize("model_type", FAMILIES)
def test_keep_everything_is_bit_identical(model_type: str) -> None:
    teacher = tiny_model(model_type)
    _, arch = describe_model(teacher)
    student = materialize(teacher, arch, keep_all(arch))
    assert torch.equal(_logits(student), _logits(teacher))
    assert type(student) is type(teacher)
    if teacher.config.tie_word_embeddings:
        assert student.lm_head.weight.data_ptr() == student.model.embed_tokens.weight.data_ptr()


@pytest.mark.parametrize("model_type", FAMILIES)
def test_keep_everything_permuted_is_identical(model_type: str) -> None:
    teacher = tiny_model(model_type)
    _, arch = describe_model(teacher)
    rng = random.Random(0)
    layers = arch.num_hidden_layers
    kv_groups, heads = [], []
    for _ in range(layers):
        groups = rng.sample(range(arch.num_key_value_heads), arch.num_key_value_heads)
        kv_groups.append(groups)
        per_group = arch.heads_per_group
        heads.append([g * per_group + h for g in groups for h in rng.sample(range(per_group), per_group)])
    keep = _replace(
        keep_all(arch),
        hidden=rng.sample(range(arch.hidden_size), arch.hidden_size),
        neurons=[rng.sample(range(arch.intermediate_size), arch.intermediate_size) for _ in range(layers)],
        kv_groups=kv_groups,
        heads=heads,
    )
    student = materialize(teacher, arch, keep)
    torch.testing.assert_close(_logits(student), _logits(teacher), atol=1e-5, rtol=1e-5)
    assert not torch.equal(student.model.embed_tokens.weight, teacher.model.embed_tokens.weight)


def _zero_neuron(teacher, layer: int, neuron: int) -> None:  # type: ignore[no-untyped-def]
    teacher.model.layers[layer].mlp.down_proj.weight[:, neuron] = 0


def _zero_head(teacher, layer: int, head: int, head_dim: int) -> None:  # type: ignore[no-untyped-def]
    teacher.model.layers[layer].self_attn.o_proj.weight[:, head * head_dim : (head + 1) * head_dim] = 0


def _zero_layer(teacher, layer: int) -> None:  # type: ignore[no-untyped-def]
    block = teacher.model.layers[layer]
    for linear in (block.self_attn.o_proj, block.mlp.down_proj):
        linear.weight.zero_()
        if linear.bias is not None:
            linear.bias.zero_()


def _zero_channel(teacher, channel: int) -> None:  # type: ignore[no-untyped-def]
    teacher.model.embed_tokens.weight[:, channel] = 0
    for block in teacher.model.layers:
        for linear in (block.self_attn.o_proj, block.mlp.down_proj):
            linear.weight[channel, :] = 0
            if linear.bias is not None:
                linear.bias[channel] = 0


@pytest.mark.parametrize("model_type", FAMILIES)
@pytest.mark.parametrize("axis", ["neurons", "heads", "kv_group", "layer", "channels"])
def test_pruning_units_without_contribution_keeps_logits(model_type: str, axis: str) -> None:
    # A tiny RMSNorm epsilon: removing an all-zero channel is then exact up to rounding (see materialize).
    teacher = tiny_model(model_type, rms_norm_eps=1e-12)
    _, arch = describe_model(teacher)
    keep, target = keep_all(arch).to_dict(), arch
    d = arch.head_dim
    with torch.no_grad():
        if axis == "neurons":
            for layer in range(arch.num_hidden_layers):
                for neuron in (5, 17, 40):
                    _zero_neuron(teacher, layer, neuron)
            keep["neurons"] = [[i for i in range(96) if i not in (5, 17, 40)]] * 3
            target = ArchConfig(3, 64, 93, 4, 2, d)
        elif axis == "heads":  # one query head in each KV group: heads 1 and 2 (groups 0 and 1)
            for layer in range(3):
                _zero_head(teacher, layer, 1, d)
                _zero_head(teacher, layer, 2, d)
            keep["heads"] = [[0, 3]] * 3
            target = ArchConfig(3, 64, 96, 2, 2, d)
        elif axis == "kv_group":  # group 0 = heads 0 and 1, with its K/V rows
            for layer in range(3):
                _zero_head(teacher, layer, 0, d)
                _zero_head(teacher, layer, 1, d)
            keep["kv_groups"], keep["heads"] = [[1]] * 3, [[2, 3]] * 3
            target = ArchConfig(3, 64, 96, 2, 1, d)
        elif axis == "layer":
            _zero_layer(teacher, 1)
            keep.update(layers=[0, 2], neurons=keep["neurons"][:2], kv_groups=keep["kv_groups"][:2],
                        heads=keep["heads"][:2])
            target = ArchConfig(2, 64, 96, 4, 2, d)
        else:
            for channel in (3, 30, 63):
                _zero_channel(teacher, channel)
            keep["hidden"] = [c for c in range(64) if c not in (3, 30, 63)]
            target = ArchConfig(3, 61, 96, 4, 2, d) if model_type != "llama" else ArchConfig(3, 60, 96, 4, 2, d)
            if model_type == "llama":  # Llama needs hidden % heads == 0: drop a 4th zero channel
                _zero_channel(teacher, 10)
                keep["hidden"].remove(10)
    student = materialize(teacher, target, KeepIndices.from_dict(keep))
    torch.testing.assert_close(_logits(student), _logits(teacher), atol=2e-5, rtol=1e-5)


def test_pruning_a_contributing_unit_changes_logits() -> None:
    # The counterpart of the test above: the same surgery on units that do contribute must change the output.
    teacher = tiny_model("llama")
    _, arch = describe_model(teacher)
    keep = keep_all(arch).to_dict()
    keep["neurons"] = [[i for i in range(96) if i not in (5, 17, 40)]] * 3
    student = materialize(teacher, ArchConfig(3, 64, 93, 4, 2, 16), KeepIndices.from_dict(keep))
    assert not torch.allclose(_logits(student), _logits(teacher), atol=1e-4)


@pytest.mark.parametrize("model_type", FAMILIES)
def test_save_and_from_pretrained_give_identical_logits(model_type: str, tmp_path) -> None:  # type: ignore[no-untyped-def]
    teacher = tiny_model(model_type)
    _, arch = describe_model(teacher)
    target = ArchConfig(2, 48, 50, 2, 1, 16)
    student = materialize(teacher, target, keep_from_scores(magnitude_scores(teacher), arch, target))
    student.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert type(loaded) is type(teacher)
    assert torch.equal(_logits(loaded), _logits(student))
    assert sum(p.numel() for p in loaded.parameters()) == sum(p.numel() for p in student.parameters())


def test_layer_types_and_layer_idx_follow_kept_layers() -> None:
    teacher = tiny_model("qwen2", num_hidden_layers=4, use_sliding_window=True, sliding_window=8,
                         max_window_layers=2)
    _, arch = describe_model(teacher)
    assert teacher.config.layer_types == ["full_attention"] * 2 + ["sliding_attention"] * 2
    keep = keep_all(arch).to_dict()
    kept = [0, 3]
    keep.update(layers=kept, neurons=[keep["neurons"][i] for i in kept],
                kv_groups=[keep["kv_groups"][i] for i in kept], heads=[keep["heads"][i] for i in kept])
    student = materialize(teacher, ArchConfig(2, 64, 96, 4, 2, 16), KeepIndices.from_dict(keep))
    assert student.config.layer_types == ["full_attention", "sliding_attention"]
    assert [layer.self_attn.layer_idx for layer in student.model.layers] == [0, 1]
    with torch.no_grad():  # generation with a KV cache exercises layer_idx
        out = student.generate(TOKENS[:1, :5], max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 9)


def test_refuses_unloadable_and_oversized_targets() -> None:
    teacher = tiny_model("llama")
    _, arch = describe_model(teacher)
    with pytest.raises(UserError, match="nearest loadable hidden sizes: H60 or H64"):
        materialize(teacher, ArchConfig(3, 62, 96, 4, 2, 16), keep_all(arch))
    with pytest.raises(UserError, match="I200 exceeds the teacher's I96"):
        materialize(teacher, ArchConfig(3, 64, 200, 4, 2, 16), keep_all(arch))


def test_keep_indices_validation() -> None:
    teacher = tiny_model("llama")
    _, arch = describe_model(teacher)
    keep = keep_all(arch).to_dict()
    keep["heads"] = [[0, 2, 1, 3]] * 3  # head 2 is in group 1 but listed in group 0's block
    with pytest.raises(ValueError, match="do not all belong to KV group 0"):
        materialize(teacher, arch, KeepIndices.from_dict(keep))
