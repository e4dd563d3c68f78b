"""Checksums of what the project writes (`nas_minitron.integrity`): each artifact kind loads untouched, and a flipped
byte is refused naming the file — by the size check when the file's length changed, by the sha256 (always for the
small importance scores and checkpoints, with `verify` / `--verify` for the large ones) when it did not.

The CLI refusals (exit 2, one line) are rows of tests/test_bad_inputs.py ("integrity" block).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from nas_minitron.arch import ArchConfig
from nas_minitron.data import load_sequences, save_sequences
from nas_minitron.distill.checkpoint import load_checkpoint, save_checkpoint, student_identity
from nas_minitron.distill.logit_cache import LogitCache, build_logit_cache
from nas_minitron.errors import UserError
from nas_minitron.evaluate.harness import load_model
from nas_minitron.families import describe_model
from nas_minitron.integrity import CHECKSUMS, verify_checksums, write_checksums
from nas_minitron.prune.baselines import random_scores
from nas_minitron.prune.plan import save_student
from nas_minitron.prune.scores import ImportanceScores
from nas_minitron.prune.student import build_student
from tiny_models import tiny_model, tiny_tokenizer

SHA_MISMATCH = re.escape("altered or truncated since it was written (sha256 mismatch)")  # a regex


def flip_byte(file: Path, offset: int = -4) -> None:
    """Flip the lowest bit of one byte near the end (tensor data: a float's low mantissa bits, so values stay
    finite and the file keeps its size: only the sha256 can tell)."""
    data = bytearray(file.read_bytes())
    data[offset] ^= 0x01
    file.write_bytes(bytes(data))


def test_record_round_trip_size_check_and_full_check(tmp_path: Path) -> None:
    (tmp_path / "a.bin").write_bytes(b"x" * 1000)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.bin").write_bytes(b"y" * 10)
    assert verify_checksums(tmp_path, "thing", "redo", full=True) is False  # no record: accepted unchecked
    write_checksums(tmp_path)
    record = json.loads((tmp_path / CHECKSUMS).read_text())
    assert sorted(record["files"]) == ["a.bin", "sub/b.bin"] and record["files"]["a.bin"]["size"] == 1000
    assert verify_checksums(tmp_path, "thing", "redo", full=True)
    (tmp_path / "later.txt").write_text("not listed: ignored")
    flip_byte(tmp_path / "a.bin")
    assert verify_checksums(tmp_path, "thing", "redo", full=False)  # same size: the cheap check cannot see it
    with pytest.raises(UserError, match=rf"^cannot read thing '.*a\.bin': {SHA_MISMATCH}; redo\.$"):
        verify_checksums(tmp_path, "thing", "redo", full=True)
    (tmp_path / "sub" / "b.bin").write_bytes(b"y" * 9)
    with pytest.raises(UserError, match=r"b\.bin': altered or truncated since it was written \(size 9 bytes, 10 "):
        verify_checksums(tmp_path, "thing", "redo", full=False, names=["sub/b.bin"])
    (tmp_path / "sub" / "b.bin").unlink()
    with pytest.raises(UserError, match=r"b\.bin': no such file"):
        verify_checksums(tmp_path, "thing", "redo", full=False)
    (tmp_path / CHECKSUMS).write_text('{"format_version": 1, "files": {"a.bin": {"size": 3}}}')
    with pytest.raises(UserError, match=r"cannot read checksum record .*: missing key 'sha256'"):
        verify_checksums(tmp_path, "thing", "redo", full=False)


def test_write_checksums_replaces_a_linked_record_instead_of_writing_through(tmp_path: Path) -> None:
    src, dst = tmp_path / "src", tmp_path / "dst"
    for folder in (src, dst):
        folder.mkdir()
    (src / "w.bin").write_bytes(b"w")
    write_checksums(src)
    before = (src / CHECKSUMS).read_text()
    (dst / CHECKSUMS).hardlink_to(src / CHECKSUMS)
    (dst / "other.bin").write_bytes(b"o")
    write_checksums(dst, ["other.bin"])
    assert (src / CHECKSUMS).read_text() == before
    assert sorted(json.loads((dst / CHECKSUMS).read_text())["files"]) == ["other.bin", "w.bin"]


def test_importance_scores_refuse_a_flipped_byte_always(tmp_path: Path) -> None:
    random_scores(describe_model(tiny_model("llama"))[1], seed=0).save(tmp_path)
    assert ImportanceScores.load(tmp_path).heads.numel() > 0
    flip_byte(tmp_path / "scores.safetensors")
    with pytest.raises(UserError, match=rf"importance scores '.*scores\.safetensors': {SHA_MISMATCH}; recompute"):
        ImportanceScores.load(tmp_path)
    (tmp_path / CHECKSUMS).unlink()  # as written before checksums existed: accepted
    ImportanceScores.load(tmp_path)


def test_token_files_size_check_on_every_read_sha256_with_verify(tmp_path: Path) -> None:
    file = tmp_path / "train.safetensors"
    save_sequences(file, torch.arange(64).view(4, 16))
    save_sequences(tmp_path / "validation.safetensors", torch.arange(16).view(1, 16))
    assert sorted(json.loads((tmp_path / CHECKSUMS).read_text())["files"]) == ["train.safetensors",
                                                                               "validation.safetensors"]
    assert load_sequences(file, verify=True).shape == (4, 16)
    flip_byte(file)
    assert load_sequences(file).shape == (4, 16)  # the cheap check cannot see a same-size change
    with pytest.raises(UserError, match=rf"token file '.*train\.safetensors': {SHA_MISMATCH}"):
        load_sequences(file, verify=True)
    load_sequences(tmp_path / "validation.safetensors", verify=True)  # the others are unaffected


def test_logit_cache_size_check_on_open_sha256_with_verify(tmp_path: Path) -> None:
    cache = tmp_path / "c"
    build_logit_cache(tiny_model("llama"), torch.randint(0, 1024, (4, 8)), cache, topk=4, batch_size=2)
    manifest = json.loads((cache / "manifest.json").read_text())
    assert all(isinstance(entry["size"], int) for entry in manifest["files"].values())
    LogitCache.open(cache, verify=True)
    flip_byte(cache / "logprobs-00000.npy")
    LogitCache.open(cache)
    with pytest.raises(UserError, match=rf"logit-cache file '.*logprobs-00000\.npy': {SHA_MISMATCH}; rebuild"):
        LogitCache.open(cache, verify=True)
    for entry in manifest["files"].values():  # a manifest written before sizes were recorded: checked in full
        del entry["size"]
    (cache / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(UserError, match=SHA_MISMATCH):
        LogitCache.open(cache)


def _checkpoint(tmp_path: Path) -> tuple[Path, tuple]:  # type: ignore[type-arg]
    student = tiny_model("llama")
    objective = torch.nn.Linear(2, 2)
    optimizer = torch.optim.SGD([*student.parameters(), *objective.parameters()], lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    path = save_checkpoint(tmp_path, 1, student, objective, optimizer, scheduler,
                           {"student": student_identity(student), "config_fingerprint": "f"}, keep_last_k=1)
    return path, (student, objective, optimizer, scheduler, "f")


def test_checkpoints_refuse_a_flipped_byte_on_every_load(tmp_path: Path) -> None:
    path, parts = _checkpoint(tmp_path)
    assert load_checkpoint(path, *parts)["student"] == student_identity(parts[0])
    weights = path / "student" / "model.safetensors"
    flip_byte(weights)
    with pytest.raises(UserError, match=rf"checkpoint file '.*model\.safetensors': {SHA_MISMATCH}; the checkpoint"):
        load_checkpoint(path, *parts)
    state = json.loads((path / "state.json").read_text())  # older checkpoints listed a bare sha256 per file
    state["files"] = {name: entry["sha256"] for name, entry in state["files"].items()}
    (path / "state.json").write_text(json.dumps(state))
    with pytest.raises(UserError, match=SHA_MISMATCH):
        load_checkpoint(path, *parts)


def pruned_student_dir(tmp_path: Path) -> Path:
    """A student as `nas-minitron prune` writes it (save_student), cut from the tiny llama teacher."""
    teacher = tiny_model("llama")
    arch = describe_model(teacher)[1]
    student, plan = build_student(teacher, "tiny", ArchConfig.parse("L2-H48-I50-A2-KV1", arch.head_dim),
                                  random_scores(arch, seed=0))
    save_student(student, tiny_tokenizer(), plan, tmp_path / "student")
    return tmp_path / "student"


def test_saved_students_carry_checksums_that_stock_from_pretrained_ignores(tmp_path: Path) -> None:
    folder = pruned_student_dir(tmp_path)
    listed = json.loads((folder / CHECKSUMS).read_text())["files"]
    assert {"model.safetensors", "config.json", "pruning.json"} <= set(listed)
    stock = AutoModelForCausalLM.from_pretrained(folder)
    assert stock.config.num_hidden_layers == 2
    load_model(folder, verify=True)
    flip_byte(folder / "model.safetensors")
    load_model(folder)  # sizes only: a same-size change passes
    with pytest.raises(UserError, match=rf"model file '.*model\.safetensors': {SHA_MISMATCH}"):
        load_model(folder, verify=True)
    (folder / CHECKSUMS).unlink()  # a user's own model directory: accepted as before
    load_model(folder, verify=True)
