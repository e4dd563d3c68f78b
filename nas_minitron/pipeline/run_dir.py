"""The run directory of `nas-minitron search`: its one owner.

Everything that names a file of a run lives here: the stage order (`STAGES`), the stage markers, the CSV tables and
their columns, the data files, and the resolved-run record (`config.json`). Writers (pipeline/stages.py) and readers
(report/, benchmarks/, tests) use these names instead of spelling paths themselves. The layout is described in
README.md ("Run directory").
"""

from __future__ import annotations

import csv
import gc
import json
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nas_minitron._lazy import lazy_import
from nas_minitron.arch import ArchConfig
from nas_minitron.atomic import write_json_atomic
from nas_minitron.distill.logit_cache import MANIFEST, LogitCache
from nas_minitron.pipeline.settings import SearchSettings
from nas_minitron.runtime import resolve_device
from nas_minitron.teacher import load_teacher
from nas_minitron.tokens import TokenStream, open_tokens

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase
else:
    torch = lazy_import("torch")

__all__ = ["CURVE_COLUMNS", "DMC_COLUMNS", "DMC_CSV", "LOCK_FILE", "STAGES", "TRIAL_COLUMNS", "WINNER_COLUMNS",
           "Resolved", "Run", "dmc_name", "finished_stages", "now", "read_csv", "stage_marker", "write_csv"]

# Run order. Candidates come first although the papers start from importance: they need only the config, so an
# unreachable budget fails in a second instead of after the importance pass, and they tell importance which
# contiguous-block sizes (layers dropped) to measure.
STAGES = ("candidates", "importance", "logit_cache", "trials", "winners", "distill", "dmc", "eval", "report")

TRIAL_COLUMNS = ("trial_id", "number", "name", "num_hidden_layers", "hidden_size", "intermediate_size",
                 "num_attention_heads", "num_key_value_heads", "params", "status", "wall_s", "num_tokens",
                 "val_loss", "val_kl", "val_loss_step0", "val_kl_step0", "kv_bytes_per_token", "flops_per_token",
                 "device", "gpu_ids", "param_dtype", "compute_dtype", "log", "error")
CURVE_COLUMNS = ("trial_id", "name", "step", "num_tokens", "val_loss", "val_kl")
# source: "trial" (continued from its trial's trained weights) or "pruned" (re-cut from the teacher); tokens_seen:
# tokens its weights had seen when it won (its trial's); total_tokens: trial + full distillation, once distilled.
WINNER_COLUMNS = ("rank", "name", "params", "val_loss", "val_kl", "path", "source", "tokens_seen", "total_tokens")
# dmc.csv, one row per (winner, target ratio) of --dmc-cr: achieved_cr measured on the validation stream with hard
# decisions; kv_bytes_per_token the winner's (candidates.csv), _compressed = that / achieved_cr.
DMC_CSV = "dmc.csv"
DMC_COLUMNS = ("winner", "target_cr", "achieved_cr", "val_loss", "val_kl", "kv_bytes_per_token",
               "kv_bytes_per_token_compressed", "tokens", "wall_s", "path")
LOCK_FILE = ".lock"  # held (fcntl) by the driver that runs the search in this directory

Log = Callable[[str], None]


def stage_marker(run_dir: Path, stage: str) -> Path:
    """The completion marker of `stage` (JSON: wall_s, finished_at and the stage's own facts)."""
    return run_dir / "stages" / f"{stage}.json"


def finished_stages(run_dir: Path) -> list[str]:
    """The stages whose marker exists, in run order."""
    return [stage for stage in STAGES if stage_marker(run_dir, stage).is_file()]


def dmc_name(winner: str, target_cr: float) -> str:
    """The folder (under dmc/) and checkpoint name of a winner retrofitted at one ratio: `<winner>-cr<ratio>`."""
    return f"{winner}-cr{target_cr:g}"


def now() -> str:
    """UTC time as the run directory records it."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def write_csv(path: Path, rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> None:
    """Write `rows` (extra keys ignored) atomically: a reader never sees half a table."""
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(columns), extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    tmp.replace(path)


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


@dataclass(frozen=True)
class Resolved:
    """What a run resolved from its settings and the teacher's config; `config.json` holds settings + these."""

    budget_params: int
    teacher_params: int
    teacher_arch: str
    head_dim: int
    model_type: str
    vocab_size: int

    def teacher(self) -> ArchConfig:
        """The teacher's architecture as a record (layers, widths, heads)."""
        return ArchConfig.parse(self.teacher_arch, self.head_dim)

    def to_dict(self) -> dict[str, Any]:
        return {"budget_params": self.budget_params, "teacher_params": self.teacher_params,
                "teacher_arch": self.teacher_arch, "head_dim": self.head_dim, "model_type": self.model_type,
                "vocab_size": self.vocab_size}

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> Resolved:
        return cls(budget_params=int(config["budget_params"]), teacher_params=int(config["teacher_params"]),
                   teacher_arch=str(config["teacher_arch"]), head_dim=int(config["head_dim"]),
                   model_type=str(config["model_type"]), vocab_size=int(config["vocab_size"]))


