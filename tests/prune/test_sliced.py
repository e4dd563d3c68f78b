"""Students cut from the teacher's files equal the students cut from the loaded teacher, bit for bit."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, PreTrainedModel

from nas_minitron.arch import ArchConfig
from nas_minitron.errors import UserError
from nas_minitron.families import describe, describe_model
from nas_minitron.prune import sliced as sliced_module
from nas_minitron.prune.baselines import random_scores
from nas_minitron.prune.keep import KeepIndices, keep_all
from nas_minitron.prune.plan import plan_for
from nas_minitron.prune.sliced import INDEX_FILE, is_safetensors_dir, slice_student
from nas_minitron.prune.student import build_student
from nas_minitron.prune.surgery import materialize
from nas_minitron.teacher import read_teacher_config
from tiny_models import FAMILIES, tiny_model

ARCH = "L2-H48-I50-A2-KV1"  # drops a layer, channels (norms rescaled), neurons, heads and a KV group
TOKENS = torch.randint(4, 1024, (2, 16), generator=torch.Generator().manual_seed(0))


def _save(directory: Path, model_type: str, **overrides: object) -> Path:
    tiny_model(model_type, **overrides).save_pretrained(directory)
    return directory


def _shuffled(keep: KeepIndices, seed: int) -> KeepIndices:
    """The same kept units in a random order on every axis (KV groups move with their query heads)."""
    rng = random.Random(seed)
    data = keep.to_dict()
    data["hidden"] = rng.sample(data["hidden"], len(data["hidden"]))
    data["neurons"] = [rng.sample(row, len(row)) for row in data["neurons"]]
    for i, (groups, heads) in enumerate(zip(data["kv_groups"], data["heads"], strict=True)):
        width = len(heads) // len(groups)
        blocks = [heads[g * width : (g + 1) * width] for g in range(len(groups))]
        order = rng.sample(range(len(groups)), len(groups))
        data["kv_groups"][i] = [groups[g] for g in order]
        data["heads"][i] = [h for g in order for h in rng.sample(blocks[g], width)]
    return KeepIndices.from_dict(data)


def _assert_same(sliced: PreTrainedModel, reference: PreTrainedModel) -> None:
    a, b = sliced.state_dict(), reference.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key
    assert type(sliced) is type(reference)
    assert sliced.config.to_dict() == reference.config.to_dict()


def _plan_keep(teacher_dir: Path, seed: int = 0, arch: str = ARCH) -> tuple[ArchConfig, KeepIndices]:
    config = read_teacher_config(str(teacher_dir))
    t_arch = describe(config)[1]
    target = ArchConfig.parse(arch, t_arch.head_dim)
    plan = plan_for(config, str(teacher_dir), target, random_scores(t_arch, seed))
    return target, _shuffled(plan.keep, seed)


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("model_type", FAMILIES)
def test_sliced_equals_materialize(model_type: str, tied: bool, tmp_path: Path) -> None:
    teacher_dir = _save(tmp_path / "teacher", model_type, tie_word_embeddings=tied)
    target, keep = _plan_keep(teacher_dir, seed=len(model_type) + tied)
    assert list(keep.hidden) != sorted(keep.hidden) and len(keep.layers) < 3  # unsorted, depth-pruned
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir)
    for rescale in (True, False):
        sliced = slice_student(teacher_dir, target, keep, rescale_norms=rescale)
        _assert_same(sliced, materialize(teacher, target, keep, rescale_norms=rescale))
        if tied:
            assert sliced.lm_head.weight.data_ptr() == sliced.model.embed_tokens.weight.data_ptr()


@pytest.mark.parametrize("model_type", ["llama", "qwen2"])
def test_a_sharded_teacher(model_type: str, tmp_path: Path) -> None:
    teacher = tiny_model(model_type, tie_word_embeddings=False)
    teacher.save_pretrained(tmp_path / "teacher", max_shard_size="20KB")
    assert (tmp_path / "teacher" / INDEX_FILE).is_file() and len(list((tmp_path / "teacher").glob("*.safetensors"))) > 5
    target, keep = _plan_keep(tmp_path / "teacher")
    _assert_same(slice_student(tmp_path / "teacher", target, keep), materialize(teacher, target, keep))


def test_reading_in_small_chunks_gives_the_same_student(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Runs of kept rows split into many reads (as a 128k-vocab embedding is) change nothing."""
    monkeypatch.setattr(sliced_module, "_CHUNK_BYTES", 200)  # 1-3 rows of 64 float32 columns per read
    teacher_dir = _save(tmp_path / "teacher", "qwen2", tie_word_embeddings=False)
    target, keep = _plan_keep(teacher_dir, seed=9)
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir)
    _assert_same(slice_student(teacher_dir, target, keep), materialize(teacher, target, keep))


@pytest.mark.parametrize("model_type", FAMILIES)
def test_bf16_target_from_float32_files(model_type: str, tmp_path: Path) -> None:
    teacher_dir = _save(tmp_path / "teacher", model_type)
    target, keep = _plan_keep(teacher_dir, seed=3)
    sliced = slice_student(teacher_dir, target, keep, dtype=torch.bfloat16)
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.bfloat16)
    _assert_same(sliced, materialize(teacher, target, keep))
    assert sliced.model.norm.weight.dtype == torch.bfloat16


