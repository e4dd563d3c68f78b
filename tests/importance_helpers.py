"""Importance records for `search --importance` tests, made without a teacher pass (shared by the reuse tests and the
CLI bad-input table)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch

from nas_minitron.pipeline.importance_stage import provenance
from nas_minitron.pipeline.settings import SearchSettings, calibration_seq_len
from nas_minitron.prune.baselines import random_scores
from nas_minitron.teacher import load_teacher_config, load_teacher_tokenizer, weights_fingerprint_of_dir

# What the reuse tests search with on the tiny teacher (3 layers: the tiny space's depths drop 1 or 2 of them).
REUSE_SETTINGS: dict[str, Any] = dict(budget="0.6x", space="tiny", calibration_samples=4, calib_seq_len=16)


def scores_for(teacher: Path, out: Path, settings: SearchSettings, windows: tuple[int, ...] = (1, 2),
               **meta: Any) -> Path:
    """Seeded random scores whose record says they were computed for `teacher` on `settings`' calibration data,
    with layer-removal windows `windows`; `meta` overrides record fields (another teacher, other data)."""
    from nas_minitron.families import describe

    arch = describe(load_teacher_config(str(teacher)))[1]
    scores = random_scores(arch, seed=0)
    seq_len = calibration_seq_len(settings)
    record = dict(scores.meta, **provenance(settings, load_teacher_tokenizer(str(teacher))),
                  weights_fingerprint=weights_fingerprint_of_dir(str(teacher)),
                  num_sequences=settings.calibration_samples, seq_len=seq_len,
                  num_tokens=settings.calibration_samples * seq_len)
    record.update(meta)
    window_losses = {k: torch.rand(arch.num_hidden_layers - k + 1) for k in windows}
    out.mkdir(parents=True)
    dataclasses.replace(scores, windows=window_losses, meta=record).save(out)
    return out


def reuse_args(scores: Path) -> list[str]:
    """The search flags of `REUSE_SETTINGS` with --importance `scores`."""
    return ["--budget", "0.6x", "--space", "tiny", "--calibration-samples", "4", "--calib-seq-len", "16",
            "--importance", str(scores)]
