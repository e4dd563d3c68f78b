"""`nas-minitron search`: runs the stages in `run_dir.STAGES` order, each persisted and marked done in
`stages/<stage>.json`, skipped on `--resume`; refuses a run before any output when its settings, budget or cluster
cannot work (pre-flight), and holds the run directory's lock while it runs."""

from __future__ import annotations

import fcntl
import itertools
import json
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from nas_minitron.arch import Budget, count_params
from nas_minitron.atomic import check_writable_dir, nearest_existing, write_json_atomic
from nas_minitron.data import iter_sequences
from nas_minitron.dmc.support import check_supported_config
from nas_minitron.errors import UserError
from nas_minitron.evaluate.harness import find_tasks, resolve_tasks
from nas_minitron.families import describe
from nas_minitron.pipeline import dmc_stage, halving_stage, importance_stage, stages
from nas_minitron.pipeline.plan import PLAN_FILE, Plan, StudentShape, make_plan
from nas_minitron.pipeline.run_dir import LOCK_FILE, STAGES, Log, Run, finished_stages, now, stage_marker
from nas_minitron.pipeline.settings import SearchSettings, calibration_seq_len, differences, train_sequences
from nas_minitron.pipeline.usage import StageUsage
from nas_minitron.runtime import release_host_memory
from nas_minitron.teacher import load_teacher_config, load_teacher_tokenizer, resolve_teacher_dir, teacher_pin

__all__ = ["plan_search", "run_search"]

# The stage functions, by the names STAGES gives them (run_dir.STAGES owns the order).
STAGE_FUNCTIONS: dict[str, Callable[[Run], dict[str, Any] | None]] = {
    "candidates": stages.candidates,
    "importance": importance_stage.importance,
    "logit_cache": stages.logit_cache,
    "trials": lambda run: (halving_stage.rung_trials if run.settings.strategy == "rungs" else stages.trials)(run),
    "winners": stages.winners,
    "distill": stages.distill_winners,
    "dmc": dmc_stage.dmc,
    "eval": stages.evaluate,
    "report": stages.report,
}
assert tuple(STAGE_FUNCTIONS) == STAGES, "every stage has one function, in run order"


def _check_run_dir(run_dir: Path, resume: bool, settings: SearchSettings) -> bool:
    """Whether the run directory is to be (re)created; UserError when it cannot be used as asked.

    A directory whose run finished no stage (it failed in pre-flight or in its first stage) may be started over by
    the corrected command, with or without --resume; one with finished stages only by --resume with the same
    settings (runtime keys, and eval settings before the eval stage, may change).
    """
    check_writable_dir(run_dir, "--run-dir")
    config_file = run_dir / "config.json"
    finished = finished_stages(run_dir)
    if not finished:
        if run_dir.is_dir() and any(p.name != LOCK_FILE for p in run_dir.iterdir()) and not config_file.is_file():
            raise UserError(f"run directory {str(run_dir)!r} already exists and holds no search; choose another "
                            f"--run-dir.")
        if resume and not config_file.is_file():
            raise UserError(f"--resume: {str(run_dir)!r} holds no config.json of an earlier search.")
        return True  # new, or a run that finished nothing: (re)created with these settings
    if not resume:
        raise UserError(f"run directory {str(run_dir)!r} already exists; pass --resume to continue it or choose "
                        f"another --run-dir.")
    changed = differences(json.loads(config_file.read_text()), settings, finished)
    if changed:
        raise UserError(f"--resume: {str(run_dir)!r} was made with different settings: " + "; ".join(changed))
    return False


def _resolve(settings: SearchSettings) -> dict[str, Any]:
    """The settings plus what they resolve to for this teacher (config.json); pre-flight checks that need it."""
    budget = Budget.parse(settings.budget)
    teacher_config = load_teacher_config(settings.teacher, settings.cache_dir, revision=settings.teacher_revision)
    family, arch = describe(teacher_config)
    teacher_params = count_params(arch, family.invariants_from_config(teacher_config))
    max_positions = teacher_config.get("max_position_embeddings")
    if isinstance(max_positions, int):
        for flag, value, low in (("--seq-len", settings.seq_len, 1), ("--calib-seq-len", settings.calib_seq_len, 2)):
            if value is not None and value > max_positions:
                raise UserError(f"{flag} {value} exceeds the teacher's max_position_embeddings ({max_positions}); "
                                f"valid: {low}..{max_positions}.")
    return {**settings.to_dict(), "budget_params": budget.resolve(teacher_params),
            "teacher_params": teacher_params, "teacher_arch": arch.name, "head_dim": arch.head_dim,
            "model_type": family.model_type, "vocab_size": int(teacher_config["vocab_size"]),
            "teacher_pin": teacher_pin(settings.teacher, settings.cache_dir, settings.teacher_revision)}


