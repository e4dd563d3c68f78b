"""Damaged inputs are refused in one line naming the file (issue #16, "one loader per artifact kind").

The table runs the real CLI in a subprocess on a tiny teacher, with the cheapest command that reads each artifact,
and asserts exit 2, one stderr line without a traceback that names the file, and no `--out` (nor its temporary
sibling) left behind. Progress bars (transformers' "Loading weights", distill's own) are switched off
(HF_HUB_DISABLE_PROGRESS_BARS, TQDM_DISABLE) so that stderr holds only the error. Below the table: direct tests of
`nas_minitron.artifacts` and of the loaders that use it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import safetensors.torch as st
import torch

from cli_helpers import one_error_line, run_cli, run_in_process, search
from nas_minitron.artifacts import (
    artifact_error,
    load_pretrained,
    read_safetensors,
    reading,
    require_finite,
    safetensors_shapes,
    utf8_error_offset,
)
from nas_minitron.data import iter_documents, load_sequences, save_sequences
from nas_minitron.distill.checkpoint import load_checkpoint, save_checkpoint, student_identity
from nas_minitron.distill.logit_cache import MANIFEST, LogitCache, build_logit_cache
from nas_minitron.errors import UserError
from nas_minitron.families import describe_model
from nas_minitron.integrity import write_checksums
from nas_minitron.prune.baselines import random_scores
from nas_minitron.prune.scores import ImportanceScores
from nas_minitron.teacher import load_teacher, weights_fingerprint, weights_fingerprint_of_dir
from tiny_models import tiny_model

ARCH = "L2-H48-I50-A2-KV1"
WEIGHTS = "model.safetensors"


# ---- building damaged artifacts ----------------------------------------------------------------------------------
def _truncate(file: Path) -> None:
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])


def _flip_header_byte(file: Path) -> None:
    data = bytearray(file.read_bytes())
    data[20] ^= 0xFF  # inside the JSON header that follows the 8-byte length
    file.write_bytes(bytes(data))


def _not_safetensors(file: Path) -> None:
    data = bytearray(file.read_bytes())
    data[:8] = b"\xff" * 8  # a header length no file has
    file.write_bytes(bytes(data))


def _poison(file: Path, value: float = float("inf")) -> str:
    """Put one NaN/Inf into a float tensor of a safetensors file (as a flipped exponent bit would); its name."""
    tensors = st.load_file(file)
    name = sorted(k for k, v in tensors.items() if v.is_floating_point() and v.numel() > 1)[0]
    tensors[name].view(-1)[1] = value
    st.save_file(tensors, file, metadata={"format": "pt"})
    return name


def _model_copy(source: Path, tmp: Path, damage: Callable[[Path], object]) -> Path:
    target = tmp / "model"
    shutil.copytree(source, target)
    damage(target / WEIGHTS)
    return target


def _scores_dir(tmp: Path, damage: Callable[[Path], object] | None = None, record: str | None = None) -> Path:
    """Scores of the tiny llama teacher, their tensor file damaged or their JSON record replaced."""
    directory = tmp / "importance"
    directory.mkdir()
    random_scores(describe_model(tiny_model("llama"))[1], seed=0).save(directory)
    if damage is not None:
        damage(directory / "scores.safetensors")
    if record is not None:
        (directory / "scores.json").write_text(record)
    return directory


def _cache_dir(tmp: Path, manifest: str) -> Path:
    directory = tmp / "cache"
    directory.mkdir()
    (directory / MANIFEST).write_text(manifest)
    return directory


def _data_file(tmp: Path, name: str, content: bytes) -> Path:
    file = tmp / name
    file.write_bytes(content)
    return file


def _importance(data: Path) -> list[str]:
    return ["importance", "--data", str(data), "--num-samples", "2", "--seq-len", "16", "--batch-size", "2",
            "--no-layer-metrics"]


_DISTILL = ["--tokens", "64", "--seq-len", "16", "--batch-size", "1", "--val-sequences", "1", "--device", "cpu"]
_BAD_UTF8 = b"caf\xe9 au lait\n"  # latin-1, not UTF-8: the bad byte is at offset 3 of this line


@dataclass(frozen=True)
class Case:
    """A damaged artifact: `build(tmp, teacher)` makes it and returns (CLI args without --out, the named path)."""

    build: Callable[[Path, Path], tuple[list[str], Path]]
    needle: str  # what else the message must say


def _prune(teacher: Path) -> list[str]:
    return ["prune", "--teacher", str(teacher), "--arch", ARCH]


CASES: dict[str, Case] = {
    "prune-teacher-truncated": Case(
        lambda tmp, t: (_prune(m := _model_copy(t, tmp, _truncate)), m / WEIGHTS), "truncated"),
    "prune-teacher-flipped-header": Case(
        lambda tmp, t: (_prune(m := _model_copy(t, tmp, _flip_header_byte)), m / WEIGHTS), "bad safetensors header"),
    "prune-teacher-nan": Case(
        lambda tmp, t: (_prune(m := _model_copy(t, tmp, lambda f: _poison(f, float("nan")))), m), "NaN/Inf"),
    "inspect-truncated": Case(
        lambda tmp, t: (["inspect", str(m := _model_copy(t, tmp, _truncate))], m / WEIGHTS), "truncated"),
    "inspect-not-safetensors": Case(
        lambda tmp, t: (["inspect", str(m := _model_copy(t, tmp, _not_safetensors))], m / WEIGHTS),
        "not a safetensors file"),
    "inspect-inf": Case(lambda tmp, t: (["inspect", str(m := _model_copy(t, tmp, _poison))], m / WEIGHTS), "NaN/Inf"),
    "eval-model-truncated": Case(
        lambda tmp, t: (["eval", "--model", str(m := _model_copy(t, tmp, _truncate)), "--device", "cpu"],
                        m / WEIGHTS), "truncated"),
    "distill-student-truncated": Case(
        lambda tmp, t: (["distill", "--teacher", str(t), "--student", str(m := _model_copy(t, tmp, _truncate)),
                         *_DISTILL], m / WEIGHTS), "truncated"),
    "prune-importance-truncated": Case(
        lambda tmp, t: ([*_prune(t), "--importance", str(s := _scores_dir(tmp, _truncate))],
                        s / "scores.safetensors"), "truncated"),
    "prune-importance-nan": Case(
        lambda tmp, t: ([*_prune(t), "--importance", str(s := _scores_dir(tmp, _poison))], s / "scores.safetensors"),
        "NaN/Inf"),
    "prune-importance-record-not-json": Case(
        lambda tmp, t: ([*_prune(t), "--importance", str(s := _scores_dir(tmp, record="{oops"))], s / "scores.json"),
        "not valid JSON"),
    "importance-txt-not-utf8": Case(
        lambda tmp, t: ([*_importance(f := _data_file(tmp, "d.txt", b"hello\n" * 10 + _BAD_UTF8)), "--teacher",
                         str(t)], f), "not UTF-8 at byte 63"),
    "importance-jsonl-not-utf8": Case(
        lambda tmp, t: ([*_importance(f := _data_file(tmp, "d.jsonl", b'{"text": "' + _BAD_UTF8[:-1] + b'"}\n')),
                         "--teacher", str(t)], f), "not UTF-8 at byte 13"),
    "importance-json-not-utf8": Case(
        lambda tmp, t: ([*_importance(f := _data_file(tmp, "d.json", b'[{"text": "' + _BAD_UTF8[:-1] + b'"}]')),
                         "--teacher", str(t)], f), "not UTF-8 at byte 14"),
    "importance-parquet-corrupt": Case(
        lambda tmp, t: ([*_importance(f := _data_file(tmp, "d.parquet", b"PAR1" + b"\0" * 64)), "--teacher",
                         str(t)], f), "corrupt or not a parquet file"),
    "distill-cache-manifest-without-files": Case(
        lambda tmp, t: (["distill", "--student", str(t), "--logit-cache",
                         str(c := _cache_dir(tmp, json.dumps({"format_version": 1}))), *_DISTILL], c / MANIFEST),
        "missing key(s)"),
    "distill-cache-manifest-not-json": Case(
        lambda tmp, t: (["distill", "--student", str(t), "--logit-cache", str(c := _cache_dir(tmp, "[1, 2")),
                         *_DISTILL], c / MANIFEST), "not valid JSON"),
}


# ---- integrity: a byte flipped after writing (same size, values still finite), refused by the sha256 -------------
# Importance scores are always checked in full; the large artifacts (students, logit cache) with --verify.
def _flip_data_byte(file: Path) -> None:
    data = bytearray(file.read_bytes())
    data[-4] ^= 0x01  # the low mantissa bits of the last value
    file.write_bytes(bytes(data))


def _checksummed_model(source: Path, tmp: Path) -> Path:
    """A model directory as this project writes one (with checksums.json), then a byte of its weights flipped."""
    target = tmp / "model"
    shutil.copytree(source, target)
    write_checksums(target)
    _flip_data_byte(target / WEIGHTS)
    return target


def _flipped_cache(teacher: Path, tmp: Path) -> Path:
    cache = _cache_of(teacher, tmp)
    _flip_data_byte(cache / "logprobs-00000.npy")
    return cache


_SHA = "altered or truncated since it was written (sha256 mismatch)"
INTEGRITY_CASES: dict[str, Case] = {
    "prune-importance-flipped-byte": Case(
        lambda tmp, t: ([*_prune(t), "--importance", str(s := _scores_dir(tmp, _flip_data_byte))],
                        s / "scores.safetensors"), _SHA),
    "eval-verify-model-flipped-byte": Case(
        lambda tmp, t: (["eval", "--model", str(m := _checksummed_model(t, tmp)), "--device", "cpu", "--verify"],
                        m / WEIGHTS), _SHA),
    "distill-verify-student-flipped-byte": Case(
        lambda tmp, t: (["distill", "--teacher", str(t), "--student", str(m := _checksummed_model(t, tmp)),
                         "--verify", *_DISTILL], m / WEIGHTS), _SHA),
    "distill-verify-cache-flipped-byte": Case(
        lambda tmp, t: (["distill", "--student", str(t), "--logit-cache", str(c := _flipped_cache(t, tmp)),
                         "--verify", *_DISTILL], c / "logprobs-00000.npy"), _SHA),
}
CASES.update(INTEGRITY_CASES)


_QUIET = {"HF_HUB_DISABLE_PROGRESS_BARS": "1", "TQDM_DISABLE": "1"}


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    """The command in this process (`run_in_process`), except `search`, which may start Ray: a subprocess."""
    return run_cli(*args, env=_QUIET) if args[0] == "search" else run_in_process(*args, env=_QUIET)


@pytest.mark.parametrize("name", sorted(CASES))
def test_cli_refuses_a_damaged_artifact_in_one_line(name: str, tiny_teacher_dir: Path, tmp_path: Path) -> None:
    case = CASES[name]
    args, named = case.build(tmp_path, tiny_teacher_dir)
    out = tmp_path / "out"
    command = args if args[0] == "inspect" else [*args, "--out", str(out)]
    line = one_error_line(cli(*command))
    assert str(named) in line and case.needle in line, line
    assert not out.exists() and not list(tmp_path.glob(".out.tmp-*"))


def test_distill_resume_refuses_an_unreadable_checkpoint_state(tiny_teacher_dir: Path, tmp_path: Path) -> None:
    state = tmp_path / "ckpt" / "step-00000001" / "state.json"
    state.parent.mkdir(parents=True)
    state.write_text('{"format_version": 1, "files": ')
    out = tmp_path / "out"
    proc = cli("distill", "--teacher", str(tiny_teacher_dir), "--student", str(tiny_teacher_dir), *_DISTILL,
               "--checkpoint-dir", str(tmp_path / "ckpt"), "--resume", "--out", str(out))
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert str(state) in lines[0] and "not valid JSON" in lines[0] and "incomplete or truncated" in lines[0]
    assert not out.exists()


# ---- inconsistent inputs (#16 item 3): each refused in one line naming the values, before any work --------------
def _other_teacher(teacher: Path, tmp: Path) -> Path:
    """The same tiny teacher (tokenizer and shapes) with other weights: what a cache of another teacher looks like."""
    other = tmp / "other-teacher"
    shutil.copytree(teacher, other)
    tensors = st.load_file(other / WEIGHTS)
    st.save_file({k: v + 0.01 if v.is_floating_point() else v for k, v in tensors.items()}, other / WEIGHTS,
                 metadata={"format": "pt"})
    return other


def _cache_of(teacher: Path, tmp: Path) -> Path:
    model, tokenizer = load_teacher(str(teacher))
    tokens = torch.randint(0, model.config.vocab_size, (4, 16), generator=torch.Generator().manual_seed(0))
    build_logit_cache(model, tokens, tmp / "cache", topk=8, batch_size=2, tokenizer=tokenizer)
    return tmp / "cache"


def _small_text(tmp: Path, docs: int = 40, chars: int = 600) -> Path:
    from pydoc_data.topics import topics

    # 40 short documents of real text (a few dozen KB): some land in the validation split, as split_of decides
    lines = [json.dumps({"text": topics[k][:chars]}) for k in sorted(topics)[:docs]]
    return _data_file(tmp, "small.jsonl", ("\n".join(lines) + "\n").encode())


INCONSISTENT: dict[str, tuple[Callable[[Path, Path], list[str]], tuple[str, ...]]] = {
    "importance-loss-samples-above-num-samples": (
        lambda tmp, t: ["importance", "--teacher", str(t), "--num-samples", "4", "--loss-samples", "8",
                        "--seq-len", "16", "--device", "cpu"],
        ("--loss-samples 8 is above --num-samples 4", "at most 4")),
    "distill-cache-of-another-teacher": (
        lambda tmp, t: ["distill", "--teacher", str(_other_teacher(t, tmp)), "--student", str(t), "--logit-cache",
                        str(_cache_of(t, tmp)), *_DISTILL],
        ("was built from another teacher", "teacher_fingerprint")),
    "distill-tokens-loop-over-small-data": (
        lambda tmp, t: ["distill", "--teacher", str(t), "--student", str(t), "--data", str(_small_text(tmp)),
                        "--tokens", "1000000", "--seq-len", "16", "--batch-size", "1", "--val-sequences", "1",
                        "--device", "cpu"],
        ("--tokens 1,000,000 would pass over the train split", "--allow-repeat")),
}


@pytest.mark.parametrize("name", sorted(INCONSISTENT))
def test_cli_refuses_inconsistent_inputs_in_one_line(name: str, tiny_teacher_dir: Path, tmp_path: Path) -> None:
    build, needles = INCONSISTENT[name]
    out = tmp_path / "out"
    line = one_error_line(cli(*build(tmp_path, tiny_teacher_dir), "--out", str(out)))
    assert all(n in line for n in needles), line
    assert not out.exists() and not list(tmp_path.glob(".out.tmp-*"))


def test_distill_allow_repeat_lifts_the_pass_limit(tiny_teacher_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    data = _small_text(tmp_path, docs=30, chars=120)  # a few dozen sequences: five passes are ~100 short steps
    args = ["distill", "--teacher", str(tiny_teacher_dir), "--student", str(tiny_teacher_dir), "--data", str(data),
            "--seq-len", "16", "--batch-size", "1", "--val-sequences", "1", "--device", "cpu", "--out", str(out)]
    probe = cli(*args, "--tokens", "1000000")
    sequences = int(probe.stderr.split("it holds ")[1].split(" sequences")[0].replace(",", ""))
    tokens = 16 * sequences * 5  # five passes: one above the limit
    refused = cli(*args, "--tokens", str(tokens))
    assert refused.returncode == 2 and "5.0 times" in refused.stderr, refused.stderr
    allowed = cli(*args, "--tokens", str(tokens), "--allow-repeat", "--eval-every-tokens", str(tokens))
    assert allowed.returncode == 0, allowed.stderr[-2000:]
    assert json.loads((out / "distill.json").read_text())["num_tokens"] == tokens


# ---- the helper ----------------------------------------------------------------------------------------------------
def _inside_reading(path: Path, action: Callable[[], object], hint: str = "",
                    extra: tuple[type[BaseException], ...] = ()) -> None:
    with reading(path, "record", hint, extra):
        action()


def _fail(err: BaseException) -> Callable[[], object]:
    def action() -> object:
        raise err

    return action


def test_reading_names_the_file_and_the_reason(tmp_path: Path) -> None:
    missing = tmp_path / "nope.json"
    with pytest.raises(UserError, match=r"^cannot read record '.*nope\.json': no such file; make it\.$"):
        _inside_reading(missing, missing.read_text, "make it")
    bad = tmp_path / "bad.json"
    bad.write_text('{"a": }')
    with pytest.raises(UserError, match=r"not valid JSON \(Expecting value at line 1 column 7\)"):
        _inside_reading(bad, lambda: json.loads(bad.read_text()))
    with pytest.raises(UserError, match=r"record .*: missing key 'files'\.$"):
        _inside_reading(bad, _fail(KeyError("files")))
    with pytest.raises(UserError, match="it is a directory"):
        _inside_reading(tmp_path, tmp_path.read_text)
    assert str(artifact_error(bad, "x", "broken.", "fix it")) == f"cannot read x {str(bad)!r}: broken; fix it."


def test_reading_leaves_other_errors_alone(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="^mine$"):
        _inside_reading(tmp_path, _fail(UserError("mine")))
    with pytest.raises(ValueError, match="a bug"):
        _inside_reading(tmp_path, _fail(ValueError("a bug")))
    with pytest.raises(UserError, match="cannot read record .*: a bad file"):
        _inside_reading(tmp_path, _fail(ValueError("a bad file")), extra=(ValueError,))
    with pytest.raises(RuntimeError):
        _inside_reading(tmp_path, _fail(RuntimeError("not a read error")))


def test_utf8_offset_is_the_file_offset_across_decoder_chunks(tmp_path: Path) -> None:
    file = tmp_path / "big.txt"
    head = "é" * (1 << 19) + "x" * 7  # 1 MiB + 7 bytes: a reader's chunks and ours both end mid-file
    file.write_bytes(head.encode() + b"ab\xffcd")
    offset = len(head.encode()) + 2
    assert utf8_error_offset(file) == offset

    def read_lines() -> None:  # text mode reports a start relative to its decoding chunk, not to the file
        with file.open(encoding="utf-8") as handle:
            for _line in handle:
                pass

    with pytest.raises(UserError, match=f"not UTF-8 at byte {offset}"):
        _inside_reading(file, read_lines)
    file.write_bytes(head.encode())
    assert utf8_error_offset(file) is None


@pytest.mark.parametrize(
    ("damage", "needle"),
    [(_truncate, "truncated"), (_flip_header_byte, "bad safetensors header"),
     (_not_safetensors, "not a safetensors file"), (lambda f: f.write_bytes(b""), "truncated (header too small)")],
)
def test_read_safetensors_refuses_damaged_files(tmp_path: Path, damage: Callable[[Path], object], needle: str) -> None:
    file = tmp_path / "t.safetensors"
    st.save_file({"a": torch.zeros(64, 64), "b": torch.ones(8)}, file)
    damage(file)
    for read in (lambda: read_safetensors(file, "scores", hint="redo"), lambda: safetensors_shapes(file, "scores")):
        with pytest.raises(UserError, match="cannot read scores") as info:
            read()
        assert str(file) in str(info.value) and needle in str(info.value)


def test_read_safetensors_checks_required_tensors_and_finite_values(tmp_path: Path) -> None:
    file = tmp_path / "t.safetensors"
    st.save_file({"a": torch.tensor([1.0, float("inf"), float("nan")]), "ids": torch.arange(3)}, file)
    assert set(read_safetensors(file, "x")) == {"a", "ids"}  # values are not checked unless asked
    with pytest.raises(UserError, match=r"missing tensor\(s\) 'tokens' \(it holds a, ids\)"):
        read_safetensors(file, "x", require=("tokens",))
    with pytest.raises(UserError, match=r"tensor 'a' holds 2 NaN/Inf value\(s\) of 3"):
        read_safetensors(file, "x", finite=True)
    with pytest.raises(UserError, match="tensor 'a' holds"):
        safetensors_shapes(file, "x", finite=True)
    assert safetensors_shapes(file, "x") == {"a": [3], "ids": [3]}


def test_require_finite_ignores_integers_and_sums_that_only_overflow() -> None:
    huge = torch.full((4,), 3e38)  # finite, but its float32 sum is inf
    require_finite([("huge", huge), ("ids", torch.arange(4)), ("half", huge.to(torch.bfloat16))], "x", "p")
    with pytest.raises(UserError, match="tensor 'w' holds 1 NaN/Inf"):
        require_finite([("ok", torch.zeros(2)), ("w", torch.tensor([1.0, -float("inf")], dtype=torch.bfloat16))],
                       "x", "p")


def test_load_pretrained_names_the_damaged_file_and_the_bad_tensor(tiny_teacher_dir: Path, tmp_path: Path) -> None:
    truncated = _model_copy(tiny_teacher_dir, tmp_path / "a", _truncate)
    with pytest.raises(UserError, match="truncated") as info:
        load_pretrained(str(truncated), "student")
    assert str(truncated / WEIGHTS) in str(info.value)
    poisoned = tmp_path / "b" / "model"
    shutil.copytree(tiny_teacher_dir, poisoned)
    name = _poison(poisoned / WEIGHTS)
    with pytest.raises(UserError, match=f"cannot read teacher .*: tensor '{name}' holds 1 NaN/Inf"):
        load_teacher(str(poisoned))
    model, _tokenizer = load_pretrained(str(tiny_teacher_dir), "student")
    assert sum(p.numel() for p in model.parameters()) > 0


# ---- the loaders using it -----------------------------------------------------------------------------------------
def test_importance_scores_refuse_nan_missing_tensors_and_bad_records(tmp_path: Path) -> None:
    directory = _scores_dir(tmp_path)
    assert ImportanceScores.load(directory).heads.shape[0] == 3
    tensors = st.load_file(directory / "scores.safetensors")
    st.save_file({k: v for k, v in tensors.items() if k != "heads"}, directory / "scores.safetensors")
    with pytest.raises(UserError, match=r"missing tensor\(s\) 'heads'.*importance --overwrite"):
        ImportanceScores.load(directory)
    tensors["neurons"][0, 0] = float("nan")
    st.save_file(tensors, directory / "scores.safetensors")
    with pytest.raises(UserError, match="tensor 'neurons' holds 1 NaN/Inf"):
        ImportanceScores.load(directory)
    (directory / "scores.json").write_text("[]")
    with pytest.raises(UserError, match="importance record .*scores.json': not a JSON object"):
        ImportanceScores.load(directory)


def test_token_files_refuse_damage(tmp_path: Path) -> None:
    file = tmp_path / "train.safetensors"
    save_sequences(file, torch.arange(32).view(2, 16))
    assert load_sequences(file).shape == (2, 16)
    _truncate(file)
    with pytest.raises(UserError, match="cannot read token file .*: truncated"):
        load_sequences(file)
    st.save_file({"other": torch.zeros(2)}, file)
    with pytest.raises(UserError, match=r"missing tensor\(s\) 'tokens'"):
        load_sequences(file)


@pytest.mark.parametrize(
    ("name", "content", "needle"),
    [("a.txt", b"ok\n" * 3 + b"\xff\n", "not UTF-8 at byte 9"),
     ("a.jsonl", b'{"text": "ok"}\n{"text": "\xc3("}\n', "not UTF-8 at byte 25"),
     ("a.json", b'{"data": [{"text": "\xe2\x28\xa1"}]}', "not UTF-8 at byte 20"),
     ("a.parquet", b"not parquet at all", "corrupt or not a parquet file")],
)
def test_data_files_refuse_bad_bytes(tmp_path: Path, name: str, content: bytes, needle: str) -> None:
    file = tmp_path / name
    file.write_bytes(content)
    with pytest.raises(UserError, match="cannot read data file") as info:
        for split in ("calibration", "train", "validation"):
            list(iter_documents(str(file), split))
    assert str(file) in str(info.value) and needle in str(info.value)


@pytest.mark.parametrize(
    ("manifest", "needle"),
    [({"format_version": 1}, "missing key(s) num_sequences"),
     ("[]", "not a JSON object"), ("{", "not valid JSON"),
     ("drop-sha", "missing key 'sha256'"), ("drop-shard", "missing key 'indices-0'")],
)
def test_logit_cache_refuses_a_damaged_manifest(tmp_path: Path, manifest: object, needle: str) -> None:
    cache = tmp_path / "c"
    build_logit_cache(tiny_model("llama"), torch.randint(0, 1024, (2, 8)), cache, topk=4, batch_size=2)
    record = json.loads((cache / MANIFEST).read_text())
    if manifest == "drop-sha":
        del record["files"]["tokens"]["sha256"]
    elif manifest == "drop-shard":
        del record["files"]["indices-0"]
    else:
        record = manifest
    (cache / MANIFEST).write_text(record if isinstance(record, str) else json.dumps(record))
    with pytest.raises(UserError, match="cannot read logit-cache manifest") as info:
        LogitCache.open(cache)
    assert str(cache / MANIFEST) in str(info.value) and needle in str(info.value)


def test_checkpoint_weights_are_read_through_the_helper(tmp_path: Path) -> None:
    """A checkpoint whose state lists no checksums (so nothing catches the damage earlier) still fails in one line."""
    student = tiny_model("llama")
    objective = torch.nn.Linear(2, 2)
    optimizer = torch.optim.SGD([*student.parameters(), *objective.parameters()], lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    path = save_checkpoint(tmp_path, 1, student, objective, optimizer, scheduler,
                           {"student": student_identity(student), "config_fingerprint": "f"}, keep_last_k=1)
    state = json.loads((path / "state.json").read_text())
    del state["files"]
    (path / "state.json").write_text(json.dumps(state))
    weights = next((path / "student").glob("*.safetensors"))
    _truncate(weights)
    with pytest.raises(UserError, match="cannot read checkpoint weights .*: truncated .*drop --resume") as info:
        load_checkpoint(path, student, objective, optimizer, scheduler, "f")
    assert str(weights) in str(info.value)


# ==== everything checked before work: unwritable outputs, numeric flags, consistency ==============================
# (a block of its own: the damaged-artifact rows above grow in another branch). Each row runs the real CLI and is
# refused before anything is loaded or written: exit 2, one line naming the value, nothing left behind.
_TRAIN = ["--tokens", "64", "--seq-len", "16", "--batch-size", "1", "--val-sequences", "1", "--device", "cpu"]


def _writer_args(command: str, teacher: Path, tmp: Path) -> list[str]:
    """The cheapest invocation of each command that writes, without its output flag."""
    if command == "report":
        run = tmp / "run"
        run.mkdir(exist_ok=True)
        (run / "config.json").write_text("{}")
        return ["report", str(run)]
    return {
        "prune": _prune(teacher) + ["--criterion", "random"],
        "distill": ["distill", "--teacher", str(teacher), "--student", str(teacher), *_TRAIN],
        "correct-teacher": ["correct-teacher", "--teacher", str(teacher), *_TRAIN],
        "dmc": ["dmc", "--model", str(teacher), "--target-cr", "2", *_TRAIN],
        "importance": _importance(Path("builtin")) + ["--teacher", str(teacher)],
        "eval": ["eval", "--model", str(teacher), "--device", "cpu", "--limit", "2"],
        "search": ["search", "--teacher", str(teacher), "--budget", "0.6x", "--space", "tiny", "--seq-len", "16"],
    }[command]


_WRITERS = ("prune", "distill", "correct-teacher", "dmc", "importance", "eval", "report", "search")
_OUT_FLAG = {"search": "--run-dir"}


@pytest.mark.parametrize("where", ["parent-is-a-file", "out-is-a-file", "read-only-parent"])
@pytest.mark.parametrize("command", _WRITERS)
def test_cli_refuses_an_unwritable_output_before_work(command: str, where: str, tiny_teacher_dir: Path,
                                                      tmp_path: Path) -> None:
    blocker = tmp_path / "blocker"
    if where == "read-only-parent":
        blocker.mkdir()
        blocker.chmod(0o555)
        if os.access(blocker, os.W_OK):  # root ignores the mode; the immutable attribute binds root too
            immutable = subprocess.run(["chattr", "+i", str(blocker)], capture_output=True).returncode == 0
            if not immutable or os.access(blocker, os.W_OK):
                pytest.skip("this user can write a read-only directory (and chattr +i is not available)")
        out, named = blocker / "out", blocker
    elif where == "parent-is-a-file":
        blocker.write_text("a file")
        out, named = blocker / "out", blocker
    else:
        blocker.write_text("a file")
        out = named = blocker
    if command == "report":
        out = out / "report.html" if where != "out-is-a-file" else tmp_path  # a directory where a file goes
        named = out if where == "out-is-a-file" else named
    flag = _OUT_FLAG.get(command, "--out")
    try:
        args = (*_writer_args(command, tiny_teacher_dir, tmp_path), flag, str(out))
        # one case per command through the real executable, the others in process
        line = one_error_line(run_cli(*args, env=_QUIET) if where == "parent-is-a-file" else cli(*args))
    finally:
        if blocker.is_dir():
            subprocess.run(["chattr", "-i", str(blocker)], capture_output=True)
            blocker.chmod(0o755)
    assert flag in line and repr(str(named)) in line, line
    assert not list(tmp_path.rglob(".*tmp-*")) and not list(tmp_path.glob("*.ckpt"))


@pytest.mark.parametrize(
    ("args", "needle"),
    [(["distill", "--student", "s", "--tokens", "0", "--out", "o"], "--tokens: must be an integer >= 1, but got 0"),
     (["distill", "--student", "s", "--tokens", "64", "--lr", "nan", "--out", "o"],
      "--lr: must be a finite number > 0, but got 'nan'"),
     (["distill", "--student", "s", "--tokens", "64", "--warmup-fraction", "1", "--out", "o"],
      "--warmup-fraction: must be a number in [0, 1), but got '1'"),
     (["correct-teacher", "--teacher", "t", "--tokens", "64", "--batch-size", "0", "--out", "o"],
      "--batch-size: must be an integer >= 1, but got 0"),
     (["dmc", "--model", "m", "--target-cr", "2", "--tokens", "64", "--window", "0", "--out", "o"],
      "--window: must be an integer >= 1, but got 0"),
     (["eval", "--model", "m", "--limit", "0"], "--limit: must be an integer >= 1, but got 0"),
     (["eval", "--model", "m", "--speed-seq-len", "-8"], "--speed-seq-len: must be an integer >= 1, but got -8"),
     (["importance", "--teacher", "t", "--num-samples", "0", "--out", "o"],
      "--num-samples: must be an integer >= 1, but got 0"),
     (["importance", "--teacher", "t", "--window-sizes", "0,2", "--out", "o"], "window sizes must be integers >= 1"),
     (["candidates", "--budget", "0.5x", "--tolerance", "1"], "--tolerance: must be a number in [0, 1), but got '1'"),
     (["prune", "--arch", ARCH, "--seed", "-1", "--out", "o"], "--seed: must be an integer >= 0, but got -1"),
     (["search", "--cpus-per-trial", "0"], "cpus_per_trial must be >= 1, but got 0")],
    ids=lambda v: v[0] if isinstance(v, list) else None,
)
def test_cli_refuses_a_bad_number_in_one_line(args: list[str], needle: str, tmp_path: Path) -> None:
    line = one_error_line(run_cli(*args, cwd=tmp_path))
    assert needle in line, line
    assert not list(tmp_path.iterdir())


def _scores_of_another_teacher(tmp: Path, key: str) -> Path:
    """Scores whose record says they were computed for another teacher (other weights, or another arch)."""
    directory = _scores_dir(tmp)
    meta = json.loads((directory / "scores.json").read_text())
    meta[key] = "0123456789abcdef" if key == "weights_fingerprint" else "L4-H64-I128-A4-KV2"
    (directory / "scores.json").write_text(json.dumps(meta))
    from nas_minitron.integrity import write_checksums

    write_checksums(directory)  # as if written so: consistent with their checksums, for another teacher
    return directory


BEFORE_WORK: dict[str, tuple[Callable[[Path, Path], list[str]], tuple[str, ...]]] = {
    "prune-importance-of-other-weights": (
        lambda tmp, t: [*_prune(t), "--importance", str(_scores_of_another_teacher(tmp, "weights_fingerprint"))],
        ("computed for another teacher", "weights_fingerprint '0123456789abcdef' in the scores")),
    "prune-importance-of-other-arch": (
        lambda tmp, t: [*_prune(t), "--importance", str(_scores_of_another_teacher(tmp, "teacher_arch"))],
        ("computed for another teacher", "teacher_arch 'L4-H64-I128-A4-KV2' in the scores")),
    "distill-seq-len-above-positions": (
        lambda tmp, t: ["distill", "--teacher", str(t), "--student", str(t), *_TRAIN, "--seq-len", "512"],
        ("--seq-len 512 exceeds the student's max_position_embeddings (256)", "valid: 1..256")),
    "correct-teacher-seq-len-above-positions": (
        lambda tmp, t: ["correct-teacher", "--teacher", str(t), *_TRAIN, "--seq-len", "512"],
        ("--seq-len 512 exceeds the teacher's max_position_embeddings (256)",)),
    "dmc-seq-len-above-positions": (
        lambda tmp, t: ["dmc", "--model", str(t), "--target-cr", "2", *_TRAIN, "--seq-len", "300", "--tokens", "600"],
        ("--seq-len 300 exceeds the model's max_position_embeddings (256)",)),
    "importance-seq-len-above-positions": (
        lambda tmp, t: [*_importance(Path("builtin")), "--teacher", str(t), "--seq-len", "257"],
        ("--seq-len 257 exceeds the teacher's max_position_embeddings (256)",)),
    "eval-speed-past-positions": (
        lambda tmp, t: ["eval", "--model", str(t), "--device", "cpu", "--limit", "2", "--speed", "--speed-seq-len",
                        "250"],
        ("--speed-seq-len 250 + --speed-decode-tokens 32 = 282 exceeds the model's max_position_embeddings",)),
}


@pytest.mark.parametrize("name", sorted(BEFORE_WORK))
def test_cli_refuses_inconsistent_settings_before_work(name: str, tiny_teacher_dir: Path, tmp_path: Path) -> None:
    build, needles = BEFORE_WORK[name]
    out = tmp_path / "out"
    line = one_error_line(cli(*build(tmp_path, tiny_teacher_dir), "--out", str(out)))
    assert all(n in line for n in needles), line
    assert not out.exists() and not list(tmp_path.glob(".out.tmp-*")) and not list(tmp_path.glob("*.ckpt"))


def test_search_refuses_too_little_data_before_the_run_directory(tiny_teacher_dir: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    line = one_error_line(search(tiny_teacher_dir, run_dir, "--data", str(_small_text(tmp_path)),
                                 "--calibration-samples", "100000", cwd=tmp_path))
    assert "its calibration split holds" in line and "needs 100000 (--calibration-samples)" in line, line
    assert not run_dir.exists()


def test_the_file_fingerprint_is_the_loaded_teachers(tiny_teacher_dirs: dict[str, Path]) -> None:
    for directory in tiny_teacher_dirs.values():  # tied (qwen) and untied embeddings
        assert weights_fingerprint_of_dir(str(directory)) == weights_fingerprint(load_teacher(str(directory))[0])


# ==== search --importance DIR / --calib-seq-len (issue #13 item 3), checked before the run directory ================
# (a block of its own: the rows above grow in other branches). Each row runs the real search and is refused before
# the run directory, Ray or a teacher pass: exit 2, one line naming each differing field, expected vs found.
def _reused(tmp: Path, teacher: Path, **kwargs: Any) -> list[str]:
    from importance_helpers import REUSE_SETTINGS, reuse_args, scores_for
    from nas_minitron.pipeline.settings import resolve_settings

    settings = resolve_settings(None, {"teacher": str(teacher), **REUSE_SETTINGS})
    return reuse_args(scores_for(teacher, tmp / "importance", settings, **kwargs))


SEARCH_BEFORE_WORK: dict[str, tuple[Callable[[Path, Path], list[str]], tuple[str, ...]]] = {
    "importance-of-other-weights": (
        lambda tmp, t: _reused(tmp, t, weights_fingerprint="0123456789abcdef"),
        ("does not fit this search", "weights_fingerprint expected", "found '0123456789abcdef'")),
    "importance-of-other-arch": (
        lambda tmp, t: _reused(tmp, t, teacher_arch="L4-H64-I128-A4-KV2"),
        ("teacher_arch expected 'L3-H64-I96-A4-KV2', found 'L4-H64-I128-A4-KV2'",)),
    "importance-of-other-data": (
        lambda tmp, t: [*_reused(tmp, t), "--seed", "3"],
        ("data_fingerprint expected", "seed expected 3 (--seed), found 0")),
    "importance-without-the-windows": (
        lambda tmp, t: _reused(tmp, t, windows=(1,)),
        ("window_sizes expected [1, 2]", "missing [2]", "--window-sizes 1,2")),
    "importance-not-a-directory-of-scores": (
        lambda tmp, t: ["--importance", str(tmp / "nothing")],
        ("is not an importance directory",)),
    "calib-seq-len-above-positions": (
        lambda tmp, t: ["--calib-seq-len", "257"],
        ("--calib-seq-len 257 exceeds the teacher's max_position_embeddings (256)", "valid: 2..256")),
}


@pytest.mark.parametrize("name", sorted(SEARCH_BEFORE_WORK))
def test_search_refuses_unfit_importance_before_the_run_directory(name: str, tiny_teacher_dir: Path,
                                                                  tmp_path: Path) -> None:
    build, needles = SEARCH_BEFORE_WORK[name]
    run_dir = tmp_path / "run"
    line = one_error_line(search(tiny_teacher_dir, run_dir, *build(tmp_path, tiny_teacher_dir), cwd=tmp_path))
    assert all(n in line for n in needles), line
    assert not run_dir.exists()
