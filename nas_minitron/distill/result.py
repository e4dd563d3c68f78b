"""The one writer of a distilled student's directory and its `distill.json` record.

`nas-minitron distill`, the search's winner distillation and `distill_ray` all save through `save_distilled`, so
every `distill.json` has the same keys; `correct-teacher` writes the same record as `correction.json`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nas_minitron.distill.config import DistillConfig, DistillResult
from nas_minitron.integrity import write_checksums

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

__all__ = ["RECORD_FILE", "distill_record", "save_distilled"]

RECORD_FILE = "distill.json"


def distill_record(
    result: DistillResult,
    *,
    config: DistillConfig | None = None,
    teacher: str | None = None,
    student: str | None = None,
    data: str | None = None,
    logit_cache: str | os.PathLike[str] | None = None,
) -> dict[str, Any]:
    """The `distill.json` record of a finished run (schema in `save_distilled`); unknown provenance is None."""
    return {
        "teacher": teacher,
        "student": student,
        "data": data,
        "logit_cache": None if logit_cache is None else str(logit_cache),
        "config": None if config is None else config.to_dict(),
        **result.to_dict(),
    }


def save_distilled(
    out_dir: str | os.PathLike[str],
    student: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase | None,
    result: DistillResult,
    *,
    config: DistillConfig | None = None,
    teacher: str | None = None,
    student_source: str | os.PathLike[str] | None = None,
    data: str | None = None,
    logit_cache: str | os.PathLike[str] | None = None,
    state_dict: dict[str, torch.Tensor] | None = None,
    extra_files: Mapping[str, str] | None = None,
) -> Path:
    """Write a distilled student into `out_dir` (created if missing) and return `out_dir`.

    `out_dir` receives the student (`save_pretrained`, loadable with stock `from_pretrained`; `state_dict` replaces
    its live weights, e.g. an FSDP student's full state gathered on rank 0), the tokenizer unless it is None,
    every `extra_files` entry (file name -> text, e.g. the student's `pruning.json`), `distill.json`, and last the
    checksums of them all (`nas_minitron.integrity`).
    Writing is not atomic: callers write into `atomic_directory(...)`'s temporary directory.

    `distill.json` (one JSON object; a float that is NaN or infinite is written as null):
      teacher            str | null   the teacher (spec or directory) the targets came from
      student            str | null   the student directory the run started from
      data               str | null   the training data (`--data` spec)
      logit_cache        str | null   the teacher-logit cache directory, when the targets came from one
      config             object | null  the `DistillConfig` (`DistillConfig.to_dict()`)
      num_tokens         int          training tokens consumed (all workers)
      num_steps          int          optimizer steps taken
      val_loss, val_kl   float | null the final validation LM loss and KL to the teacher
      wall_s             float        training wall time, over resumes
      resumed_from_step  int | null   the checkpoint step the last session resumed from
      curve              [object]     the validation points, step 0 first: step, num_tokens, val_loss, val_kl,
                                      train_loss (null at step 0), wall_s (`EvalPoint.to_dict()`)
    `DistillResult.from_dict` reads the result back from it.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    student.save_pretrained(out, state_dict=state_dict)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    for name, text in (extra_files or {}).items():
        (out / name).write_text(text)
    record = distill_record(result, config=config, teacher=teacher, data=data, logit_cache=logit_cache,
                            student=None if student_source is None else str(student_source))
    (out / RECORD_FILE).write_text(json.dumps(record, indent=1) + "\n")
    write_checksums(out)
    return out
