"""The resource plan of a `nas-minitron search` run: per stage, what it will process, hold and write, before any work.

Pure arithmetic on the resolved settings (`SearchSettings` + the runner's resolved dict: teacher_params,
budget_params, vocab_size, teacher_arch, head_dim) and, when given, the candidates' shapes; no torch, no files read.
`--dry-run` prints it and exits, every run saves it as `plan.json` in the run directory, and `problems` lists what
cannot fit (the runner refuses those before the run directory exists).

JSON (`Plan.to_dict()`, `--dry-run --json`, `plan.json`)::

    {"stages": [{"stage": str,                 one of run_dir.STAGES, in run order
                 "tokens": int,                tokens through a model (forward, or forward + backward when training)
                 "cpu_ram_bytes": int,         peak resident memory of the processes the stage runs, all together
                 "gpu_bytes_per_device": int,  peak memory on one GPU (0: the stage uses none)
                 "disk_bytes": int,            in the run directory from the stage at its peak (disk model below)
                 "seconds": float,             wall time
                 "estimated": bool,            false only when every rate it uses is a measured CPU row below
                 "basis": str}, ...],          how the numbers were made, in words
     "totals": {"tokens", "disk_bytes", "seconds": sums; "cpu_ram_bytes", "gpu_bytes_per_device": maxima},
     "gpu_memory_bytes": int,                  the capacity of one GPU assumed (--gpu-memory-gib)
     "fits": bool, "problems": [str, ...],     problems: one sentence each, with the numbers and what would fit
     "warnings": [str, ...]}                   what runs but is likely not what was meant (never refuses)

Memory model (bytes; P = parameters, L/H/I = layers/hidden/intermediate of the model, B x T = batch x seq_len):
- A trained student: 16 B/P (fp32 master weights 4 + gradients 4 + AdamW moments 8), on CPU and GPU alike
  (a GPU trial keeps fp32 master weights under bf16 autocast, search/worker.py). With FSDP2 over N GPUs: 16 P / N.
- A teacher: 4 B/P on CPU (fp32, the embedded default's converted files; a bf16 checkpoint would take 2);
  2 B/P on a GPU (bf16). Forward-only passes add activations of one layer at a time (negligible) plus logits.
- Activations kept for backward: L x B x T x H x k bytes with k = ACT_BYTES_PER_HIDDEN (34 in bf16: Korthikanti
  et al. 2022 without the attention-score term, which SDPA does not store; 68 in fp32). Gradient checkpointing
  (students of >= 1B parameters, in the trials and the full distillation, `distill.config.GRAD_CHECKPOINTING_PARAMS`)
  keeps 2 x H bytes per layer and token plus one layer's full set.
- The chunked KD loss: ~7 fp32 [chunk, V] tensors for full KD (live teacher), ~4 for top-k KD, chunk =
  min(1024, B x T) (benchmarks/RESULTS.md "KD loss memory": 7.0 and 3.6-3.8 tensors measured).
- Per process: RUNTIME_BYTES (torch + transformers imported, ~0.25 GiB measured in RESULTS.md "Student build
  memory", rounded up to 0.5 GiB for the allocator); a local Ray cluster adds RAY_BYTES to every stage (1.8 GiB of
  summed RSS measured: it is up from the first stage to the last). The driver returns freed memory to the system
  between stages (runner: gc + malloc_trim), so a stage is not charged its predecessor's peak.
  A GPU adds CUDA_CONTEXT_BYTES (~1 GiB: context + allocator slack; estimated).
Disk model (what a stage has in the run directory at its peak; the sum over stages is checked against free space):
token streams 2 B/token (uint16, vocabulary <= 65,536) or 4 B/token (uint32), data/ (`nas_minitron.tokens`):
train_short + validation written by the logit_cache stage, train_full by the distill stage; the logit cache N x T x
(4 + topk x (2 + 4)) (int32 tokens, fp16 log-probs, int32 ids); a trial's checkpoint copied into the run directory
by Ray 12 B/P (fp32 weights + AdamW state), one per running trial, deleted when it ends; trained students 4 B/P
(trial_results/<arch>/), kept while they can still win: winners + running trials with one objective, every trial
with several; a winner linked from its trial (0; re-pruned, 4 B/P, only when its trial weights are missing: not
counted); the full distillation's last 2 checkpoints (2 x 12 B/P) and its result 4 B/P; the dmc stage (--dmc-cr)
4 B/P per winner and ratio plus the last 2 checkpoints of the one it trains (2 x 12 B/P).
The token streams are memory-mapped: no process holds a stream in RAM (a worker reads its own rows as it trains),
except the logit-cache pass, which holds the short stream + validation as int64 (and their concatenation), and the
dmc stage, which holds its --dmc-tokens rows + validation as int64.
Time model: tokens / rate, the rate read from THROUGHPUT (tokens/s measured on a model of known size, scaled by
FLOPs per token, i.e. measured params / model params, and on CPU by threads) plus a per-trial set-up; a KD step
with a live teacher counts student + teacher / 3 parameters (the teacher runs forward only); see `_rate`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from nas_minitron.arch import ArchConfig
from nas_minitron.distill.config import GRAD_CHECKPOINTING_PARAMS, DistillConfig
from nas_minitron.distill.logit_cache import LOGIT_CHUNK_TOKENS
from nas_minitron.pipeline.run_dir import STAGES
from nas_minitron.pipeline.settings import (
    SearchSettings,
    cache_workers,
    calibration_seq_len,
    dmc_ratios,
    full_distill_workers,
    train_sequences,
)
from nas_minitron.tokens import token_dtype

__all__ = ["DEFAULT_GPU_MEMORY_GIB", "LARGE_TEACHER_PARAMS", "PLAN_FILE", "Plan", "StagePlan", "StudentShape",
           "describe_plan", "make_plan"]

PLAN_FILE = "plan.json"  # in the run directory, beside config.json (README "Run directory")
GIB = 2**30
DEFAULT_GPU_MEMORY_GIB = 80.0
RUNTIME_BYTES = GIB // 2
# A local Ray cluster (`search` starts it before the first stage and stops it after the last, so every stage's
# process tree holds it): RSS summed over its 20 processes with the dashboard on, 1,856 MiB measured on the 2-core
# box (Ray 2.60, 2026-12-02, benchmarks/RESULTS.md "The plan against the default run"; shared pages counted per
# process, as the measurement counts them).
RAY_BYTES = 1856 * 2**20
CUDA_CONTEXT_BYTES = GIB
ACT_BYTES_PER_HIDDEN = {"bf16": 34, "float32": 68}
KD_LOSS_TENSORS = {"full": 7, "topk": 4}
LOSS_CHUNK_TOKENS = DistillConfig.loss_chunk_tokens  # the field's default (a dataclass keeps it on the class)
EVAL_TOKENS_PER_ITEM = 256  # assumed (context + choices, summed); not measured
EVAL_ITEMS_UNLIMITED = 1000  # assumed items per task with --eval-limit none
TRIAL_SETUP_S = {"cpu": 10.0, "cuda": 30.0}  # slicing the student from the teacher's files, process start (estimated)
DRIVER_THREADS = 2  # the driver's stages use every core of the 2-core box the CPU rows were measured on
LARGE_TEACHER_PARAMS = 10**9  # from here on the CPU-sized defaults are far from the papers' scale: a warning


@dataclass(frozen=True)
class Rate:
    """Tokens/s of one kind of pass, measured (or assumed) on a model of `params` parameters."""

    tokens_per_s: float
    params: int
    threads: int
    measured: bool
    source: str


def _live_params(student_params: int, teacher_params: int) -> int:
    """The parameters of a model whose training step costs what a KD step with a live teacher costs: the student
    trains (6 P FLOPs per token), the teacher only runs forward (2 P)."""
    return student_params + teacher_params // 3


# CPU rows: benchmarks/RESULTS.md "Issue 5 results: distillation engine", "Speed ratios", run 3 (quiet 2-core box,
# 2 threads, float32, batch 2 x 256, top-k 64): teacher forward 199.0 tok/s (SmolLM2-135M, 134,515,008 params),
# cached top-64 KD step 85.7 tok/s and live-teacher KD step 56.1 tok/s (92.0M student; the live step also runs the
# 134.5M teacher forward, so its row counts student + teacher / 3 parameters, `_live_params`).
# GPU rows: estimated, never measured here: 2 P FLOPs per forward token, 6 P per trained token (+2 P_teacher for a
# live teacher), at an assumed 40% MFU of one H100 SXM's 989 TFLOP/s dense bf16.
_H100_BF16_FLOPS = 989e12
_GPU_MFU = 0.40
THROUGHPUT: dict[tuple[str, str], Rate] = {
    ("cpu", "forward"): Rate(199.0, 134_515_008, 2, True, "RESULTS.md Issue 5 speed run 3: teacher forward"),
    ("cpu", "train_topk"): Rate(85.7, 92_000_000, 2, True, "RESULTS.md Issue 5 speed run 3: cached top-64 KD step"),
    ("cpu", "train_live"): Rate(56.1, _live_params(92_000_000, 134_515_008), 2, True,
                                "RESULTS.md Issue 5 speed run 3: KD step, live teacher"),
    ("cuda", "forward"): Rate(_GPU_MFU * _H100_BF16_FLOPS / 2, 1, 1, False, "2P FLOPs/token at 40% MFU of an H100"),
    ("cuda", "train_topk"): Rate(_GPU_MFU * _H100_BF16_FLOPS / 6, 1, 1, False, "6P FLOPs/token at 40% MFU of an H100"),
    ("cuda", "train_live"): Rate(_GPU_MFU * _H100_BF16_FLOPS / 6, 1, 1, False,
                                 "6P FLOPs/token at 40% MFU of an H100 (P: student + teacher / 3)"),
}


def _rate(device: str, kind: str, params: int, threads: int) -> tuple[float, bool]:
    """(tokens/s, measured) of a `kind` pass over a model of `params` parameters with `threads` CPU threads.

    Scaled by FLOPs per token (measured params / params) and, on CPU, linearly by threads; `measured` is false on
    GPU and when the model is outside 0.5x-2x of the measured one (an extrapolation)."""
    row = THROUGHPUT[("cuda" if device == "cuda" else "cpu", kind)]
    rate = row.tokens_per_s * row.params / max(1, params)
    if device != "cuda":
        rate *= threads / row.threads
    return rate, row.measured and 0.5 <= params / row.params <= 2.0


@dataclass(frozen=True)
class StudentShape:
    """The shape of one candidate student (its size decides memory and speed)."""

    params: int
    num_hidden_layers: int
    hidden_size: int


@dataclass(frozen=True)
class StagePlan:
    stage: str
    tokens: int
    cpu_ram_bytes: int
    gpu_bytes_per_device: int
    disk_bytes: int
    seconds: float
    estimated: bool
    basis: str

    def to_dict(self) -> dict[str, Any]:
        return {"stage": self.stage, "tokens": self.tokens, "cpu_ram_bytes": self.cpu_ram_bytes,
                "gpu_bytes_per_device": self.gpu_bytes_per_device, "disk_bytes": self.disk_bytes,
                "seconds": round(self.seconds, 1), "estimated": self.estimated, "basis": self.basis}


@dataclass(frozen=True)
class Plan:
    stages: tuple[StagePlan, ...]
    gpu_memory_bytes: int
    problems: tuple[str, ...] = field(default=())
    warnings: tuple[str, ...] = field(default=())

    @property
    def fits(self) -> bool:
        return not self.problems

    def totals(self) -> dict[str, Any]:
        return {"tokens": sum(s.tokens for s in self.stages), "disk_bytes": sum(s.disk_bytes for s in self.stages),
                "seconds": round(sum(s.seconds for s in self.stages), 1),
                "cpu_ram_bytes": max((s.cpu_ram_bytes for s in self.stages), default=0),
                "gpu_bytes_per_device": max((s.gpu_bytes_per_device for s in self.stages), default=0)}

    def to_dict(self) -> dict[str, Any]:
        return {"stages": [s.to_dict() for s in self.stages], "totals": self.totals(),
                "gpu_memory_bytes": self.gpu_memory_bytes, "fits": self.fits, "problems": list(self.problems),
                "warnings": list(self.warnings)}


# ---- the pieces of the memory model --------------------------------------------------------------------------
def _activations(layers: int, hidden: int, tokens: int, dtype: str, checkpointing: bool = False) -> int:
    per_layer = tokens * hidden * ACT_BYTES_PER_HIDDEN[dtype]
    if checkpointing:
        return layers * tokens * hidden * 2 + per_layer
    return layers * per_layer


def _kd_loss(tokens: int, vocab: int, kind: str) -> int:
    return KD_LOSS_TENSORS[kind] * min(LOSS_CHUNK_TOKENS, tokens) * vocab * 4


def _forward_peak(tokens: int, vocab: int, hidden: int, logit_tokens: int | None = None) -> int:
    """A forward-only pass: logits and their log-softmax (2 fp32 [tokens, V]; only `logit_tokens` positions at a
    time when the output head runs in chunks, the logit cache's `teacher_topk`) plus a few [tokens, H] buffers."""
    return 2 * min(tokens, logit_tokens or tokens) * vocab * 4 + 16 * tokens * hidden * 4


@dataclass(frozen=True)
class _Ctx:
    s: SearchSettings
    teacher: ArchConfig
    teacher_params: int
    vocab: int
    student: StudentShape  # the largest candidate (memory) / a typical one (speed): the largest, conservatively
    layer_counts: tuple[int, ...]
    driver_device: str  # cpu or cuda

    @property
    def micro_tokens(self) -> int:
        return self.s.batch_size * self.s.seq_len


def _driver_device(s: SearchSettings) -> str:
    if s.device == "cuda" or (s.device == "auto" and (s.gpus_per_trial > 0 or bool(s.full_gpus))):
        return "cuda"  # auto picks CUDA where it exists; a run that asks for GPUs is taken to have them
    return "cpu"


def _teacher_held(c: _Ctx) -> tuple[int, int]:
    """(CPU RAM, GPU bytes) of the driver's teacher plus the runtime."""
    if c.driver_device == "cuda":
        return RUNTIME_BYTES + 2 * c.teacher_params, CUDA_CONTEXT_BYTES + 2 * c.teacher_params
    return RUNTIME_BYTES + 4 * c.teacher_params, 0


def _forward_stage(c: _Ctx, stage: str, tokens: int, disk: int, basis: str, extra_ram: int = 0,
                   micro_tokens: int | None = None, logit_tokens: int | None = None) -> StagePlan:
    ram, gpu = _teacher_held(c)
    peak = _forward_peak(micro_tokens or c.micro_tokens, c.vocab, c.teacher.hidden_size, logit_tokens)
    rate, measured = _rate(c.driver_device, "forward", c.teacher_params, DRIVER_THREADS)
    if c.driver_device == "cuda":
        gpu += peak
    else:
        ram += peak
    return StagePlan(stage, tokens, ram + extra_ram, gpu, disk, tokens / rate, not measured,
                     f"{basis}; teacher forward at {rate:,.0f} tok/s on the driver's {c.driver_device}")


# ---- the stages ---------------------------------------------------------------------------------------------------
def _importance(c: _Ctx) -> StagePlan:
    s, layers = c.s, c.teacher.num_hidden_layers
    seq_len = calibration_seq_len(s)
    calibration = s.calibration_samples * seq_len
    drops = sorted({layers - n for n in c.layer_counts} - {0})
    scores = 4 * layers * (c.teacher.hidden_size + c.teacher.intermediate_size + c.teacher.num_attention_heads)
    if s.importance is not None:  # linked from the directory pre-flight checked: no teacher, no tokens
        return StagePlan("importance", 0, RUNTIME_BYTES, 0, 0, 1.0, True,
                         f"reused from {s.importance} (linked, or copied across filesystems: ~{scores:,} B)")
    # importance.compute_importance: one forward per removed window (sizes `drops` and 1) over loss_sequences
    # sequences, each skipping k of L layers
    removal_tokens = sum((layers - k + 1) * s.loss_sequences * seq_len * (layers - k) / layers
                         for k in {*drops, 1}) if drops else 0.0
    tokens = calibration + int(removal_tokens)
    return _forward_stage(c, "importance", tokens, scores,
                          f"{s.calibration_samples} x {seq_len} = {calibration:,} calibration tokens + "
                          f"{int(removal_tokens):,} layer-removal tokens (windows {drops or 'none'})",
                          micro_tokens=s.batch_size * seq_len)


def _num_sequences(tokens: int, s: SearchSettings) -> int:
    return train_sequences(s, tokens)


def _token_bytes(c: _Ctx) -> int:
    """Bytes a token takes in a token stream (its dtype follows the vocabulary)."""
    return 2 if token_dtype(c.vocab) == "uint16" else 4


def _logit_cache(c: _Ctx) -> StagePlan:
    s = c.s
    n_short = _num_sequences(s.short_tokens, s)
    data = _token_bytes(c) * s.seq_len * (n_short + s.validation_sequences)  # train_short + validation streams
    if s.topk <= 0:
        return StagePlan("logit_cache", 0, RUNTIME_BYTES + 4 * c.teacher_params, 0, data, 5.0, True,
                         "token streams only (--topk 0: no cache)")
    cached = n_short + s.validation_sequences
    cache = cached * s.seq_len * (4 + s.topk * (2 + 4))
    tokens, batch = cached * s.seq_len, (s.cache_batch_size or s.batch_size) * s.seq_len
    basis = f"{cached} x {s.seq_len} tokens cached at top-{s.topk} ({cache:,} B) + token streams ({data:,} B)"
    held = 2 * 8 * s.seq_len * cached  # the driver: the sequences as int64, and their concatenation
    workers, on_gpus = cache_workers(s)
    if not workers:
        return _forward_stage(c, "logit_cache", tokens, data + cache, basis, extra_ram=held, micro_tokens=batch,
                              logit_tokens=LOGIT_CHUNK_TOKENS)
    peak = _forward_peak(batch, c.vocab, c.teacher.hidden_size, LOGIT_CHUNK_TOKENS)
    driver = RUNTIME_BYTES + held
    if on_gpus:  # each worker: the teacher read on the host in bf16, then moved to its GPU
        ram, gpu = driver + workers * (RUNTIME_BYTES + 2 * c.teacher_params), CUDA_CONTEXT_BYTES + 2 * c.teacher_params
        gpu += peak
        rate, measured = _rate("cuda", "forward", c.teacher_params, 1)
    else:
        ram, gpu = driver + workers * (RUNTIME_BYTES + 4 * c.teacher_params + peak), 0
        rate, measured = _rate("cpu", "forward", c.teacher_params, max(1, s.cpus_per_trial))
    where = f"{workers} GPU" if on_gpus else f"{workers} CPU"
    return StagePlan("logit_cache", tokens, ram, gpu, data + cache, tokens / (rate * workers) + 30.0, not measured,
                     f"{basis}; teacher forward at {rate:,.0f} tok/s on each of {where} Ray workers (+30 s to load)")


def trial_gpu_bytes(c: _Ctx, batch_size: int | None = None, checkpointing: bool | None = None) -> int:
    """One GPU trial's peak on its device: student state, activations (bf16), KD loss, teacher when --topk 0.
    `checkpointing` None: as the trials do (gradient checkpointing for students of >= 1B parameters, worker.py)."""
    s, st = c.s, c.student
    if checkpointing is None:
        checkpointing = st.params >= GRAD_CHECKPOINTING_PARAMS
    tokens = (batch_size or s.batch_size) * s.seq_len
    kind = "topk" if s.topk > 0 else "full"
    teacher = 0 if s.topk > 0 else 2 * c.teacher_params
    return (CUDA_CONTEXT_BYTES + 16 * st.params + teacher
            + _activations(st.num_hidden_layers, st.hidden_size, tokens, "bf16", checkpointing)
            + _kd_loss(tokens, c.vocab, kind))


def _trials_per_gpu(s: SearchSettings) -> int:
    return max(1, math.floor(1 / s.gpus_per_trial + 1e-9)) if 0 < s.gpus_per_trial < 1 else 1


def _trials(c: _Ctx) -> StagePlan:
    s, st = c.s, c.student
    on_gpu = s.gpus_per_trial > 0
    concurrent = min(s.max_concurrent, s.trials)
    kind = "topk" if s.topk > 0 else "full"
    trained = "train_topk" if s.topk > 0 else "train_live"
    train_params = st.params if s.topk > 0 else _live_params(st.params, c.teacher_params)
    device = "cuda" if on_gpu else "cpu"
    threads = max(1, s.cpus_per_trial)
    train_rate, m1 = _rate(device, trained, train_params, threads)
    fwd_rate, m2 = _rate(device, "forward", st.params + (0 if s.topk > 0 else c.teacher_params), threads)
    val_tokens = (s.evals_per_trial + 1) * s.validation_sequences * s.seq_len
    per_trial = TRIAL_SETUP_S[device] + s.short_tokens / train_rate + val_tokens / fwd_rate
    rounds = math.ceil(s.trials / concurrent)
    if on_gpu:
        ram_each = RUNTIME_BYTES + 4 * st.params  # the student cut on CPU before it moves (RESULTS "Student build")
        gpu = trial_gpu_bytes(c) * _trials_per_gpu(s)
    else:
        ram_each = (RUNTIME_BYTES + 16 * st.params + (0 if s.topk > 0 else 4 * c.teacher_params)
                    + _activations(st.num_hidden_layers, st.hidden_size, c.micro_tokens, "float32")
                    + _kd_loss(c.micro_tokens, c.vocab, kind))
        gpu = 0
    driver = RUNTIME_BYTES
    if s.strategy == "rungs":
        return _rung_trials(c, driver, ram_each, gpu, train_rate, fwd_rate, not (m1 and m2), device)
    # trained students are deleted once they can no longer win: with one objective at most winners + running
    # ones are kept; with several (a Pareto set) any number may be
    kept = min(s.trials, s.winners + concurrent) if len(s.objectives) == 1 else s.trials
    disk = concurrent * 12 * st.params + kept * 4 * st.params
    return StagePlan("trials", s.trials * (s.short_tokens + val_tokens), driver + concurrent * ram_each, gpu, disk,
                     rounds * per_trial, not (m1 and m2),
                     f"{s.trials} trials, {concurrent} at once ({rounds} rounds of ~{per_trial:,.0f} s: "
                     f"{s.short_tokens:,} tokens at {train_rate:,.0f} tok/s + {val_tokens:,} validation tokens); "
                     f"student {st.params:,} params on {device}")


def _rung_trials(c: _Ctx, driver: int, ram_each: int, gpu: int, train_rate: float, fwd_rate: float,
                 estimated: bool, device: str) -> StagePlan:
    """--strategy rungs: every screened candidate validated once, then ceil(n / eta) per rung trained on (the
    interval ties can at most double a rung: not counted); a checkpoint (12 B/param) in the run directory per
    candidate alive after rung 1."""
    from nas_minitron.pipeline.settings import search_rungs
    from nas_minitron.search.rungs import quota

    s, st = c.s, c.student
    rungs = search_rungs(s)
    alive = [min(s.screen or len(c.layer_counts) or 1, len(c.layer_counts) or 1)]
    for _ in rungs[1:]:
        alive.append(quota(alive[-1], s.eta, s.winners))
    val_tokens = s.validation_sequences * s.seq_len
    concurrent = max(1, s.max_concurrent)
    seconds = tokens = 0.0
    for k, n in enumerate(alive):
        new = rungs[k] - (rungs[k - 1] if k else 0)
        tokens += n * (new + val_tokens)
        seconds += math.ceil(n / concurrent) * (TRIAL_SETUP_S[device] + new / train_rate + val_tokens / fwd_rate)
    live = alive[1] if len(alive) > 1 else 0
    disk = live * 12 * st.params + s.winners * 4 * st.params
    ladder = ", ".join(f"{r:,}" for r in rungs)
    return StagePlan("trials", int(tokens), driver + min(concurrent, alive[0]) * ram_each, gpu, disk, seconds,
                     estimated, f"rungs {ladder} tokens over {' -> '.join(map(str, alive))} candidates (eta "
                     f"{s.eta}), {concurrent} at once; student {st.params:,} params on {device}")


def _winners(c: _Ctx) -> StagePlan:
    st = c.student
    return StagePlan("winners", 0, RUNTIME_BYTES + 4 * st.params, 0, 0, 1.0, True,
                     "winners hard-linked from their trials' weights (0 B; the trials stage counts those); one whose "
                     f"trial weights are missing is re-pruned from the teacher, {4 * st.params:,} B each")


def _full_gpu_bytes(c: _Ctx, workers: int, batch_size: int | None = None) -> int:
    s, st = c.s, c.student
    tokens = (batch_size or s.batch_size) * s.seq_len
    checkpointing = st.params >= GRAD_CHECKPOINTING_PARAMS
    return (CUDA_CONTEXT_BYTES + 16 * st.params // workers + 2 * c.teacher_params
            + _activations(st.num_hidden_layers, st.hidden_size, tokens, "bf16", checkpointing)
            + _kd_loss(tokens, c.vocab, "full"))


def _full_in_driver(s: SearchSettings) -> bool:
    """Whether the winners' full distillation runs in the driver process (= stages._full_placement)."""
    return s.full_gpus is None and full_distill_workers(s)[0] == 1


def _distill(c: _Ctx) -> StagePlan:
    s, st = c.s, c.student
    workers, on_gpus = full_distill_workers(s)
    in_driver = _full_in_driver(s)
    device = "cuda" if on_gpus or (in_driver and c.driver_device == "cuda") else "cpu"
    threads = DRIVER_THREADS if in_driver else max(1, s.cpus_per_trial)
    rate, m1 = _rate(device, "train_live", _live_params(st.params, c.teacher_params), threads)
    fwd, m2 = _rate(device, "forward", st.params + c.teacher_params, threads)
    rate, fwd = rate * (workers if not in_driver else 1), fwd * (workers if not in_driver else 1)
    val_tokens = (s.evals_per_trial + 1) * s.validation_sequences * s.seq_len
    seconds = s.winners * (s.full_tokens / rate + val_tokens / fwd)
    checkpointing = st.params >= GRAD_CHECKPOINTING_PARAMS
    if device == "cuda":
        gpu = _full_gpu_bytes(c, workers)
        ram = RUNTIME_BYTES + workers * RUNTIME_BYTES  # the token stream is memory-mapped, not held
    else:
        gpu = 0
        ram = workers * (RUNTIME_BYTES + 16 * st.params // workers + 4 * c.teacher_params
                         + _activations(st.num_hidden_layers, st.hidden_size, c.micro_tokens, "float32",
                                        checkpointing)
                         + _kd_loss(c.micro_tokens, c.vocab, "full"))
    full_stream = _token_bytes(c) * s.seq_len * _num_sequences(s.full_tokens, s)  # data/train_full, written here
    disk = 2 * 12 * st.params + s.winners * 4 * st.params + full_stream
    where = "in the driver" if in_driver else f"{workers} Ray Train worker(s)"
    return StagePlan("distill", s.winners * (s.full_tokens + val_tokens), ram, gpu, disk, seconds, not (m1 and m2),
                     f"{s.winners} winner(s) x {s.full_tokens:,} tokens, live teacher, {where} on {device} at "
                     f"{rate:,.0f} tok/s; + {val_tokens:,} validation tokens each")


def _dmc(c: _Ctx) -> StagePlan:
    """--dmc-cr: every winner retrofitted at every ratio in the driver, one after another, as a KD step of the
    student with a live teacher (no gradient checkpointing, `dmc.train.retrofit`) plus DMC attention's explicit
    scores (it does not use SDPA: ~2 fp32 [B, heads, T, T] per layer kept for backward, the teacher's head count,
    estimated); on disk each retrofitted model (4 B/param) and, while it trains, its last 2 checkpoints (12 B/param
    each, deleted when it is done)."""
    s, st = c.s, c.student
    ratios = dmc_ratios(s)
    if not ratios:  # the driver still holds the teacher it loaded for the distill stage, for the eval stage
        ram, gpu = _teacher_held(c)
        return StagePlan("dmc", 0, ram, gpu, 0, 0.0, False,
                         "--dmc-cr none: no retrofit (only its marker); the driver's teacher stays loaded for eval")
    runs = s.winners * len(ratios)
    tokens = runs * s.dmc_tokens
    val_tokens = s.validation_sequences * s.seq_len
    scores = st.num_hidden_layers * s.batch_size * c.teacher.num_attention_heads * s.seq_len ** 2 * 4 * 2
    rate, _ = _rate(c.driver_device, "train_live", _live_params(st.params, c.teacher_params), DRIVER_THREADS)
    fwd, _ = _rate(c.driver_device, "forward", st.params + c.teacher_params, DRIVER_THREADS)
    if c.driver_device == "cuda":
        ram, gpu = RUNTIME_BYTES + 4 * st.params, (CUDA_CONTEXT_BYTES + 16 * st.params + 2 * c.teacher_params
                                                   + _activations(st.num_hidden_layers, st.hidden_size,
                                                                  c.micro_tokens, "bf16")
                                                   + scores + _kd_loss(c.micro_tokens, c.vocab, "full"))
    else:
        ram = (RUNTIME_BYTES + 16 * st.params + 4 * c.teacher_params
               + _activations(st.num_hidden_layers, st.hidden_size, c.micro_tokens, "float32")
               + scores + _kd_loss(c.micro_tokens, c.vocab, "full"))
        gpu = 0
    ram += 8 * (s.dmc_tokens + val_tokens)  # its train rows and the validation stream, as int64
    disk = runs * 4 * st.params + 2 * 12 * st.params
    ratio_text = ", ".join(f"{r:g}" for r in ratios)
    return StagePlan("dmc", tokens, ram, gpu, disk, runs * (s.dmc_tokens / rate + val_tokens / fwd), True,
                     f"{s.winners} winner(s) x ratio(s) {ratio_text} x {s.dmc_tokens:,} retrofit tokens, live "
                     f"teacher, in the driver on {c.driver_device} at {rate:,.0f} tok/s (DMC attention's scores "
                     f"estimated); + {val_tokens:,} validation tokens each")


def _eval(c: _Ctx) -> StagePlan:
    s, st = c.s, c.student
    tasks = max(1, len([t for t in s.eval_tasks.split(",") if t.strip()]))
    items = s.eval_limit if s.eval_limit is not None else EVAL_ITEMS_UNLIMITED
    per_model = tasks * items * EVAL_TOKENS_PER_ITEM
    ram, gpu = _teacher_held(c)
    t_rate, _ = _rate(c.driver_device, "forward", c.teacher_params, DRIVER_THREADS)
    s_rate, _ = _rate(c.driver_device, "forward", st.params, DRIVER_THREADS)
    peak = _forward_peak(c.micro_tokens, c.vocab, c.teacher.hidden_size)
    if c.driver_device == "cuda":  # every winner is loaded (fp32) before the first is evaluated (stages.evaluate)
        ram += 4 * st.params  # each passes through CPU memory on its way to the GPU
        gpu += s.winners * 4 * st.params + peak
    else:
        ram += s.winners * 4 * st.params + peak
    variants = s.winners * len(dmc_ratios(s))  # the dmc stage's retrofits: lm-eval only, loaded one at a time
    if variants:  # on a GPU it also passes through CPU memory, as a winner does
        ram += 4 * st.params
        gpu += 4 * st.params if c.driver_device == "cuda" else 0
    seconds = (per_model / t_rate + (s.winners + variants) * per_model / s_rate
               + 5.0 * (1 + s.winners))  # + speed, ~5 s a model (not the DMC variants)
    dmc_text = f" + {variants} DMC variant(s) (no speed)" if variants else ""
    return StagePlan("eval", per_model * (1 + s.winners + variants), ram, gpu, 1 << 20, seconds, True,
                     f"teacher + {s.winners} winner(s){dmc_text}, {tasks} task(s) x {items} items x "
                     f"~{EVAL_TOKENS_PER_ITEM} tokens (assumed per item), + speed")


def _report(c: _Ctx) -> StagePlan:
    return StagePlan("report", 0, RUNTIME_BYTES, 0, 5 * 2**20, 1.0, True, "self-contained HTML page (~5 MB)")


_STAGE_PLANS = {"importance": _importance, "logit_cache": _logit_cache, "trials": _trials, "winners": _winners,
                "distill": _distill, "dmc": _dmc, "eval": _eval, "report": _report}


# ---- the plan and what cannot fit ----------------------------------------------------------------------------
def make_plan(settings: SearchSettings, resolved: Mapping[str, Any], students: Sequence[StudentShape] = (),
              gpu_memory_gib: float = DEFAULT_GPU_MEMORY_GIB, free_disk_bytes: int | None = None,
              total_ram_bytes: int | None = None, to_run: Sequence[str] = STAGES) -> Plan:
    """The plan of every stage in `to_run`, with the problems that make it not fit.

    `students`: the candidates' shapes (the largest sizes memory and speed); none given: a student of
    `budget_params` with the teacher's depth and width (conservative). `free_disk_bytes` / `total_ram_bytes`: the
    run directory's free space / this machine's RAM, checked when given (RAM only against the driver's stages)."""
    teacher = ArchConfig.parse(str(resolved["teacher_arch"]), int(resolved["head_dim"]))
    largest = max(students, key=lambda x: x.params) if students else StudentShape(
        int(resolved["budget_params"]), teacher.num_hidden_layers, teacher.hidden_size)
    deepest = max(students, key=lambda x: x.num_hidden_layers * x.hidden_size) if students else largest
    student = StudentShape(largest.params, deepest.num_hidden_layers, deepest.hidden_size)  # memory: the largest
    c = _Ctx(settings, teacher, int(resolved["teacher_params"]), int(resolved["vocab_size"]), student,
             tuple(x.num_hidden_layers for x in students), _driver_device(settings))
    plans = tuple(StagePlan("candidates", 0, RUNTIME_BYTES, 0, 64 * max(1, len(students)), 1.0, True,
                            f"{len(students)} candidates from the config alone") if stage == "candidates"
                  else _STAGE_PLANS[stage](c) for stage in to_run)
    if settings.ray_address is None:  # the local cluster is up through every stage (measured so: RESULTS.md)
        plans = tuple(dataclasses.replace(p, cpu_ram_bytes=p.cpu_ram_bytes + RAY_BYTES) for p in plans)
    capacity = int(gpu_memory_gib * GIB)
    problems = _gpu_problems(c, plans, capacity)
    disk = sum(p.disk_bytes for p in plans)
    if free_disk_bytes is not None and disk > free_disk_bytes:
        problems.append(f"the run writes ~{_gib(disk)} but its directory's filesystem has {_gib(free_disk_bytes)} "
                        f"free; free space, choose another --run-dir, or lower "
                        f"{'--max-candidates / --screen' if c.s.strategy == 'rungs' else '--trials'} / --full-tokens")
    if total_ram_bytes is not None:  # only the driver's own stages: trials and Ray Train run on the cluster's nodes
        driver = ("importance", "logit_cache", "dmc", "eval") + (("distill",) if _full_in_driver(settings) else ())
        problems.extend(f"stage {p.stage} needs ~{_gib(p.cpu_ram_bytes)} of RAM but this machine has "
                        f"{_gib(total_ram_bytes)}; lower --batch-size or run it on a larger machine"
                        for p in plans if p.stage in driver and p.cpu_ram_bytes > total_ram_bytes)
    return Plan(plans, capacity, tuple(problems), tuple(_scale_warnings(settings, c.teacher_params)))


def _scale_warnings(s: SearchSettings, teacher_params: int) -> list[str]:
    """One line when a teacher of >= 1B parameters runs with the CPU-sized defaults of calibration and
    distillation (a run that works, but whose importance and distillation are far below the papers' scale)."""
    defaults = SearchSettings()
    small = [(flag, value) for flag, value, default in (
        ("--calibration-samples", s.calibration_samples, defaults.calibration_samples),
        ("--calib-seq-len", calibration_seq_len(s), calibration_seq_len(defaults)),
        ("--short-tokens", s.short_tokens, defaults.short_tokens),
        ("--full-tokens", s.full_tokens, defaults.full_tokens),
    ) if value == default]
    if teacher_params < LARGE_TEACHER_PARAMS or not small:
        return []
    named = ", ".join(f"{flag} {value:,}" for flag, value in small)
    return [f"a teacher of {teacher_params / 1e9:.1f}B parameters with CPU-sized defaults ({named}): the papers "
            f"calibrate on 1024 samples x 4096 tokens and distill on billions of tokens; raise them for a real run "
            f"(flags or --config)"]


def _gpu_problems(c: _Ctx, plans: Sequence[StagePlan], capacity: int) -> list[str]:
    s, problems = c.s, []
    by_stage = {p.stage: p for p in plans}
    trial = by_stage.get("trials")
    if trial is not None and trial.gpu_bytes_per_device > capacity:
        fix = _fits_with(lambda b, ckpt: trial_gpu_bytes(c, b, ckpt) * _trials_per_gpu(s), capacity, s.batch_size)
        if _trials_per_gpu(s) > 1 and trial_gpu_bytes(c) <= capacity:
            fix = "--gpus-per-trial 1 (one trial per GPU) would fit"
        share = f" ({_trials_per_gpu(s)} trials share each GPU at --gpus-per-trial {s.gpus_per_trial:g})" \
            if _trials_per_gpu(s) > 1 else ""
        problems.append(f"a trial needs ~{_gib(trial.gpu_bytes_per_device)} per GPU{share} but one GPU holds "
                        f"{_gib(capacity)} (--gpu-memory-gib); {fix}")
    full = by_stage.get("distill")
    if full is not None and full.gpu_bytes_per_device > capacity:
        workers, _ = full_distill_workers(s)
        more = next((n for n in (2, 4, 8, 16, 32, 64) if n > workers and _full_gpu_bytes(c, n) <= capacity), None)
        fix = f"--full-gpus {more} (FSDP2) would fit" if more else "no --full-gpus up to 64 fits"
        smaller = next((b for b in range(s.batch_size - 1, 0, -1) if _full_gpu_bytes(c, workers, b) <= capacity), None)
        if smaller:
            fix += f", or --batch-size {smaller}"
        problems.append(f"the full distillation needs ~{_gib(full.gpu_bytes_per_device)} per GPU on {workers} "
                        f"GPU(s) but one GPU holds {_gib(capacity)}; {fix}")
    for stage in ("importance", "logit_cache", "dmc", "eval"):
        p = by_stage.get(stage)
        if p is not None and p.gpu_bytes_per_device > capacity:
            problems.append(f"stage {stage} needs ~{_gib(p.gpu_bytes_per_device)} on the driver's GPU but one GPU "
                            f"holds {_gib(capacity)}; lower --batch-size or use --device cpu")
    return problems


def _fits_with(need: Any, capacity: int, batch_size: int) -> str:
    """What would make a trial fit: a smaller batch, gradient checkpointing, or neither (a larger GPU)."""
    smaller = next((b for b in range(batch_size - 1, 0, -1) if need(b, None) <= capacity), None)
    if smaller:
        return f"--batch-size {smaller} would fit"
    if need(batch_size, True) <= capacity:  # only reached by students < 1B (larger ones always checkpoint)
        return (f"gradient checkpointing would fit (trials use it for students of >= "
                f"{GRAD_CHECKPOINTING_PARAMS / 1e9:g}B parameters only)")
    return "no smaller --batch-size fits, nor gradient checkpointing: a smaller --budget or GPUs with more memory"


def _gib(n: int) -> str:
    return f"{n / GIB:,.2f} GiB" if n < 1000 * GIB else f"{n / 2**40:,.2f} TiB"


def describe_plan(plan: Plan) -> list[str]:
    """A short table of the plan, one line a stage, for the console."""
    lines = [f"{'stage':<12} {'tokens':>12} {'CPU RAM':>11} {'GPU/device':>11} {'disk':>11} {'time':>9}"]
    for p in (*plan.stages, None):
        row = p.to_dict() if p is not None else {"stage": "total", **plan.totals()}
        mark = "~" if p is not None and p.estimated else " "
        lines.append(f"{row['stage']:<12} {row['tokens']:>12,} {_gib(row['cpu_ram_bytes']):>11} "
                     f"{_gib(row['gpu_bytes_per_device']):>11} {_gib(row['disk_bytes']):>11} "
                     f"{_duration(row['seconds']):>8}{mark}")
    lines.append("(~: estimated, not from a measured rate; GPU sizes assume "
                 f"{plan.gpu_memory_bytes / GIB:g} GiB per GPU)")
    lines.extend(f"does not fit: {problem}" for problem in plan.problems)
    lines.extend(f"warning: {warning}" for warning in plan.warnings)
    return lines


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"
