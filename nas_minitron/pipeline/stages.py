"""The stages of `nas-minitron search`, each a function of the live `Run` that writes its own outputs.

runner.py runs them in `run_dir.STAGES` order and handles resume; each stage reads what earlier stages wrote
through `Run` / run_dir.py, and returns the extra facts its stage marker records.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nas_minitron._lazy import lazy_import
from nas_minitron.arch import ArchConfig
from nas_minitron.artifacts import reading
from nas_minitron.atomic import atomic_directory
from nas_minitron.distill.config import GRAD_CHECKPOINTING_PARAMS, DistillConfig, DistillResult, EvalPoint
from nas_minitron.distill.logit_cache import build_logit_cache
from nas_minitron.distill.ray_cache import build_logit_cache_ray
from nas_minitron.distill.ray_train import check_cluster, distill_ray, fault_after_checkpoint
from nas_minitron.distill.result import RECORD_FILE, save_distilled
from nas_minitron.distill.trainer import distill
from nas_minitron.errors import UserError
from nas_minitron.evaluate.harness import evaluate_model, save_eval
from nas_minitron.evaluate.speed import measure_speed
from nas_minitron.integrity import CHECKSUMS, verify_checksums, write_checksums
from nas_minitron.pipeline.run_dir import (
    CURVE_COLUMNS,
    DMC_CSV,
    TRIAL_COLUMNS,
    WINNER_COLUMNS,
    Run,
    read_csv,
    write_csv,
)
from nas_minitron.pipeline.settings import SearchSettings, cache_workers, full_distill_workers, train_sequences
from nas_minitron.prune.plan import PLAN_FILE, PruningPlan, save_student
from nas_minitron.prune.scores import ImportanceScores
from nas_minitron.prune.sliced import is_safetensors_dir
from nas_minitron.prune.student import build_student
from nas_minitron.report.page import write_report
from nas_minitron.search.protocol import (
    PLACEMENT_KEYS,
    TrialRecord,
    TrialSpec,
    trial_log_path,
    trial_result_path,
    trial_weights_path,
)
from nas_minitron.search.records import load_records
from nas_minitron.search.tune import (
    RayOptions,
    check_resources,
    check_run_dir_shared,
    connect_ray,
    fatal_message,
    num_alive_nodes,
    optuna_numbers,
    run_trials,
    study_storage_url,
)
from nas_minitron.search.winners import select_winners
from nas_minitron.space.candidates import (
    CANDIDATE_COLUMNS,
    Candidate,
    best_pure_depth,
    best_pure_width,
    default_space,
    enumerate_candidates,
)
from nas_minitron.space.spaces import SearchSpace, load_space
from nas_minitron.teacher import (
    DEFAULT_TEACHER,
    load_teacher_config,
    load_teacher_tokenizer,
    resolve_teacher_dir,
    tokenizer_fingerprint,
)
from nas_minitron.tokens import TokenStream, write_stream

if TYPE_CHECKING:
    import torch
    import transformers
    from transformers import PreTrainedModel

    from nas_minitron.dmc import export as dmc_export
else:
    torch = lazy_import("torch")
    transformers = lazy_import("transformers")
    dmc_export = lazy_import("nas_minitron.dmc.export")  # imports torch and transformers

__all__ = ["candidates", "check_shared_run_dir", "distill_winners", "evaluate", "find_candidates", "full_split",
           "load_student", "logit_cache", "report", "start_ray", "stop_ray", "trial_spec", "trials", "validate_at_most",
           "winners"]

DEFAULT_CPU_SPACE = "smollm2-135m-cpu"  # the embedded default's space: few depths keep importance short on CPU


# ---- pre-flight: everything that can refuse the run before it writes or computes anything ------------------------
def find_candidates(s: SearchSettings, budget_params: int) -> tuple[SearchSpace, dict[str, Any], list[Candidate]]:
    """(space, teacher config, candidates); UserError for an unreachable budget or an empty window."""
    teacher_config = load_teacher_config(s.teacher, s.cache_dir, revision=s.teacher_revision)
    name = s.space or (DEFAULT_CPU_SPACE if s.teacher == DEFAULT_TEACHER else None)
    space = load_space(name, teacher_config) if name else default_space(teacher_config)
    return space, teacher_config, enumerate_candidates(space, teacher_config, budget_params, s.tolerance,
                                                       s.max_candidates)


def start_ray(s: SearchSettings, config: dict[str, Any], log: Callable[[str], None]) -> None:
    """Start or join Ray and check that one trial fits, before the expensive stages."""
    dashboard = connect_ray(RayOptions(address=s.ray_address))
    if dashboard:
        log(f"Ray dashboard: {dashboard}")
    # Host memory of one trial. On CPU: the teacher's weights (when no logit cache lets the trial slice the student
    # out of the files) + student weights, grads and AdamW state (fp32) + the chunked loss (~7 fp32 [1024, V]) +
    # runtime. On a GPU the student, its optimizer and the loss live on the device; the host holds the read windows
    # of the sliced build and the runtime (the GPU side is the resource plan's, pipeline/plan.py).
    vocab = int(config.get("vocab_size") or 0)
    teacher = 0 if s.topk > 0 else 4 * int(config["teacher_params"])
    if s.gpus_per_trial > 0:
        memory = teacher + 2**31
    else:
        memory = teacher + 16 * int(config["budget_params"]) + 7 * 4 * 1024 * vocab + 2**30
    check_resources(s.cpus_per_trial, s.gpus_per_trial, memory)
    workers, on_gpus = full_distill_workers(s)
    if s.full_gpus is not None or workers > 1:  # the winners' Ray Train job must fit too, checked before any work
        check_cluster(workers, on_gpus, "--full-gpus" if on_gpus else "--full-workers")
    workers, on_gpus = cache_workers(s)
    if workers:  # and the logit cache's workers
        check_cluster(workers, on_gpus, "--cache-gpus" if on_gpus else "--cache-workers")


def stop_ray() -> None:
    """Shut Ray down if this process started or joined it (never imports ray only to stop it)."""
    if "ray" in sys.modules:
        sys.modules["ray"].shutdown()


_SHARED_CHECKED: set[Path] = set()  # run directories this process has seen from every node


def check_shared_run_dir(run_dir: Path, s: SearchSettings, log: Callable[[str], None]) -> None:
    """Once per process and run directory, with Ray connected: UserError unless every node sees `run_dir`
    (`tune.check_run_dir_shared`). Skipped on the local single-node cluster the search starts itself (one node,
    one filesystem); a joined cluster (--ray-address) is always checked, even with one node."""
    if "ray" not in sys.modules or not sys.modules["ray"].is_initialized() or run_dir.resolve() in _SHARED_CHECKED:
        return
    if s.ray_address is not None or num_alive_nodes() > 1:
        nodes, wall_s = check_run_dir_shared(run_dir)
        log(f"  run directory seen from all {nodes} Ray node(s) ({wall_s:.1f} s)")
    _SHARED_CHECKED.add(run_dir.resolve())


# ---- candidates ----------------------------------------------------------------------------------------------
def baseline_names(s: SearchSettings, space: SearchSpace, teacher_config: dict[str, Any], budget: int,
                   found: list[Candidate]) -> list[str]:
    """The no-search baselines the search always scores (pure width, pure depth) that are among the candidates."""
    names = {c.name for c in found}
    baselines = []
    for pick in (best_pure_width, best_pure_depth):
        best = pick(space, teacher_config, budget, s.tolerance)
        if best is not None and best.name in names:  # enqueue only what the candidate list can decode
            baselines.append(best.name)
    return baselines


def candidates(run: Run) -> dict[str, Any]:
    s = run.settings
    budget = run.resolved.budget_params
    space, teacher_config, found = find_candidates(s, budget)
    write_csv(run.path("candidates.csv"), [c.row() for c in found], CANDIDATE_COLUMNS)
    baselines = baseline_names(s, space, teacher_config, budget, found)
    run.log(f"  {len(found)} candidates within the budget window; baselines: {', '.join(baselines) or 'none'}")
    return {"num_candidates": len(found), "baselines": baselines}


# ---- teacher-logit cache ------------------------------------------------------------------------------------------
def _write_tokens(run: Run, split: str, source_split: str, num_sequences: int, tokenizer: Any,
                  start: tuple[int, int] = (0, 0)) -> TokenStream:
    """data/<split>/: `num_sequences` packed sequences of the data's `source_split` from cursor `start`, tokenized
    in --tokenize-procs processes; a rerun keeps the shards already written (`nas_minitron.tokens`)."""
    s = run.settings
    return write_stream(run.path("data", split), s.data, tokenizer, source_split, s.seq_len, num_sequences,
                        seed=s.seed, start=start, num_proc=s.tokenize_procs, log=run.log)


def logit_cache(run: Run) -> dict[str, Any]:
    """The trials' token streams (data/train_short, data/validation) and, with --topk, the teacher's top-k logits
    for them. The winners' stream (data/train_full) waits for the distill stage: the trials do not read it."""
    s = run.settings
    workers, on_gpus = cache_workers(s)
    teacher_dir = resolve_teacher_dir(s.teacher, s.cache_dir, s.teacher_revision)  # the trials cut from it too
    tokenizer = run.teacher()[1] if workers == 0 else load_teacher_tokenizer(teacher_dir)
    short = _write_tokens(run, "train_short", "train", train_sequences(s, s.short_tokens), tokenizer)
    val = _write_tokens(run, "validation", "validation", s.validation_sequences, tokenizer)
    if s.topk <= 0:
        return {"topk": 0}
    # Trials read teacher targets for their training stream and their validation KL from here: no teacher needed.
    sequences = torch.cat([short.tensor(), val.tensor()])
    batch = s.cache_batch_size or s.batch_size
    if workers == 0:
        cache = build_logit_cache(run.teacher()[0], sequences, run.path("logit_cache"), s.topk, batch,
                                  tokenizer=tokenizer, overwrite=True)
    else:
        run.release_teacher()  # importance's teacher: the workers load their own (on the GPUs Ray gives them)
        check_shared_run_dir(run.dir, s, run.log)  # the workers write the shards into it
        # at least 4 shards per worker, so that the last round leaves few of them idle
        shard = max(1, min(1024, math.ceil(len(sequences) / (4 * workers))))
        cache = build_logit_cache_ray(teacher_dir, sequences,
                                      run.path("logit_cache"), s.topk, batch, workers=workers, use_gpu=on_gpus,
                                      vocab_size=run.resolved.vocab_size,
                                      tokenizer_fingerprint=tokenizer_fingerprint(tokenizer),
                                      shard_sequences=shard, threads=max(1, s.cpus_per_trial), log=run.log)
    m = cache.manifest
    size = sum(int(entry["size"]) for entry in m["files"].values())
    run.log(f"logit cache: {m['num_sequences']} sequences in {len(m['shards'])} shards, {size / 2**20:.1f} MiB, "
            f"built in {m['build_seconds']:.1f} s by {m['workers']} worker(s) "
            f"({m['dtype']}; {m['resumed_shards']} shards kept from an interrupted build)")
    return {"topk": s.topk, "num_sequences": short.num_sequences + val.num_sequences, "cache_bytes": size,
            "cache_build_seconds": m["build_seconds"], "cache_workers": m["workers"], "cache_dtype": m["dtype"],
            "cache_shards": len(m["shards"]), "cache_resumed_shards": m["resumed_shards"]}