def _check_pin(run_dir: Path, resolved: dict[str, Any], new: bool) -> None:
    """On --resume: UserError when the teacher is not the one the run began with (config.json's `teacher_pin`; a
    run directory from before pins existed has none and is pinned from now on)."""
    if new:
        return
    saved = json.loads((run_dir / "config.json").read_text()).get("teacher_pin")
    pin = resolved["teacher_pin"]
    if saved is None or saved.get("id") == pin["id"]:
        return
    fix = (f"pass --teacher-revision {saved['revision']} to resume with the commit it began with"
           if saved.get("kind") == "hub" and pin.get("kind") == "hub" else
           "restore the teacher's files the run began with, or start the search again in a new --run-dir")
    raise UserError(f"--resume: the teacher changed since {str(run_dir)!r} began: it was pinned to {saved['id']!r} "
                    f"and is now {pin['id']!r}; {fix}.")


def _check_scratch_dir(scratch_dir: str | None) -> None:
    """UserError unless the trials' scratch directory (on this node) is, or can be made, a writable directory.

    Trials on other nodes check their own when they start (a refusal there stops the search with one line)."""
    if scratch_dir is not None:
        check_writable_dir(scratch_dir, "--scratch-dir")


def _preflight(settings: SearchSettings, resolved: dict[str, Any], run_dir: Path, new: bool,
               to_run: tuple[str, ...] = STAGES, data: bool = True) -> list[str]:
    """Everything a later stage would refuse, refused now: before the run directory or any work.

    `to_run`: the stages this invocation may run (all, or up to --stop-after); `data`: also check that --data is
    long enough (tokenizes it up to the sequences the run needs; --dry-run leaves it to the run). Returns the notes
    the run logs at start."""
    _check_scratch_dir(settings.scratch_dir)
    found = None
    if new:
        space, teacher_config, found = stages.find_candidates(settings, resolved["budget_params"])  # a second
        if settings.strategy == "rungs" and settings.screen is not None:
            baselines = stages.baseline_names(settings, space, teacher_config, resolved["budget_params"], found)
            low = max(1, settings.winners, len(baselines))
            if not low <= settings.screen <= len(found):
                raise UserError(f"--screen {settings.screen} must be between {low} (the winners and the "
                                f"{len(baselines)} enqueued baselines) and the {len(found)} candidates within the "
                                f"budget window, or none for all.")
    if settings.importance is not None and "importance" in to_run and "importance" not in finished_stages(run_dir):
        if found is None:  # resumed: the candidates stage found these same ones
            found = stages.find_candidates(settings, resolved["budget_params"])[2]
        importance_stage.check_reused(settings, resolved, (c.arch.num_hidden_layers for c in found))
    if settings.dmc_cr is not None and "dmc" in to_run and "dmc" not in finished_stages(run_dir):
        try:  # the winners keep the teacher's family, head_dim and attention: its config decides
            check_supported_config(load_teacher_config(settings.teacher, settings.cache_dir,
                                                       revision=settings.teacher_revision))
        except UserError as err:
            raise UserError(f"--dmc-cr: the teacher's winners cannot be retrofitted: {err}") from None
    if "eval" in to_run and "eval" not in finished_stages(run_dir):  # a typo in --eval-tasks, not after hours
        find_tasks(list(resolve_tasks(settings.eval_tasks)))
    return _check_data(settings, run_dir, to_run) if data else []


# Tokens of the train split the pre-flight scan reads at most (~1-2 min on 2 CPUs, RESULTS.md "Token streams"):
# beyond it, the winners' stream is checked by the distill stage that tokenizes it (tokens.write_stream refuses a
# split that runs out, keeping what it wrote) instead of scanning billions of tokens before the run starts.
EXACT_SCAN_TOKENS = 20_000_000