def test_the_default_dtype_is_the_files(tmp_path: Path) -> None:
    tiny_model("qwen3").to(torch.bfloat16).save_pretrained(tmp_path / "teacher")
    target, keep = _plan_keep(tmp_path / "teacher")
    sliced = slice_student(tmp_path / "teacher", target, keep)
    assert {p.dtype for p in sliced.parameters()} == {torch.bfloat16}
    teacher = AutoModelForCausalLM.from_pretrained(tmp_path / "teacher", dtype=torch.bfloat16)
    _assert_same(sliced, materialize(teacher, target, keep))


@pytest.mark.parametrize("model_type", FAMILIES)
def test_keeping_everything_reproduces_the_teachers_logits(model_type: str, tmp_path: Path) -> None:
    teacher_dir = _save(tmp_path / "teacher", model_type)
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir)
    arch = describe_model(teacher)[1]
    student = slice_student(teacher_dir, arch, keep_all(arch))
    with torch.no_grad():
        assert torch.equal(student(TOKENS).logits, teacher(TOKENS).logits)


def test_build_student_takes_a_directory(tmp_path: Path) -> None:
    """The directory path and the model path of build_student give the same plan and the same student."""
    teacher_dir = _save(tmp_path / "teacher", "qwen2")
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir)
    t_arch = describe_model(teacher)[1]
    target, scores = ArchConfig.parse(ARCH, t_arch.head_dim), random_scores(t_arch, 5)
    from_model, plan = build_student(teacher, "spec", target, scores, depth_method="random")
    from_dir, dir_plan = build_student(teacher_dir, "spec", target, scores, depth_method="random")
    assert dir_plan == plan and plan_for(teacher, "spec", target, scores, "random") == plan
    _assert_same(from_dir, from_model)
    again, _ = build_student(str(teacher_dir), "spec", target, plan=plan, dtype=torch.bfloat16)
    assert next(again.parameters()).dtype == torch.bfloat16
    assert is_safetensors_dir(teacher_dir) and not is_safetensors_dir(tmp_path)
    with pytest.raises(ValueError, match="teacher directory"):
        build_student(teacher, "spec", target, scores, dtype=torch.bfloat16)


def test_a_nan_tensor_is_refused_naming_it(tmp_path: Path) -> None:
    teacher = tiny_model("llama")
    with torch.no_grad():
        teacher.model.layers[1].mlp.up_proj.weight[5, 7] = float("nan")
    teacher.save_pretrained(tmp_path / "teacher")
    arch = describe_model(teacher)[1]
    with pytest.raises(UserError, match=r"model\.safetensors.*'model\.layers\.1\.mlp\.up_proj\.weight'.*NaN"):
        slice_student(tmp_path / "teacher", arch, keep_all(arch))


def test_a_missing_tensor_is_refused_naming_file_and_key(tmp_path: Path) -> None:
    tiny_model("mistral").save_pretrained(tmp_path / "teacher")
    file = tmp_path / "teacher" / "model.safetensors"
    target, keep = _plan_keep(tmp_path / "teacher")
    tensors = load_file(file)
    del tensors[f"model.layers.{keep.layers[0]}.self_attn.k_proj.weight"]
    save_file(tensors, file, metadata={"format": "pt"})
    name = rf"model\.layers\.{keep.layers[0]}\.self_attn\.k_proj\.weight"
    with pytest.raises(UserError, match=rf"model\.safetensors.*missing tensor '{name}'"):
        slice_student(tmp_path / "teacher", target, keep)


def test_a_missing_key_in_a_sharded_index_is_refused(tmp_path: Path) -> None:
    tiny_model("llama").save_pretrained(tmp_path / "teacher", max_shard_size="20KB")
    index = tmp_path / "teacher" / INDEX_FILE
    data = json.loads(index.read_text())
    del data["weight_map"]["model.norm.weight"]
    index.write_text(json.dumps(data))
    arch = describe_model(tiny_model("llama"))[1]
    with pytest.raises(UserError, match=r"index\.json.*missing tensor 'model\.norm\.weight'"):
        slice_student(tmp_path / "teacher", arch, keep_all(arch))


def test_a_tensor_whose_shape_contradicts_the_config_is_refused(tmp_path: Path) -> None:
    tiny_model("llama").save_pretrained(tmp_path / "teacher")
    file = tmp_path / "teacher" / "model.safetensors"
    tensors = load_file(file)
    tensors["model.layers.2.mlp.down_proj.weight"] = tensors["model.layers.2.mlp.down_proj.weight"][:, :40].clone()
    save_file(tensors, file, metadata={"format": "pt"})
    arch = describe_model(tiny_model("llama"))[1]
    with pytest.raises(UserError, match=r"'model\.layers\.2\.mlp\.down_proj\.weight' has shape \[64, 40\]"):
        slice_student(tmp_path / "teacher", arch, keep_all(arch))


def test_a_directory_without_weights_is_refused(tmp_path: Path) -> None:
    tiny_model("llama").config.save_pretrained(tmp_path)
    arch = describe_model(tiny_model("llama"))[1]
    with pytest.raises(UserError, match="neither model.safetensors nor"):
        slice_student(tmp_path, arch, keep_all(arch))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_sliced_on_cuda_equals_materialize_on_the_cpu(tmp_path: Path) -> None:
    teacher_dir = _save(tmp_path / "teacher", "qwen3", tie_word_embeddings=False)
    target, keep = _plan_keep(teacher_dir)
    sliced = slice_student(teacher_dir, target, keep, dtype=torch.bfloat16, device="cuda")
    assert {p.device.type for p in sliced.parameters()} == {"cuda"}
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.bfloat16)
    _assert_same(sliced.cpu(), materialize(teacher, target, keep))