def write_full_stream(run: Run) -> TokenStream:
    """data/train_full: the winners' stream, the train sequences right after the trials' (a winner continues from
    its trial's weights, so it must not see the trial's sequences again), tokenized from where train_short ended."""
    s = run.settings
    short = run.tokens("train_short")
    assert short.end is not None  # a stream directory records where it ended
    tokenizer = load_teacher_tokenizer(resolve_teacher_dir(s.teacher, s.cache_dir, s.teacher_revision, weights=False))
    return _write_tokens(run, "train_full", "train", train_sequences(s, s.full_tokens), tokenizer, start=short.end)


# ---- trials --------------------------------------------------------------------------------------------------------
def validate_at_most(config: DistillConfig, evals: int) -> DistillConfig:
    """`config` validating at step 0 and at most `evals` times after it (fewer when it has fewer optimizer steps);
    the trainer always validates the last step."""
    every_steps = max(1, math.ceil(config.num_steps() / evals))
    return dataclasses.replace(config, eval_every_tokens=every_steps * config.tokens_per_step())


def _short_distill_config(run: Run) -> DistillConfig:
    s = run.settings
    config = DistillConfig(
        num_tokens=s.short_tokens, seq_len=s.seq_len, batch_size=s.batch_size, lr=s.lr,
        num_val_sequences=s.validation_sequences, seed=s.seed, topk=s.topk if s.topk > 0 else 0,
        dtype="bf16" if s.gpus_per_trial > 0 else "float32",  # a trial with a GPU trains on it (worker.py)
        keep_last_k=1,  # a trial's checkpoints are only for resuming it: the last one is enough
    )
    return validate_at_most(config, s.evals_per_trial)


