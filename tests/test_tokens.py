"""Token streams (nas_minitron/tokens.py): the same sequences as take_sequences, resumable after a kill."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from nas_minitron import tokens
from nas_minitron.data import save_sequences, take_sequences
from nas_minitron.errors import UserError
from nas_minitron.integrity import CHECKSUMS
from nas_minitron.tokens import FAULT_ENV, MANIFEST, TokenStream, open_tokens, token_dtype, write_stream
from test_data import _corpus
from tiny_models import tiny_tokenizer

T = 16


@pytest.fixture(scope="module")
def tokenizer():  # type: ignore[no-untyped-def]
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every local format, plus documents from 2 tokens to several rows long (a row then spans many documents)."""
    root = _corpus(tmp_path_factory.mktemp("corpus") / "c", num_docs=40)
    words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta", "iota", "kappa"]
    rows = [{"text": " ".join(words[(i + j) % 10] for j in range(i * 7 % 53 + 1))} for i in range(300)]
    (root / "varied.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def _files(root: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(root.iterdir()) if p.is_file()}


@pytest.mark.parametrize("num_proc", [1, 2])
def test_stream_equals_take_sequences_and_continues(corpus: Path, tokenizer, tmp_path: Path,  # type: ignore[no-untyped-def]
                                                    monkeypatch: pytest.MonkeyPatch, num_proc: int) -> None:
    monkeypatch.setattr(tokens, "CHUNK_CHARS", 500)  # many chunks: the processes' results come back in order
    expected = take_sequences(str(corpus), tokenizer, "train", T, 40, seed=2)  # [40, T]
    short = write_stream(tmp_path / "short", str(corpus), tokenizer, "train", T, 13, seed=2, shard_sequences=4,
                         num_proc=num_proc)
    full = write_stream(tmp_path / "full", str(corpus), tokenizer, "train", T, 27, seed=2, shard_sequences=4,
                        num_proc=num_proc, start=short.end)  # type: ignore[arg-type]
    assert torch.equal(short.tensor(), expected[:13]) and torch.equal(full.tensor(), expected[13:])
    manifest = json.loads((tmp_path / "short" / MANIFEST).read_text())
    assert manifest["dtype"] == "uint16" and [s["num_sequences"] for s in manifest["shards"]] == [4, 4, 4, 1]
    assert np.load(tmp_path / "short" / "shard-00000.npy").dtype == np.uint16
    assert torch.equal(short.rows(3, 9), expected[3:9]) and torch.equal(full.take([5, 0, 26]), expected[[18, 13, 39]])


def test_dtype_by_vocabulary() -> None:
    assert token_dtype(65536) == "uint16" and token_dtype(65537) == "uint32" and token_dtype(151_936) == "uint32"


def test_batches_are_the_tensors_batches(corpus: Path, tokenizer, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    stream = write_stream(tmp_path / "s", str(corpus), tokenizer, "train", T, 23, seed=0, shard_sequences=5,
                          num_proc=1)
    tensor = stream.tensor()
    for rank, world in ((0, 1), (0, 2), (1, 2), (2, 3)):
        part = tensor[rank::world]
        want = [part[i * 4 : (i + 1) * 4] for i in range(part.shape[0] // 4)]
        got = list(stream.batches(4, rank, world))
        assert len(got) == len(want) and all(torch.equal(a, b) for a, b in zip(got, want))
        assert len(list(stream.batches(4, rank, world))) == len(want)  # re-iterable: another pass, same batches
    with pytest.raises(UserError, match="fewer than one batch"):
        stream.batches(24)


def _writer_script(tokenizer_dir: Path, corpus: Path, out: Path) -> str:
    return (f"from transformers import AutoTokenizer\nfrom nas_minitron.tokens import write_stream\n"
            f"tok = AutoTokenizer.from_pretrained({str(tokenizer_dir)!r})\n"
            f"write_stream({str(out)!r}, {str(corpus)!r}, tok, 'train', {T}, 30, seed=1, shard_sequences=4, "
            f"num_proc=1)\n")


def test_resumed_after_a_kill_equals_an_uninterrupted_run(corpus: Path, tokenizer, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    tokenizer.save_pretrained(tmp_path / "tok")
    killed, whole = tmp_path / "killed", tmp_path / "whole"
    env = {**os.environ, FAULT_ENV: "2", "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.run([sys.executable, "-c", _writer_script(tmp_path / "tok", corpus, killed)], env=env,
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == -9, proc.stderr  # SIGKILLed right after shard 2
    assert sorted(p.name for p in killed.glob("*.npy")) == ["shard-00000.npy", "shard-00001.npy", "shard-00002.npy"]
    assert len(json.loads((killed / MANIFEST).read_text())["shards"]) == 3
    with pytest.raises(UserError, match="incomplete"):
        TokenStream.open(killed)
    (killed / "shard-00002.npy").write_bytes(b"torn")  # a shard cut short by the kill is written again
    resumed = write_stream(killed, str(corpus), tokenizer, "train", T, 30, seed=1, shard_sequences=4, num_proc=1)
    write_stream(whole, str(corpus), tokenizer, "train", T, 30, seed=1, shard_sequences=4, num_proc=2)
    assert _files(killed) == _files(whole)  # shards, manifest and checksums byte for byte
    assert torch.equal(resumed.tensor(), take_sequences(str(corpus), tokenizer, "train", T, 30, seed=1))


def test_damage_is_refused_and_another_stream_is_written_anew(corpus: Path, tokenizer, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    root = tmp_path / "s"
    write_stream(root, str(corpus), tokenizer, "validation", T, 6, seed=0, shard_sequences=4, num_proc=1)
    shard = root / "shard-00001.npy"
    data = bytearray(shard.read_bytes())
    data[-1] ^= 1
    shard.write_bytes(bytes(data))
    TokenStream.open(root)  # the size check cannot see a same-size change
    with pytest.raises(UserError, match="sha256 mismatch"):
        TokenStream.open(root, verify=True)
    shard.write_bytes(bytes(data[:-2]))
    with pytest.raises(UserError, match="truncated"):
        TokenStream.open(root)
    again = write_stream(root, str(corpus), tokenizer, "validation", T, 5, seed=0, shard_sequences=4, num_proc=1)
    assert torch.equal(again.tensor(), take_sequences(str(corpus), tokenizer, "validation", T, 5))
    assert set(json.loads((root / CHECKSUMS).read_text())["files"]) == {"shard-00000.npy", "shard-00001.npy"}
    with pytest.raises(UserError, match="too little data"):
        write_stream(tmp_path / "big", str(corpus), tokenizer, "validation", T, 10_000, num_proc=1)


def test_an_older_runs_token_file_opens_as_a_stream(tmp_path: Path) -> None:
    file = tmp_path / "train.safetensors"
    save_sequences(file, torch.arange(64).view(4, T))
    stream = open_tokens(file, verify=True)
    assert stream.shape == (4, T) and torch.equal(stream.rows(1, 3), torch.arange(64).view(4, T)[1:3])
