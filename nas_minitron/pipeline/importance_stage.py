"""The importance stage of `nas-minitron search`: computed from the teacher, or reused from `--importance DIR`.

Computed: the teacher over --calibration-samples sequences of --calib-seq-len tokens (default --seq-len), with
block importance and the layer-removal losses of every window the candidates' depths drop; the record names the
teacher's weights and the calibration data by fingerprint (as `nas-minitron importance` does), so another run can
reuse it. Reused: a directory made by `nas-minitron importance` or another run's importance/, checked in pre-flight
(`check_reused`: same teacher, same calibration data, the windows the candidates need) and linked into the run's
importance/ with a marker naming its source; the teacher is not loaded for it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nas_minitron.arch import ArchConfig
from nas_minitron.atomic import atomic_directory
from nas_minitron.data import data_fingerprint, take_sequences
from nas_minitron.errors import UserError
from nas_minitron.integrity import CHECKSUMS
from nas_minitron.pipeline.run_dir import Run
from nas_minitron.pipeline.settings import SearchSettings, calibration_seq_len
from nas_minitron.pipeline.stages import _link_or_copy
from nas_minitron.prune.importance import compute_importance
from nas_minitron.prune.scores import ImportanceScores
from nas_minitron.teacher import (
    load_teacher,
    load_teacher_tokenizer,
    resolve_teacher_dir,
    weights_fingerprint,
    weights_fingerprint_of_dir,
)

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

__all__ = ["check_reused", "dropped_layers", "importance", "provenance"]

_SCORE_FILES = ("scores.safetensors", "scores.json", CHECKSUMS)  # what `ImportanceScores.save` writes


def dropped_layers(teacher_layers: int, depths: Iterable[int]) -> list[int]:
    """The layer counts the candidates drop (the windows whose removal losses the importance stage measures)."""
    return sorted({teacher_layers - int(n) for n in depths} - {0})


def provenance(s: SearchSettings, tokenizer: PreTrainedTokenizerBase) -> dict[str, Any]:
    """What the record of this search's calibration says about its data (weights are fingerprinted apart)."""
    return {"data_fingerprint": data_fingerprint(s.data, tokenizer, "calibration", calibration_seq_len(s),
                                                 s.calibration_samples, s.seed),
            "teacher": s.teacher, "data": s.data, "seed": s.seed}


def importance(run: Run) -> dict[str, Any]:
    """The run's importance/: computed, or linked from --importance (the stage marker names it as reused_from)."""
    if run.settings.importance is not None:
        return _reuse(run)
    s = run.settings
    teacher, tokenizer = run.teacher()
    drops = dropped_layers(run.resolved.teacher().num_hidden_layers,
                           (int(r["num_hidden_layers"]) for r in run.candidate_rows()))
    seq_len = calibration_seq_len(s)
    batches = take_sequences(s.data, tokenizer, "calibration", seq_len, s.calibration_samples, s.seed)  # [N, T]
    scores = compute_importance(teacher, batches, batch_size=s.batch_size, layer_metrics=True,
                                layer_loss=bool(drops), window_sizes=tuple(drops) or (1,),
                                loss_sequences=s.loss_sequences, progress=True)
    device = next(teacher.parameters()).device.type
    meta = dict(scores.meta, **provenance(s, tokenizer), weights_fingerprint=weights_fingerprint(teacher),
                device=device, compute_dtype="bfloat16" if device == "cuda" else "float32")
    with atomic_directory(run.path("importance"), overwrite=True) as tmp:
        dataclasses.replace(scores, meta=meta).save(tmp)
    return {"num_tokens": int(batches.numel()), "seq_len": seq_len, "window_sizes": drops}


def _reuse(run: Run) -> dict[str, Any]:
    """Link the scores pre-flight checked (`check_reused`) into importance/ and read them back against their
    checksums; no teacher."""
    source = Path(str(run.settings.importance)).expanduser().resolve()
    with atomic_directory(run.path("importance"), overwrite=True) as tmp:
        for name in _SCORE_FILES:
            if (source / name).is_file():
                _link_or_copy(source / name, tmp / name)
        scores = ImportanceScores.load(tmp)  # the source's own checksums: a file altered since is refused
    meta = scores.meta
    run.log(f"  reused importance from {source} ({meta.get('num_sequences')} x {meta.get('seq_len')} calibration "
            f"tokens, windows {sorted(scores.windows) or 'none'}): no teacher pass")
    return {"reused_from": str(source), "num_tokens": meta.get("num_tokens"), "seq_len": meta.get("seq_len"),
            "window_sizes": sorted(scores.windows)}


# ---- pre-flight: whether --importance DIR can stand in for this search's importance ----------------------------------
def check_reused(s: SearchSettings, resolved: Mapping[str, Any], depths: Iterable[int]) -> ImportanceScores:
    """The scores of --importance, or UserError naming each field that differs (expected vs found) when they were
    made for another teacher (teacher_arch, weights_fingerprint) or other calibration data (data_fingerprint, with
    the sizes behind it), and the windows they lack for the candidates' `depths`. Reads the teacher's files (its
    fingerprint, without loading it where they are safetensors) and tokenizer; writes nothing."""
    assert s.importance is not None
    directory = Path(s.importance).expanduser()
    scores = ImportanceScores.load(directory)  # not a directory of scores, damaged or altered: refused here
    where = resolve_teacher_dir(s.teacher, s.cache_dir, s.teacher_revision)
    tokenizer = load_teacher_tokenizer(where)
    fingerprint = weights_fingerprint_of_dir(where)
    if fingerprint is None:  # a hub id, or files named otherwise than the model's tensors: only loading says
        fingerprint = weights_fingerprint(load_teacher(s.teacher, s.cache_dir, revision=s.teacher_revision)[0])
    expected = {"teacher_arch": resolved["teacher_arch"], "weights_fingerprint": fingerprint,
                "data_fingerprint": provenance(s, tokenizer)["data_fingerprint"]}
    found = scores.meta
    problems = [f"{key} expected {value!r}, found {found.get(key)!r}" for key, value in expected.items()
                if found.get(key) != value]
    if found.get("data_fingerprint") != expected["data_fingerprint"]:  # which of the calibration settings differ
        for key, flag, value in (("data", "--data", s.data), ("num_sequences", "--calibration-samples",
                                 s.calibration_samples), ("seq_len", "--calib-seq-len", calibration_seq_len(s)),
                                 ("seed", "--seed", s.seed)):
            if key in found and found[key] != value:
                problems.append(f"{key} expected {value!r} ({flag}), found {found[key]!r}")
    teacher = ArchConfig.parse(str(resolved["teacher_arch"]), int(resolved["head_dim"]))
    drops = dropped_layers(teacher.num_hidden_layers, depths)
    missing = [k for k in drops if k not in scores.windows]
    if missing:
        problems.append(f"window_sizes expected {drops} (the layers the candidates drop), found "
                        f"{sorted(scores.windows)}: missing {missing}")
    if problems:
        windows = ",".join(str(k) for k in sorted({*drops, *scores.windows})) or "none"
        raise UserError(
            f"--importance {str(directory)!r} does not fit this search: {'; '.join(problems)}; pass the settings it "
            f"was made with, recompute it (nas-minitron importance --teacher {s.teacher} --data {s.data} "
            f"--num-samples {s.calibration_samples} --seq-len {calibration_seq_len(s)} --seed {s.seed} "
            f"--window-sizes {windows} --out DIR), or drop --importance to compute it in the run."
        )
    return scores