SHAPE_OBJECTIVES = ("params", "kv_bytes_per_token", "flops_per_token")  # objectives candidates.csv holds


def _shape_objectives(run: Run) -> dict[str, dict[str, float]]:
    """The objectives that come from a candidate's shape, by name (the trials report only the trained ones)."""
    return {row["name"]: {k: float(row[k]) for k in SHAPE_OBJECTIVES if row.get(k) not in (None, "")}
            for row in run.candidate_rows()}


def trial_spec(run: Run) -> TrialSpec:
    """What every trial of this run shares, by path (also used by benchmarks/bench_search_vs_exhaustive.py).

    Reads the run directory and writes nothing."""
    s = run.settings
    return TrialSpec(
        run_dir=str(run.dir.resolve()),
        teacher_dir=resolve_teacher_dir(s.teacher, s.cache_dir, s.teacher_revision),
        importance_dir=str(run.path("importance").resolve()),
        train_path=str(run.data_path("train_short").resolve()),
        val_path=str(run.data_path("validation").resolve()),
        logit_cache_dir=str(run.path("logit_cache").resolve()) if s.topk > 0 else None,
        candidates=tuple(r["name"] for r in run.candidate_rows()),
        head_dim=run.resolved.head_dim,
        distill=_short_distill_config(run),
        objectives=tuple(s.objectives),
        cpus_per_trial=s.cpus_per_trial,
        gpus_per_trial=s.gpus_per_trial,
        scratch_dir=s.scratch_dir,
        shape_objectives=_shape_objectives(run),
    )