def _check_data(settings: SearchSettings, run_dir: Path, to_run: tuple[str, ...]) -> list[str]:
    """UserError unless --data is readable and long enough for the stages still to run: the calibration split for
    importance (at --calib-seq-len; none when --importance reuses scores), the train split for the trials' and the
    winners' token streams and the validation split (the logit_cache stage cuts them). Tokenizes only up to the
    sequences they need, and the winners' part of the train split only while the train split needed stays within
    EXACT_SCAN_TOKENS; returns the notes to log (what was left to the distill stage)."""
    done = set(finished_stages(run_dir))
    s = settings
    short, full = train_sequences(s, s.short_tokens), train_sequences(s, s.full_tokens)
    notes = []
    if (short + full) * s.seq_len <= EXACT_SCAN_TOKENS:
        train, train_why = short + full, "--short-tokens + --full-tokens"
    else:
        train, train_why = short, "--short-tokens"
        notes.append(f"--data: the train split is checked here for the trials' {short:,} sequences only; the "
                     f"winners' {full:,} more ({full * s.seq_len:,} tokens, --full-tokens) are checked as the distill "
                     f"stage tokenizes them (scanning them now would take ~{full * s.seq_len / 3e5 / 60:,.0f} min)")
    calib_flag = "--seq-len" if s.calib_seq_len is None else "--calib-seq-len"
    needs = [(split, count, seq_len, why, flag) for stage, split, count, seq_len, why, flag in (
        ("importance", "calibration", s.calibration_samples, calibration_seq_len(s), "--calibration-samples",
         calib_flag),
        ("logit_cache", "train", train, s.seq_len, train_why, "--seq-len"),
        ("logit_cache", "validation", s.validation_sequences, s.seq_len, "--validation-sequences", "--seq-len"),
    ) if stage in to_run and stage not in done and not (stage == "importance" and s.importance is not None)]
    if not needs:
        return []
    tokenizer = load_teacher_tokenizer(resolve_teacher_dir(s.teacher, s.cache_dir, s.teacher_revision, weights=False))
    for split, count, seq_len, why, flag in needs:
        found = sum(1 for _ in itertools.islice(iter_sequences(s.data, tokenizer, split, seq_len, s.seed), count))
        if found < count:
            raise UserError(f"--data {s.data!r}: its {split} split holds {found} sequences of {seq_len} tokens, but "
                            f"this search needs {count} ({why}); use more data, a shorter {flag}, or lower {why}.")
    return notes


