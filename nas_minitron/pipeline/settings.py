"""`SearchSettings`: the resolved configuration of one `nas-minitron search` run.

Defaults are CPU-sized for the embedded default (SmolLM2-135M + builtin data, ~15 minutes on 2 cores): far fewer
calibration samples and distillation tokens than the papers use (1024 samples, billions of tokens); raise them on
a GPU cluster. A YAML file
(`--config run.yaml`) overrides the defaults and command-line flags override the YAML. The resolved settings are
saved as `config.json` in the run directory; `--resume` refuses a directory made with different settings, except
for the runtime keys (where and how fast it runs, not what it computes).
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from nas_minitron.dmc.settings import check_target_cr
from nas_minitron.errors import UserError
from nas_minitron.search.protocol import SAMPLERS
from nas_minitron.search.winners import OBJECTIVES

__all__ = ["LATE_KEYS", "NONE_WORDS", "PINNED_KEYS", "PRESETS_DIR", "RUNTIME_KEYS", "SearchSettings", "cache_workers",
           "calibration_seq_len", "differences", "dmc_ratios", "full_distill_workers", "optional_setting",
           "resolve_settings", "run_preset", "run_preset_names", "train_sequences"]


@dataclass(frozen=True)
class SearchSettings:
    teacher: str = "smollm2-135m"
    """teacher: local HF directory, .gguf file, hub id, or the embedded default"""
    teacher_revision: str | None = None
    """branch, tag or commit of a hub teacher (default: main); config.json's teacher_pin records the commit it
    resolved to (or the files' fingerprint of a local teacher), and --resume refuses a teacher whose pin changed"""
    budget: str = "0.5x"
    """parameter budget: 4B, 4.5e9, 500M, 90M, or a fraction of the teacher like 0.5x"""
    data: str = "builtin"
    """text for calibration, distillation and validation (see `nas-minitron importance --help`)"""
    space: str | None = None
    """search-space YAML file or shipped name (nas_minitron/space/files/); default: smollm2-135m-cpu for the
    embedded teacher, else
    derived from the teacher"""
    tolerance: float | None = None
    """relative distance to the budget a candidate may have (default: the space's)"""
    max_candidates: int | None = None
    """keep at most this many candidates, closest to the budget first"""
    strategy: str = "rungs"
    """rungs: screen every candidate untrained, then successive halving over --rungs (the best 1/--eta of each
    rung continue from their checkpoint); sample: --trials short distillations that Optuna's sampler proposes"""
    rungs: str | None = None
    """token budgets of the rungs, e.g. 0,1k,4k (rounded to whole steps; 0 = untrained screening; the top one at
    most --short-tokens); none: 0, then budgets growing by --eta up to --short-tokens"""
    eta: int = 4
    """successive halving keeps the best ceil(n / eta) of each rung (more when the validation sequences cannot
    separate them from the cut, up to twice that); 4 as Ray Tune's ASHA"""
    screen: int | None = None
    """candidates screened at rung 0, chosen by the Optuna sampler on the rung-0 objectives when fewer than all
    (the enqueued baselines always); none: every candidate"""
    stop_when_stable: bool = False
    """end the rungs early once two rung-to-rung comparisons kept the same best with Kendall tau >= 0.8"""
    trials: int = 4
    """search trials (short distillations) of --strategy sample"""
    short_tokens: int = 4096
    """distillation tokens per trial (--strategy rungs: the top rung's budget, over which the schedule runs)"""
    winners: int = 1
    """candidates fully distilled and evaluated"""
    full_tokens: int = 8192
    """distillation tokens per winner"""
    objectives: tuple[str, ...] = ("val_kl",)
    """minimized trial objectives: val_kl, val_loss, params, kv_bytes_per_token, flops_per_token"""
    seq_len: int = 256
    """tokens per sequence"""
    batch_size: int = 4
    """sequences per step"""
    lr: float = 1e-4
    """peak learning rate of short and full distillation"""
    calibration_samples: int = 32
    """calibration sequences for importance (the papers use 1024)"""
    calib_seq_len: int | None = None
    """tokens per calibration sequence of the importance stage (the papers use 4096; `nas-minitron importance
    --seq-len`); none: --seq-len"""
    importance: str | None = None
    """reuse this importance directory (`nas-minitron importance --out`, or another run's importance/) instead of
    computing it: refused unless it was made for this teacher and calibration data (--data, --calibration-samples,
    --calib-seq-len, --seed) and holds the layer-removal windows the candidates' depths need"""
    loss_sequences: int = 2
    """sequences on which layer-removal LM losses are measured"""
    validation_sequences: int = 16
    """held-out sequences for validation metrics"""
    evals_per_trial: int = 2
    """validation points after step 0 of each distillation, short and full (fewer if it has fewer steps)"""
    topk: int = 64
    """teacher-logit cache keeps the top-k log-probs per token (0: trials run the teacher instead)"""
    cache_gpus: int | None = None
    """GPUs for the teacher-logit cache: N >= 1 spreads its shards over N Ray workers of one GPU each (the teacher
    in bf16); 0: over --cache-workers CPU workers; none: in the driver process on --device (or on CPU workers when
    --cache-workers > 1)"""
    cache_workers: int = 1
    """CPU Ray workers (each --cpus-per-trial threads and its own teacher) for the logit cache when --cache-gpus is
    0 or none; 1 with --cache-gpus none: in the driver process"""
    cache_batch_size: int | None = None
    """sequences per teacher forward while building the logit cache (the output head runs 1024 positions at a time,
    so this is bounded by the decoder's activations, not the logits); none: --batch-size"""
    eval_tasks: str = "pydoc_next_sentence"
    """lm-eval tasks for the winners and the teacher (comma-separated, or 'minitron' when online)"""
    eval_limit: int | None = 40
    """items per eval task (none: all items)"""
    sampler: str = "auto"
    """auto (TPE, NSGA-II for several objectives), tpe, nsga2, random: proposes the trials of --strategy sample and
    the candidates --screen chooses"""
    asha: bool = False
    """--strategy sample: stop clearly worse trials early (ASHA on validation KL)"""
    seed: int = 0
    """seed of data order, sampler and training"""
    cpus_per_trial: int = 1
    """CPUs per Ray trial (also torch threads)"""
    tokenize_procs: int | None = None
    """processes that tokenize the token streams (data/); none: the driver, batched (a fast tokenizer's Rust code
    uses every CPU; faster than a pool on 2 CPUs, benchmarks/bench_tokenize.py)"""
    gpus_per_trial: float = 0.0
    """GPUs per Ray trial"""
    max_concurrent: int = 2
    """trials at once"""
    ray_address: str | None = None
    """join this Ray cluster ('auto' or host:port); default: start a local one on 127.0.0.1"""
    storage: str | None = None
    """Optuna storage URL; default: SQLite in the run directory"""
    cache_dir: str | None = None
    """where converted GGUF teachers are cached"""
    device: str = "auto"
    """device of the driver's stages (importance, full distillation, eval): auto, cpu, cuda"""
    scratch_dir: str | None = None
    """where each trial writes its checkpoint on its node (at most one per trial, deleted when it ends); default:
    the system temp dir"""
    full_gpus: int | None = None
    """GPUs for each winner's full distillation: N >= 1 runs it as a Ray Train job of N workers (FSDP2 across them
    when N > 1, NCCL, bf16 compute over fp32 weights); 0: a Ray Train job on --full-workers CPU workers; none: in the
    driver process on --device (or on CPU workers when --full-workers > 1)"""
    full_workers: int = 1
    """CPU workers (gloo, FSDP2 when > 1) for each winner's full distillation when --full-gpus is 0 or none; 1 with
    --full-gpus none: in the driver process"""
    global_batch_tokens: int | None = None
    """tokens one optimizer step of the full distillation sees over all its workers (gradient accumulation); a
    multiple of seq_len x batch_size x workers; none: one micro-batch per worker"""
    checkpoint_minutes: float | None = None
    """also checkpoint the full distillation every this many minutes of wall time (the last 2 are kept); none: only
    at its validation points"""
    gpu_memory_gib: float = 80.0
    """memory of one GPU (GiB) that the resource plan (pipeline/plan.py) checks trials and full distillation against"""
    host_memory_gib: float | None = None
    """CPU RAM (GiB) of the machine the driver's stages run on, that the resource plan checks them against (to plan
    a run for another machine with --dry-run); none: this machine's"""
    dmc_cr: str | None = None
    """after the full distillation, retrofit every winner with Dynamic Memory Compression at each of these target
    KV-cache compression ratios (comma-separated, each >= 1, e.g. 2,4): dmc/<winner>-cr<ratio>/ and dmc.csv
    (achieved ratio, validation loss and KL to the teacher); none: no dmc stage work"""
    dmc_tokens: int = 4096
    """retrofit tokens per winner and ratio (KD from the teacher on the winners' train stream); the default is
    CPU-sized (4 steps of the default 4 x 256 batch, ~1.5 min per retrofit of the embedded default's winner on 2
    cores by the plan's estimate), far below the paper's retrofits of billions of tokens: enough to run the stage,
    not to judge DMC's quality"""
    dmc_decision_lr_scale: float = 1.0
    """multiplier of the retrofit's learning rate on the decision channels' rows (q[-1], k[-1] of each head: past
    the fade-out they feed only DMC's decisions); 1: the paper's single rate, for retrofits of billions of tokens.
    On SmolLM2, 4,096 tokens reach CR 2 only at ~300x, and break the model there (benchmarks/RESULTS.md)"""
    verify: bool = False
    """check the sha256 of every artifact the run wrote as it is read again (token files, logit cache, trial weights,
    winners; a full read of each); without it only their sizes are checked (importance scores and checkpoints are
    always checked in full)"""

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["objectives"] = list(self.objectives)
        return data


# Keys that may change on --resume: they decide where and how fast the run goes, not what it computes.
# Not among them: gpus_per_trial and device (they set the trials' / winners' dtype, which their checkpoints must
# match), full_gpus / full_workers (the world size sets a winner's steps, schedule and data shards) and storage (the
# study there is the search's memory: another storage would hold none of it).
RUNTIME_KEYS = frozenset({"ray_address", "max_concurrent", "cpus_per_trial", "cache_dir", "scratch_dir",
                          "checkpoint_minutes", "gpu_memory_gib", "host_memory_gib", "verify", "tokenize_procs",
                          "cache_gpus", "cache_workers", "cache_batch_size"})
# Keys a resume compares through what they resolve to, config.json's `teacher_pin` (runner._check_pin): a branch
# given as its commit, or the other way round, is the same teacher.
PINNED_KEYS = frozenset({"teacher_revision"})
# Keys that may change on --resume until the stage that first uses them has finished (nothing before it reads them).
LATE_KEYS = {"eval_tasks": "eval", "eval_limit": "eval", "dmc_cr": "dmc", "dmc_tokens": "dmc",
             "dmc_decision_lr_scale": "dmc"}
_FIELDS = {f.name: f for f in dataclasses.fields(SearchSettings)}
NONE_WORDS = ("none", "null")  # `--eval-limit none` (YAML's null) unsets an optional setting


def optional_setting(name: str) -> bool:
    """Whether the setting admits None (its annotation says `| None`)."""
    return "None" in str(_FIELDS[name].type)


def _coerce(name: str, value: Any, source: str) -> Any:
    if name == "dmc_cr" and isinstance(value, (list, tuple, int, float)) and not isinstance(value, bool):
        return ",".join(str(v) for v in value) if isinstance(value, (list, tuple)) else str(value)  # YAML: 2 or [2, 4]
    if name == "objectives":
        items = value.split(",") if isinstance(value, str) else list(value)
        return tuple(str(v).strip() for v in items if str(v).strip())
    if isinstance(value, str) and value.strip().lower() in NONE_WORDS and optional_setting(name):
        return None
    default = _FIELDS[name].default
    expected = type(default) if default is not None else None
    if value is None or expected is None:
        return value
    try:
        if expected is bool:
            if isinstance(value, str):
                return value.lower() in ("1", "true", "yes")
            return bool(value)
        return expected(value)  # type: ignore[misc]  # mypy reads a dataclass default's type as MISSING
    except (TypeError, ValueError):
        raise UserError(f"{source}: {name} must be a {expected.__name__}, but got {value!r}.") from None


PRESETS_DIR = Path(__file__).parent / "presets"  # shipped run configs, by name (`--config llama-3.1-8b-8gpu`)


def run_preset_names() -> list[str]:
    return sorted(p.stem for p in PRESETS_DIR.glob("*.yaml"))


def run_preset(config: Path) -> Path:
    """`config` itself when it is a file; else the shipped run preset of that name; UserError naming both."""
    if config.is_file():
        return config
    shipped = PRESETS_DIR / f"{config.name}.yaml"
    if config.parent == Path(".") and shipped.is_file():
        return shipped
    raise UserError(f"--config {str(config)!r}: no such file, and not a shipped run preset; presets: "
                    f"{', '.join(run_preset_names())} (or a YAML file of settings).")


def resolve_settings(yaml_path: Path | None, overrides: Mapping[str, Any]) -> SearchSettings:
    """Defaults, then the YAML file, then the non-None command-line overrides."""
    values: dict[str, Any] = {}
    if yaml_path is not None:
        yaml_path = run_preset(yaml_path)
        try:
            loaded = yaml.safe_load(Path(yaml_path).read_text()) or {}
        except (OSError, yaml.YAMLError) as err:
            raise UserError(f"cannot read --config {str(yaml_path)!r}: {err}") from None
        if not isinstance(loaded, dict):
            raise UserError(f"--config {str(yaml_path)!r} must hold a mapping of settings.")
        unknown = sorted(set(loaded) - set(_FIELDS))
        if unknown:
            raise UserError(f"--config {str(yaml_path)!r}: unknown settings {unknown}; valid: {sorted(_FIELDS)}.")
        values.update({k: _coerce(k, v, str(yaml_path)) for k, v in loaded.items()})
    values.update({k: _coerce(k, v, "command line") for k, v in overrides.items() if v is not None})
    settings = SearchSettings(**values)
    _validate(settings)
    return settings


def _validate(s: SearchSettings) -> None:
    """Every numeric and named setting in one place, with its valid range; all problems reported at once."""
    positive = ("trials", "short_tokens", "winners", "full_tokens", "seq_len", "batch_size", "calibration_samples",
                "validation_sequences", "evals_per_trial", "cpus_per_trial", "max_concurrent", "loss_sequences")
    problems = [f"{k} must be >= 1, but got {getattr(s, k)!r}" for k in positive if getattr(s, k) < 1]
    for key in ("max_candidates", "eval_limit", "tokenize_procs"):
        value = getattr(s, key)
        if value is not None and value < 1:
            problems.append(f"{key} must be >= 1 or none, but got {value!r}")
    if s.calib_seq_len is not None and s.calib_seq_len < 2:
        problems.append(f"calib_seq_len must be >= 2 (a calibration sequence predicts its next tokens) or none, but "
                        f"got {s.calib_seq_len!r}")
    elif s.calib_seq_len is None and s.importance is None and s.seq_len == 1:
        problems.append("calib_seq_len (none: seq_len 1) must be >= 2 for the importance stage; pass "
                        "--calib-seq-len 2 or more")
    if s.importance is not None and not s.importance.strip():
        problems.append("importance must name an importance directory or be none, but got ''")
    if not (math.isfinite(s.gpus_per_trial) and s.gpus_per_trial >= 0):
        problems.append(f"gpus_per_trial must be a number >= 0 (a fraction shares a GPU), but got {s.gpus_per_trial!r}")
    elif s.gpus_per_trial > 1:  # a trial trains on one device: more would be reserved and sit idle
        problems.append(f"gpus_per_trial must be in [0, 1] (a trial trains on one GPU; a fraction shares one; "
                        f"--full-gpus spreads the winners over several), but got {s.gpus_per_trial!r}")
    if s.host_memory_gib is not None and not (math.isfinite(s.host_memory_gib) and s.host_memory_gib > 0):
        problems.append(f"host_memory_gib must be a number > 0 or none, but got {s.host_memory_gib!r}")
    if not (math.isfinite(s.gpu_memory_gib) and s.gpu_memory_gib > 0):
        problems.append(f"gpu_memory_gib must be a number > 0, but got {s.gpu_memory_gib!r}")
    if not (math.isfinite(s.lr) and 0 < s.lr <= 1):
        problems.append(f"lr must be in (0, 1], but got {s.lr!r}")
    if s.tolerance is not None and not (math.isfinite(s.tolerance) and 0 < s.tolerance < 1):
        problems.append(f"tolerance must be in (0, 1) (a fraction of the budget), but got {s.tolerance!r}")
    for key in ("topk", "seed"):
        if getattr(s, key) < 0:
            problems.append(f"{key} must be >= 0, but got {getattr(s, key)!r}")
    unknown = [o for o in s.objectives if o not in OBJECTIVES]
    if unknown or not s.objectives:
        problems.append(f"objectives must be among {', '.join(OBJECTIVES)}, but got {list(s.objectives)!r}")
    if s.sampler not in SAMPLERS:
        problems.append(f"sampler must be one of {', '.join(SAMPLERS)}, but got {s.sampler!r}")
    if s.asha and len(s.objectives) > 1:
        problems.append(f"asha stops trials on one objective, but got {len(s.objectives)} objectives "
                        f"{list(s.objectives)!r}; drop --asha or give one objective")
    problems.extend(_strategy_problems(s))
    if s.device not in ("auto", "cpu", "cuda"):
        problems.append(f"device must be auto, cpu or cuda, but got {s.device!r}")
    problems.extend(_cache_problems(s))
    problems.extend(_full_distill_problems(s))
    problems.extend(_dmc_problems(s))
    if problems:
        raise UserError("; ".join(problems) + ".")


STRATEGIES = ("rungs", "sample")


def search_rungs(s: SearchSettings) -> tuple[int, ...]:
    """The rung ladder of --strategy rungs in tokens (UserError on a bad --rungs)."""
    from nas_minitron.search.rungs import default_rungs, parse_rungs

    per_step = s.seq_len * s.batch_size
    if s.rungs is None:
        return default_rungs(s.short_tokens, max(2, s.eta), per_step)
    return parse_rungs(s.rungs, s.short_tokens, per_step)


def _strategy_problems(s: SearchSettings) -> list[str]:
    if s.strategy not in STRATEGIES:
        return [f"strategy must be one of {', '.join(STRATEGIES)}, but got {s.strategy!r}"]
    if s.strategy == "sample":
        return [f"winners ({s.winners}) cannot exceed trials ({s.trials})"] if s.winners > s.trials else []
    problems = []
    if s.eta < 2:
        problems.append(f"eta must be >= 2 (each rung keeps 1/eta of its candidates), but got {s.eta!r}")
    if s.screen is not None and s.screen < max(1, s.winners):
        problems.append(f"screen ({s.screen}) must be at least winners ({s.winners})")
    if s.asha:
        problems.append("asha belongs to --strategy sample (the rungs already stop the worse candidates); drop "
                        "--asha or pass --strategy sample")
    if s.seq_len >= 1 and s.batch_size >= 1 and s.short_tokens >= 1:
        try:
            search_rungs(s)
        except UserError as err:
            problems.append(str(err).rstrip("."))
    return problems


def dmc_ratios(s: SearchSettings) -> tuple[float, ...]:
    """The target compression ratios of --dmc-cr, in the order given (empty for none); UserError on a bad one."""
    if s.dmc_cr is None:
        return ()
    ratios: list[float] = []
    for item in s.dmc_cr.split(","):
        try:
            ratio = check_target_cr(float(item))
        except ValueError:
            raise UserError(f"dmc_cr {s.dmc_cr!r}: {item.strip()!r} is not a number; give target compression "
                            f"ratios >= 1, comma-separated (e.g. 2,4).") from None
        except UserError as err:
            raise UserError(f"dmc_cr {s.dmc_cr!r}: {err}") from None
        if f"{ratio:g}" in {f"{r:g}" for r in ratios}:  # one folder name (dmc/<winner>-cr<ratio:g>) each
            raise UserError(f"dmc_cr {s.dmc_cr!r} lists the ratio {ratio:g} twice.")
        ratios.append(ratio)
    return tuple(ratios)


def _dmc_problems(s: SearchSettings) -> list[str]:
    problems = []
    try:
        ratios = dmc_ratios(s)
    except UserError as err:
        problems.append(str(err).rstrip("."))
        ratios = ()
    if not s.dmc_decision_lr_scale > 0:
        problems.append(f"dmc_decision_lr_scale must be > 0, but got {s.dmc_decision_lr_scale!r}")
    if s.dmc_tokens < 1:
        problems.append(f"dmc_tokens must be >= 1, but got {s.dmc_tokens!r}")
    elif ratios and s.seq_len >= 1 and s.batch_size >= 1 and s.dmc_tokens < s.seq_len * s.batch_size:
        problems.append(f"dmc_tokens ({s.dmc_tokens}) is less than one retrofit step of seq_len x batch_size = "
                        f"{s.seq_len * s.batch_size} tokens")
    return problems


def calibration_seq_len(s: SearchSettings) -> int:
    """Tokens per calibration sequence of the importance stage: --calib-seq-len, else --seq-len."""
    return s.calib_seq_len if s.calib_seq_len is not None else s.seq_len


def train_sequences(s: SearchSettings, num_tokens: int) -> int:
    """Train sequences of a distillation stream of `num_tokens` tokens (at least one batch)."""
    return max(s.batch_size, math.ceil(num_tokens / s.seq_len))


def cache_workers(s: SearchSettings) -> tuple[int, bool]:
    """(Ray workers, on GPUs) of the logit-cache pass; (0, False): in the driver process."""
    if s.cache_gpus:
        return s.cache_gpus, True
    if s.cache_gpus == 0 or s.cache_workers > 1:
        return s.cache_workers, False
    return 0, False


def full_distill_workers(s: SearchSettings) -> tuple[int, bool]:
    """(workers, on GPUs) of each winner's full distillation: --full-gpus GPUs, else --full-workers CPU workers."""
    if s.full_gpus:
        return s.full_gpus, True
    return s.full_workers, False


def _pool_problems(pool: str, gpus: int | None, workers: int) -> list[str]:
    """The `{pool}_gpus` / `{pool}_workers` pair of a Ray worker pool (full distillation, logit cache): GPUs >= 0
    or none, CPU workers >= 1, and not both counts at once."""
    problems = []
    if gpus is not None and gpus < 0:
        problems.append(f"{pool}_gpus must be >= 0 or none, but got {gpus!r}")
    if workers < 1:
        problems.append(f"{pool}_workers must be >= 1, but got {workers!r}")
    elif gpus and workers > 1:
        problems.append(f"{pool}_workers ({workers}) counts CPU workers; with {pool}_gpus {gpus} the workers are "
                        f"the GPUs: drop --{pool}-workers or pass --{pool}-gpus 0")
    return problems


def _cache_problems(s: SearchSettings) -> list[str]:
    """The logit cache's worker pool and batch."""
    problems = _pool_problems("cache", s.cache_gpus, s.cache_workers)
    if s.cache_batch_size is not None and s.cache_batch_size < 1:
        problems.append(f"cache_batch_size must be >= 1 or none, but got {s.cache_batch_size!r}")
    return problems


def _full_distill_problems(s: SearchSettings) -> list[str]:
    """The full distillation's settings: worker counts, the global batch, the checkpoint period."""
    problems = _pool_problems("full", s.full_gpus, s.full_workers)
    if s.checkpoint_minutes is not None and not (math.isfinite(s.checkpoint_minutes) and s.checkpoint_minutes > 0):
        problems.append(f"checkpoint_minutes must be > 0 or none, but got {s.checkpoint_minutes!r}")
    if s.global_batch_tokens is not None and not problems and s.seq_len >= 1 and s.batch_size >= 1:
        workers, _ = full_distill_workers(s)
        micro = s.seq_len * s.batch_size * workers
        if s.global_batch_tokens < micro or s.global_batch_tokens % micro:
            problems.append(f"global_batch_tokens must be a positive multiple of seq_len x batch_size x workers = "
                            f"{s.seq_len} x {s.batch_size} x {workers} = {micro}, but got {s.global_batch_tokens!r}")
        elif s.global_batch_tokens > s.full_tokens:
            problems.append(f"global_batch_tokens ({s.global_batch_tokens}) exceeds full_tokens ({s.full_tokens}): "
                            f"the full distillation would not take one step")
    return problems


def differences(saved: Mapping[str, Any], current: SearchSettings, finished: Collection[str] = ()) -> list[str]:
    """Settings whose value differs from a saved config.json and that a resume may not change: not runtime keys,
    not derived keys, and not a `LATE_KEYS` setting whose stage is not in `finished` yet."""
    now = json.loads(json.dumps(current.to_dict()))
    late = {key for key, stage in LATE_KEYS.items() if stage not in finished}
    keys = sorted(set(now) - RUNTIME_KEYS - PINNED_KEYS - late)
    defaults = json.loads(json.dumps(SearchSettings().to_dict()))

    def old(key: str) -> Any:  # a setting added after the run directory was made: what that run did
        return saved[key] if key in saved else _BEFORE_IT_EXISTED.get(key, defaults.get(key))

    return [f"{k}: {old(k)!r} -> {now.get(k)!r}" for k in keys if old(k) != now.get(k)]


# Settings added after run directories existed, with what a config.json without them did: the earlier search
# (resume it with --strategy sample), calibration at --seq-len, importance computed in the run.
_BEFORE_IT_EXISTED: dict[str, Any] = {"strategy": "sample", "calib_seq_len": None, "importance": None}