def trials(run: Run) -> dict[str, Any]:
    """Run (or resume) the trials as Ray Tune trials; trials.csv, trial_curves.csv and the kept trial weights.

    The driver's teacher is released first: Ray may place a trial on the driver's GPU. A trial that refuses to run
    where it was placed (a reserved GPU it cannot see) stops the search with its one-line message.
    """
    s = run.settings
    run.verify_shared()  # --verify: what every trial reads by path, hashed once here (trials check sizes)
    if run.release_teacher():
        run.log("  released the driver's teacher for the trials")
    spec = trial_spec(run)
    options = RayOptions(address=s.ray_address, max_concurrent=s.max_concurrent, sampler=s.sampler, asha=s.asha,
                         seed=s.seed, storage_url=s.storage)
    baselines = run.stage_info("candidates").get("baselines", [])
    ran = run_trials(spec, options, s.trials, baselines, resume=run.resume, log=run.log, num_winners=s.winners)
    records = load_records(run.dir)  # every driver's trials: a driver killed before this one left its rows there
    _write_trial_tables(run, records)
    fatal = fatal_message(ran)
    if fatal:  # --resume after the fix asks the stopped candidates again (finished results are reused)
        raise UserError(fatal)
    unfinished = [r.name for r in ran if r.status == "PRUNED"]
    if unfinished and not (s.asha and len(s.objectives) == 1):  # only ASHA stops trials early; else: interrupted
        raise UserError(f"the trials were interrupted before {len(unfinished)} of them finished "
                        f"({', '.join(str(n) for n in unfinished[:4])}); continue them with --resume.")
    shutil.rmtree(run.path("trial_resume"), ignore_errors=True)  # checkpoints carried over by --resume: all used
    done = sum(r.status == "COMPLETE" for r in records)
    run.log(f"  {len(records)} trials: {done} complete, {len(records) - done} failed or stopped")
    if not done:
        raise UserError(f"no search trial finished; see the errors in {run.path('trials.csv')}.")
    where = {key: sorted({str(r.metrics[key]) for r in records if r.metrics.get(key) not in (None, "")})
             for key in PLACEMENT_KEYS}
    run.log(f"  trials ran on {', '.join(where['device']) or '?'} with {', '.join(where['param_dtype']) or '?'} "
            f"parameters and {', '.join(where['compute_dtype']) or '?'} compute; logs in {run.path('logs', 'trials')}")
    return {"num_trials": len(records), "num_complete": done, "devices": where["device"],
            "gpu_ids": where["gpu_ids"], "param_dtypes": where["param_dtype"],
            "compute_dtypes": where["compute_dtype"], "logs": str(Path("logs") / "trials")}