def _lock(run_dir: Path) -> IO[str]:
    """Hold an exclusive lock on the run directory: two searches writing one directory would corrupt it."""
    handle = (run_dir / LOCK_FILE).open("a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        handle.close()
        raise UserError(f"run directory {str(run_dir)!r} is in use by another search (pid {holder}).") from None
    handle.seek(0)
    handle.truncate()
    handle.write(str(os.getpid()))
    handle.flush()
    return handle


def _plan(settings: SearchSettings, resolved: dict[str, Any], run_dir: Path, to_run: tuple[str, ...]) -> Plan:
    """The resource plan of the stages still to run, checked against the run directory's free disk and this
    machine's RAM or --host-memory-gib (GPU sizes against --gpu-memory-gib); reads the teacher's config only."""
    _, _, found = stages.find_candidates(settings, resolved["budget_params"])
    students = [StudentShape(c.params, c.arch.num_hidden_layers, c.arch.hidden_size) for c in found]
    done = set(finished_stages(run_dir))
    free_disk = shutil.disk_usage(nearest_existing(run_dir.resolve()) or "/").free
    total_ram = (int(settings.host_memory_gib * 2**30) if settings.host_memory_gib is not None
                 else os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    return make_plan(settings, resolved, students, settings.gpu_memory_gib, free_disk_bytes=free_disk,
                     total_ram_bytes=total_ram, to_run=tuple(s for s in to_run if s not in done))


def _refuse_unfit(plan: Plan) -> None:
    if not plan.fits:
        raise UserError("the run does not fit: " + "; ".join(plan.problems) + " (see --dry-run).")


def _stages_to_run(stop_after: str | None) -> tuple[str, ...]:
    if stop_after is not None and stop_after not in STAGES:
        raise UserError(f"--stop-after {stop_after!r} is not a stage; valid: {', '.join(STAGES)}.")
    return STAGES if stop_after is None else STAGES[: STAGES.index(stop_after) + 1]


def plan_search(settings: SearchSettings, run_dir: Path, resume: bool, stop_after: str | None = None) -> Plan:
    """`--dry-run`: every check `run_search` makes before Ray but the length of --data (a scan that tokenizes the
    data up to what the run needs: minutes at 8B scale, and the teacher's tokenizer files), and the resource plan;
    needs only the teacher's config.json; writes nothing, starts nothing. The caller prints the plan and refuses
    it when it does not fit."""
    to_run = _stages_to_run(stop_after)
    new = _check_run_dir(run_dir, resume, settings)
    resolved = _resolve(settings)
    _check_pin(run_dir, resolved, new)
    _preflight(settings, resolved, run_dir, new, to_run, data=False)
    return _plan(settings, resolved, run_dir, to_run)


def _create(settings: SearchSettings, run_dir: Path, resolved: dict[str, Any], plan: Plan) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(run_dir / "config.json", resolved)
    write_json_atomic(run_dir / PLAN_FILE, plan.to_dict())
    write_json_atomic(run_dir / "summary.json", {"teacher": settings.teacher, "budget": settings.budget,
                                                 "data": settings.data, "started_at": now(), "stage_wall_s": {}})


def run_search(settings: SearchSettings, run_dir: Path, resume: bool, log: Log = print,
               stop_after: str | None = None) -> Path | None:
    """Run (or resume) every stage, or those up to `stop_after`; returns the report's path (None when stopped).

    Order: read-only checks (run directory, settings against the teacher, candidates, eval tasks), the Ray cluster,
    then the lock, and only then anything written: a refused run leaves nothing behind, and of two drivers started
    on one new directory the second is refused before it writes.
    """
    to_run = _stages_to_run(stop_after)
    new = _check_run_dir(run_dir, resume, settings)
    resolved = _resolve(settings)
    _check_pin(run_dir, resolved, new)
    notes = _preflight(settings, resolved, run_dir, new, to_run)
    plan = _plan(settings, resolved, run_dir, to_run)
    _refuse_unfit(plan)  # before Ray and before the run directory exists
    log(f"run directory {run_dir} ({'resumed' if not new else 'new'}): teacher {resolved['teacher_arch']}, "
        f"budget {settings.budget} = {resolved['budget_params']:,} parameters")
    totals = plan.totals()
    log(f"plan ({PLAN_FILE}): {totals['tokens']:,} tokens, peak CPU RAM {totals['cpu_ram_bytes'] / 2**30:.1f} GiB, "
        f"GPU {totals['gpu_bytes_per_device'] / 2**30:.1f} GiB/device, disk {totals['disk_bytes'] / 2**30:.2f} GiB, "
        f"~{totals['seconds'] / 60:.0f} min (estimates; --dry-run for the table)")
    for warning in plan.warnings:
        log(f"warning: {warning}")
    for note in notes:
        log(note)
    if not stage_marker(run_dir, "trials").is_file():
        stages.start_ray(settings, resolved, log)  # unreachable cluster or too small: refused up front
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        lock = _lock(run_dir)
        try:
            # checked again under the lock: another driver may have finished a stage since
            if _check_run_dir(run_dir, resume, settings) != new:
                raise UserError(f"run directory {str(run_dir)!r} changed while this search started; rerun it.")
            stages.check_shared_run_dir(run_dir, settings, log)  # before anything is written into it
            if new:
                _create(settings, run_dir, resolved, plan)
            else:
                write_json_atomic(run_dir / "config.json", resolved)  # late settings (eval) may have changed
                write_json_atomic(run_dir / PLAN_FILE, plan.to_dict())  # the plan of what this invocation runs
            run = Run(settings, run_dir, resume, log)
            _run_stages(run, to_run)
        finally:
            lock.close()
    finally:
        stages.stop_ray()
    return Path(run.stage_info("report")["path"]) if to_run == STAGES else None


def _run_stages(run: Run, to_run: tuple[str, ...] = STAGES) -> None:
    for stage in to_run:
        if run.done(stage):
            run.log(f"[{stage}] done earlier, skipped")
            continue
        run.log(f"[{stage}] ...")
        start = time.perf_counter()
        with StageUsage(run.dir) as usage:  # peak RSS and run-dir bytes, beside the plan's (benchmarks/)
            extra = STAGE_FUNCTIONS[stage](run) or {}
        wall_s = time.perf_counter() - start
        run.mark(stage, wall_s, **extra, measured=usage.result())
        if stage == "eval":
            run.release_teacher()  # the report needs no teacher
        release_host_memory()  # the next stage starts from what it needs, not from this one's peak
        _update_summary(run, stage, wall_s)
        run.log(f"[{stage}] done in {wall_s:.1f} s")


def _update_summary(run: Run, stage: str, wall_s: float) -> None:
    summary = json.loads(run.path("summary.json").read_text())
    summary.setdefault("stage_wall_s", {})[stage] = round(wall_s, 3)
    if stage == STAGES[-1]:
        summary["finished_at"] = now()
    write_json_atomic(run.path("summary.json"), summary)

