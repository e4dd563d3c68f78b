"""`nas-minitron importance` end to end in a subprocess on a tiny teacher, then `prune --importance`."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch

from nas_minitron.prune.scores import ImportanceScores


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "nas_minitron", *args], capture_output=True, text=True, timeout=300)


def _importance(teacher: Path, out: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return cli("importance", "--teacher", str(teacher), "--data", "builtin", "--num-samples", "6", "--seq-len", "32",
               "--batch-size", "4", "--window-sizes", "1,2", "--loss-samples", "4", "--device", "cpu",
               "--out", str(out), *extra)


def test_importance_cli_saves_reuses_refuses_and_feeds_prune(tiny_teacher_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "importance"
    result = _importance(tiny_teacher_dir, out)
    assert result.returncode == 0, result.stderr
    assert "tok/s" in result.stderr  # the progress bar
    scores = ImportanceScores.load(out)
    assert scores.heads.shape == (3, 4) and scores.neurons.shape == (3, 96) and scores.channels.shape == (64,)
    assert set(scores.windows) == {1, 2} and set(scores.layers) == {"block_importance", "loss_drop"}
    meta = json.loads((out / "scores.json").read_text())
    assert meta["num_tokens"] == 6 * 32 and meta["batch_agg"] == "l2" and meta["seq_agg"] == "mean"
    assert meta["loss_sequences"] == 4 and meta["data"] == "builtin" and meta["format_version"] == 1
    assert len(meta["weights_fingerprint"]) == 16 and len(meta["data_fingerprint"]) == 16

    again = _importance(tiny_teacher_dir, out)
    assert again.returncode == 0 and "reusing" in again.stdout, again.stderr
    assert torch.equal(ImportanceScores.load(out).neurons, scores.neurons)

    other = _importance(tiny_teacher_dir, out, "--batch-agg", "mean", "--seed", "1")
    assert other.returncode == 2
    assert "batch_agg saved 'l2', now 'mean'" in other.stderr and "data_fingerprint" in other.stderr
    assert "Traceback" not in other.stderr

    redone = _importance(tiny_teacher_dir, out, "--batch-agg", "mean", "--overwrite", "--no-layer-metrics")
    assert redone.returncode == 0, redone.stderr
    assert ImportanceScores.load(out).meta["batch_agg"] == "mean" and ImportanceScores.load(out).layers == {}

    student = tmp_path / "student"
    pruned = cli("prune", "--teacher", str(tiny_teacher_dir), "--arch", "L3-H48-I64-A2-KV1", "--importance",
                 str(out), "--out", str(student))
    assert pruned.returncode == 0, pruned.stderr
    assert json.loads((student / "pruning.json").read_text())["criterion"] == "activation"


def test_importance_cli_bad_input_exits_2(tiny_teacher_dir: Path, tmp_path: Path) -> None:
    cases = {
        ("--batch-agg", "max"): "--batch-agg must be one of l2, mean, but got 'max'",
        ("--seq-len", "1000"): "--seq-len 1000 exceeds the teacher's max_position_embeddings (256)",
        ("--num-samples", "100000"): "too little data",
    }
    for extra, message in cases.items():
        args = ["importance", "--teacher", str(tiny_teacher_dir), "--out", str(tmp_path / "x"), "--seq-len", "32",
                "--num-samples", "4", *extra]
        result = cli(*args)
        assert result.returncode == 2, (extra, result.stderr)
        assert message in result.stderr and "Traceback" not in result.stderr, result.stderr
        assert not (tmp_path / "x").exists()  # nothing half-written