def _step0(record: TrialRecord, results: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """The step-0 (untrained) report of a trial's candidate: its own first report when that is step 0, else the
    step-0 point of the candidate's finished result (a trial that continued from a checkpoint starts later)."""
    if record.first.get("step") in (0, 0.0):
        return dict(record.first)
    return next((p for p in results.get(record.name or "", []) if p.get("step") in (0, 0.0)), {})


def _finished_curves(run: Run) -> dict[str, list[dict[str, Any]]]:
    """Each finished candidate's whole curve, from its result (`trial_result_path`), by name."""
    curves = {}
    for path in sorted(run.path("trial_results").glob("*.json")):
        with reading(path, "trial result", "delete it to train that candidate again"):
            curves[path.stem] = [dict(p) for p in json.loads(path.read_text()).get("curve") or []]
    return curves


def _write_trial_tables(run: Run, records: list[TrialRecord]) -> None:
    candidates_by_name = {r["name"]: r for r in run.candidate_rows()}
    numbers = optuna_numbers(study_storage_url(run.dir, run.settings.storage))
    results = _finished_curves(run)
    table: list[dict[str, Any]] = []
    curves: list[dict[str, Any]] = []
    for record in records:
        metrics, name = record.metrics, record.name
        first = _step0(record, results)
        shape = candidates_by_name.get(name or "", {})
        table.append({
            "trial_id": record.trial_id, "number": numbers.get(record.trial_id, ""), "name": name, **shape,
            "status": record.status, "wall_s": metrics.get("time_total_s", ""), "num_tokens": metrics.get("num_tokens"),
            "val_loss": metrics.get("val_loss"), "val_kl": metrics.get("val_kl"),
            "val_loss_step0": first.get("val_loss"), "val_kl_step0": first.get("val_kl"),
            **{key: metrics.get(key, "") for key in PLACEMENT_KEYS},
            "log": str(trial_log_path(".", name)) if name else "",
            "error": record.error or metrics.get("error", ""),
        })
        seen: dict[int, dict[str, Any]] = {}
        for point in record.curve:
            if point.get("step") is not None and not point.get("failed") and not point.get("reused_from"):
                seen[int(point["step"])] = {"trial_id": record.trial_id, "name": name, **point}
        curves.extend(seen[k] for k in sorted(seen))
    write_csv(run.path("trials.csv"), table, TRIAL_COLUMNS)
    write_csv(run.path("trial_curves.csv"), curves, CURVE_COLUMNS)


# ---- winners and their full distillation -------------------------------------------------------------------
_WEIGHT_FILES = ("*.safetensors", "*.safetensors.index.json", "*.bin", "config.json", "generation_config.json")


def _link_or_copy(src: Path, dst: Path) -> None:
    """Hard-link `src` to `dst` (no second copy of a large student on disk), copying across filesystems.

    Safe because the run directory never rewrites a file in place: every student directory is written anew in an
    `atomic_directory` and replaces the old one by a rename.
    """
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _link_files(src: Path, dst: Path, skip: Callable[[Path], bool]) -> list[str]:
    """Link (or copy) the files of `src` into `dst`, except those `skip` names, `dst` already has, and the checksum
    record (the caller writes `dst`'s own); the names linked."""
    linked = []
    for item in sorted(src.iterdir()):
        if item.is_file() and not skip(item) and item.name != CHECKSUMS and not (dst / item.name).exists():
            _link_or_copy(item, dst / item.name)
            linked.append(item.name)
    return linked


_STUDENT_FIX = "rerun the stage that wrote it (delete the folder, then --resume)"


def _check_student(run: Run, folder: Path) -> None:
    """A student folder the run wrote, against its checksums: sizes always, sha256 with --verify."""
    verify_checksums(folder, "student file", _STUDENT_FIX, full=run.settings.verify)


def _trial_weights(run: Run, arch_name: str) -> tuple[Path | None, int]:
    """(the student its trial trained, when the trial kept it; the tokens that student has seen, else 0).

    The contract of `search.worker`: the weights (`trial_weights_path`, with the pruning plan) are written before
    the result JSON, whose `weights.num_tokens` says how much they were trained; both must be there.
    """
    folder, result_file = trial_weights_path(run.dir, arch_name), trial_result_path(run.dir, arch_name)
    if not ((folder / "config.json").is_file() and (folder / PLAN_FILE).is_file() and result_file.is_file()):
        return None, 0
    weights = json.loads(result_file.read_text()).get("weights")
    if not isinstance(weights, dict) or weights.get("num_tokens") is None:
        return None, 0
    return folder, int(weights["num_tokens"])


def winners(run: Run) -> dict[str, Any]:
    """Select the winners from trials.csv and save each in winners/<arch>/ with the teacher's tokenizer.

    A winner continues from the student its trial trained (linked from `trial_weights_path`; `source` "trial",
    `tokens_seen` its trial's tokens) when the trial kept it, else it is re-pruned from the teacher exactly as its
    trial built it (`source` "pruned", `tokens_seen` 0). `total_tokens` becomes trial + full once it is distilled.
    """
    s = run.settings
    rows = []
    for row in read_csv(run.path("trials.csv")):
        parsed: dict[str, Any] = dict(row)
        for key in ("val_loss", "val_kl", "params", "kv_bytes_per_token", "flops_per_token"):
            parsed[key] = float(row[key]) if row.get(key) not in (None, "") else math.nan
        rows.append(parsed)
    chosen = select_winners(rows, s.objectives, s.winners)
    spec = trial_spec(run)  # the trials' own pruning options: a winner is the model its trial scored
    tokenizer = transformers.AutoTokenizer.from_pretrained(spec.teacher_dir)
    table = []
    for rank, winner in enumerate(chosen, start=1):
        arch = ArchConfig.parse(winner["name"], run.resolved.head_dim)
        trained, tokens_seen = _trial_weights(run, arch.name)
        with atomic_directory(run.path("winners", arch.name), overwrite=True) as tmp:
            if trained is not None:
                _check_student(run, trained)
                tokenizer.save_pretrained(tmp)  # first: a link is never written through
                _link_files(trained, tmp, skip=lambda f: f.name == RECORD_FILE or f.name.startswith("."))
                write_checksums(tmp)
                plan = PruningPlan.load(tmp / PLAN_FILE)
            else:  # re-pruned: cut from the teacher's files as the trials cut theirs (the teacher loaded only if
                # its files are not safetensors)
                source_teacher: Any = spec.teacher_dir if is_safetensors_dir(spec.teacher_dir) else run.teacher()[0]
                student, plan = build_student(source_teacher, s.teacher, arch,
                                              ImportanceScores.load(run.path("importance")),
                                              depth_method=spec.depth_method, rescale_norms=spec.rescale_norms,
                                              importance_dir=str(run.path("importance")),
                                              dtype=torch.float32 if isinstance(source_teacher, str) else None)
                save_student(student, tokenizer, plan, tmp)
        source = "trial" if trained is not None else "pruned"
        table.append({"rank": rank, "name": arch.name, "params": plan.params, "val_loss": winner["val_loss"],
                      "val_kl": winner["val_kl"], "path": str(Path("winners") / arch.name), "source": source,
                      "tokens_seen": tokens_seen, "total_tokens": tokens_seen})
        origin = f"its trial's weights ({tokens_seen:,} tokens)" if trained is not None else "re-pruned"
        run.log(f"  winner {rank}: {arch.name} ({plan.params:,} parameters, val KL {winner['val_kl']:.4f}), "
                f"from {origin}")
    write_csv(run.path("winners.csv"), table, WINNER_COLUMNS)
    return {"winners": [t["name"] for t in table], "sources": [t["source"] for t in table]}


def load_student(run: Run, folder: Path, device: str) -> PreTrainedModel:
    """A saved student in float32 (the master weights a distillation steps) on `device`, checked against its
    checksums first."""
    _check_student(run, folder)
    student = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    student.to(device)  # type: ignore[arg-type]  # transformers' wrapped `to` loses torch's signature
    return student


def _log_eval(run: Run, name: str) -> Callable[[EvalPoint], None]:
    def log(point: EvalPoint) -> None:
        run.log(f"  {name} step {point.step}: val loss {point.val_loss:.4f}, val KL {point.val_kl:.4f}")

    return log


@dataclasses.dataclass(frozen=True)
class _FullPlacement:
    """Where each winner's full distillation runs: in the driver on `device`, or as a Ray Train job."""

    workers: int
    on_gpus: bool
    in_driver: bool
    device: str  # the driver's device, or the workers' kind (cuda / cpu)

    @property
    def strategy(self) -> str:
        return "fsdp" if self.workers > 1 else "ddp"  # one Ray worker: nothing to shard or synchronize

    def describe(self) -> str:
        if self.in_driver:
            return f"in the driver on {self.device}"
        kind = "GPU" if self.on_gpus else "CPU"
        return f"Ray Train, {self.workers} {kind} worker(s), {'FSDP2' if self.workers > 1 else 'one worker'}"


def _full_placement(run: Run) -> _FullPlacement:
    s = run.settings
    workers, on_gpus = full_distill_workers(s)
    if s.full_gpus is None and workers == 1:
        return _FullPlacement(1, False, True, run.device())
    return _FullPlacement(workers, on_gpus, False, "cuda" if on_gpus else "cpu")


def _full_config(run: Run, params: int, where: _FullPlacement) -> DistillConfig:
    """The full distillation's settings for a winner of `params` parameters, validated at most
    `evals_per_trial` times after step 0 over `where.workers` workers."""
    s = run.settings
    micro = s.seq_len * s.batch_size * where.workers  # tokens of one micro-batch on every worker
    config = DistillConfig(
        num_tokens=s.full_tokens, seq_len=s.seq_len, batch_size=s.batch_size, lr=s.lr,
        grad_accum=s.global_batch_tokens // micro if s.global_batch_tokens else 1,
        num_val_sequences=s.validation_sequences, seed=s.seed,
        dtype="bf16" if where.device.startswith("cuda") else "float32",
        grad_checkpointing=params >= GRAD_CHECKPOINTING_PARAMS, checkpoint_minutes=s.checkpoint_minutes or 0.0,
    )
    every_steps = max(1, math.ceil(config.num_steps(where.workers) / s.evals_per_trial))
    return dataclasses.replace(config, eval_every_tokens=every_steps * config.tokens_per_step(where.workers))


def full_split(run: Run) -> str:
    """The winners' token stream: the sequences after the trials' (older run directories without it: all)."""
    return "train" if run.legacy_data() and not run.data_path("train_full").is_file() else "train_full"


def _distill_winner(run: Run, row: dict[str, str], where: _FullPlacement) -> tuple[DistillResult, DistillConfig]:
    """Fully distill one winner from the weights in its folder and replace the folder with the result.

    The folder is replaced in one rename, with its distill.json written last: that file is the winner's
    completion marker. A crash leaves the folder as it was and the newest checkpoints in checkpoints/<name>/.
    """
    s, name, folder = run.settings, row["name"], run.path(row["path"])
    config = _full_config(run, int(float(row["params"])), where)
    checkpoints = run.path("checkpoints", name)
    run.log(f"  {name}: {where.describe()}, {config.dtype}, {config.grad_accum} micro-batch(es) per step "
            f"({config.tokens_per_step(where.workers):,} tokens), gradient checkpointing "
            f"{'on' if config.grad_checkpointing else 'off'}")
    log = _log_eval(run, name)
    with atomic_directory(folder, overwrite=True) as tmp:
        if where.in_driver:
            teacher, _ = run.teacher()
            student = load_student(run, folder, where.device)

            def on_eval(point: EvalPoint) -> None:
                log(point)
                for label in (name, f"winner-{row['rank']}"):  # tests inject a fault by arch name or by rank
                    fault_after_checkpoint(label, point.step)

            result = distill(student, run.tokens(full_split(run)).batches(config.batch_size),
                             run.tokens("validation").tensor(), config,
                             teacher=teacher, checkpoint_dir=checkpoints, resume=run.resume, on_eval=on_eval)
            save_distilled(tmp, student, None, result, config=config, teacher=s.teacher,
                           student_source=row["path"], data=s.data)
        else:  # the driver holds no model: every worker loads its own, the token files go by path
            result = distill_ray(folder, run.data_path(full_split(run)), run.data_path("validation"), config,
                                 storage_path=run.path("ray_train"), num_workers=where.workers,
                                 use_gpu=where.on_gpus, strategy=where.strategy,
                                 teacher_dir=resolve_teacher_dir(s.teacher, s.cache_dir, s.teacher_revision),
                                 out_dir=tmp,
                                 checkpoint_dir=checkpoints, resume=run.resume, name=name,
                                 threads_per_worker=max(1, s.cpus_per_trial))
            for point in result.curve:
                log(point)
        # the tokenizer and pruning.json: everything of the old folder that the new student did not replace
        linked = _link_files(folder, tmp,
                             skip=lambda f: any(f.match(p) for p in _WEIGHT_FILES) or f.name == RECORD_FILE)
        write_checksums(tmp, linked)  # the new student's own are written with it (`save_distilled`)
    for done in (checkpoints, run.path("ray_train", name)):
        shutil.rmtree(done, ignore_errors=True)
    for parent in (run.path("checkpoints"), run.path("ray_train")):
        if parent.is_dir() and not any(parent.iterdir()):
            parent.rmdir()
    return result, config


def distill_winners(run: Run) -> dict[str, Any]:
    """Fully distill every winner, continuing from the weights winners/<arch>/ holds (its trial's, or re-pruned).

    In the driver process (default) or, with --full-gpus / --full-workers, as a Ray Train job per winner (FSDP2
    over several workers, bf16 compute over fp32 weights on GPUs). A winner whose distill.json exists finished
    earlier and is never retrained (--resume after a crash during winner 2 keeps winner 1 as it is); an unfinished
    one resumes from its newest checkpoint. Winners run one after another. winners.csv gets each winner's
    `total_tokens` (trial + full).
    """
    s = run.settings
    where = _full_placement(run)
    if not where.in_driver:
        connect_ray(RayOptions(address=s.ray_address))
        check_cluster(where.workers, where.on_gpus, "--full-gpus" if where.on_gpus else "--full-workers")
        check_shared_run_dir(run.dir, s, run.log)  # the Ray Train workers write the winner there
    rows = run.winner_rows()
    if not run.legacy_data() and not all(run.path(r["path"], RECORD_FILE).is_file() for r in rows):
        write_full_stream(run)  # before the first winner needs it; a rerun continues after the shards written
    results = {}
    for row in rows:
        record = run.path(row["path"], RECORD_FILE)
        if record.is_file():
            run.log(f"  {row['name']}: distilled earlier, skipped")
            result, config = DistillResult.from_dict(json.loads(record.read_text())), None
        else:
            result, config = _distill_winner(run, row, where)
        row["total_tokens"] = str(int(row.get("tokens_seen") or 0) + result.num_tokens)
        results[row["name"]] = {"val_loss": result.val_loss, "val_kl": result.val_kl, "num_tokens": result.num_tokens,
                                "total_tokens": int(row["total_tokens"]), "skipped": config is None}
    write_csv(run.path("winners.csv"), rows, WINNER_COLUMNS)
    return {"results": results, "placement": where.describe(), "workers": where.workers}


# ---- evaluation and report ---------------------------------------------------------------------------------
def evaluate(run: Run) -> dict[str, Any]:
    s = run.settings
    teacher, tokenizer = run.teacher()
    device = run.device()
    models = [("teacher", teacher)] + [
        (row["name"], load_student(run, run.path(row["path"]), device))
        for row in run.winner_rows()
    ]
    results, speeds = [], []
    for label, model in models:
        results.append(evaluate_model(model, tokenizer, s.eval_tasks, limit=s.eval_limit, device=device,
                                      batch_size=s.batch_size, label=label))
        speeds.append(measure_speed(model, batch_size=1, seq_len=s.seq_len, device=device, label=label))
        run.log(f"  {label}: {results[-1].tasks}")
    variants = _dmc_variants(run)
    for label, folder in variants:  # one at a time: lm-eval scores them through the full hard-decision forward
        model, _record = dmc_export.load_dmc_model(folder, device=device)
        results.append(evaluate_model(model, tokenizer, s.eval_tasks, limit=s.eval_limit, device=device,
                                      batch_size=s.batch_size, label=label))
        run.log(f"  {label} (DMC): {results[-1].tasks}")
        del model
    save_eval(run.dir, results, speeds)
    return {"models": [label for label, _ in models] + [label for label, _ in variants]}


def _dmc_variants(run: Run) -> list[tuple[str, Path]]:
    """(label, folder) of the dmc stage's retrofits, in dmc.csv's order (none without --dmc-cr). They get lm-eval
    scores but no speed row: `measure_speed` decodes with a stock cache, which DMC attention refuses."""
    if not run.path(DMC_CSV).is_file():
        return []
    return [(Path(row["path"]).name, run.path(row["path"])) for row in read_csv(run.path(DMC_CSV))]


def report(run: Run) -> dict[str, Any]:
    path = write_report(run.dir).resolve()
    run.log(f"  report: {path}")
    return {"path": str(path)}