class Run:
    """The live state of one run: settings, run directory, what was resolved, and the driver's teacher."""

    def __init__(self, settings: SearchSettings, run_dir: Path, resume: bool, log: Log) -> None:
        self.settings, self.dir, self.resume, self.log = settings, run_dir, resume, log
        self._teacher: tuple[PreTrainedModel, PreTrainedTokenizerBase] | None = None
        self._resolved: Resolved | None = None

    def path(self, *parts: str) -> Path:
        return self.dir.joinpath(*parts)

    # ---- stage markers ------------------------------------------------------------------------------------------
    def done(self, stage: str) -> bool:
        return stage_marker(self.dir, stage).is_file()

    def mark(self, stage: str, wall_s: float, **extra: Any) -> None:
        write_json_atomic(stage_marker(self.dir, stage),
                          {"stage": stage, "wall_s": round(wall_s, 3), "finished_at": now(), **extra})

    def stage_info(self, stage: str) -> dict[str, Any]:
        info: dict[str, Any] = json.loads(stage_marker(self.dir, stage).read_text())
        return info

    # ---- records --------------------------------------------------------------------------------------------------
    @property
    def resolved(self) -> Resolved:
        if self._resolved is None:
            self._resolved = Resolved.from_config(json.loads(self.path("config.json").read_text()))
        return self._resolved

    def candidate_rows(self) -> list[dict[str, str]]:
        return read_csv(self.path("candidates.csv"))

    def winner_rows(self) -> list[dict[str, str]]:
        return read_csv(self.path("winners.csv"))

    def data_path(self, split: str) -> Path:
        """The token stream of a split (`nas_minitron.tokens`, a directory): `train_short` (the trials'; what the
        logit cache covers), `train_full` (the winners': the sequences after the trials') or `validation`. A run
        directory made before the streams holds `data/<split>.safetensors` files instead (and `train`: short + full;
        some have no `train_full`): those paths, when only they exist."""
        stream = self.path("data", split)
        legacy = self.path("data", f"{split}.safetensors")
        return legacy if legacy.is_file() and not stream.is_dir() else stream

    def legacy_data(self) -> bool:
        """Whether data/ holds an older run's whole-file token files (no streams to continue)."""
        return any(self.path("data").glob("*.safetensors"))

    def tokens(self, split: str) -> TokenStream:
        """A split's token stream, opened (sizes checked; sha256 too with --verify)."""
        return open_tokens(self.data_path(split), verify=self.settings.verify)

    def verify_shared(self) -> None:
        """With --verify, the sha256 of what every trial reads by path (the token files and the logit cache), once
        in the driver: the trials themselves check sizes only (importance scores they check in full, being small)."""
        if not self.settings.verify:
            return
        for split in ("train_short", "validation"):
            if self.data_path(split).exists():
                open_tokens(self.data_path(split), verify=True)
        if (self.path("logit_cache") / MANIFEST).is_file():
            LogitCache.open(self.path("logit_cache"), verify=True)

    # ---- the driver's device and teacher ----------------------------------------------------------------------
    def device(self) -> str:
        return resolve_device(self.settings.device)

    def teacher(self) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
        """The teacher and tokenizer, loaded once per driver process (again after `release_teacher`): frozen, in
        bf16 on a GPU (its importance, logit-cache and eval passes; the plan counts 2 B/P there), float32 on CPU."""
        if self._teacher is None:
            device = self.device()
            dtype = torch.bfloat16 if device.startswith("cuda") else None
            self._teacher = load_teacher(self.settings.teacher, self.settings.cache_dir, device=device, dtype=dtype,
                                         revision=self.settings.teacher_revision)
            self._teacher[0].requires_grad_(False)
        return self._teacher

    def release_teacher(self) -> bool:
        """Drop the driver's teacher and return its GPU memory to the device (for the trials, which Ray may place
        on the driver's GPU); returns whether one was held. A later `teacher()` loads it again."""
        held = self._teacher is not None
        self._teacher = None
        gc.collect()
        loaded = sys.modules.get("torch")  # never imports torch only to release nothing
        if loaded is not None and loaded.cuda.is_initialized():
            loaded.cuda.empty_cache()
        return held
