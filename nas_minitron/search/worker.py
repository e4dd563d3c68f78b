"""One search trial without Ray in it: prune a candidate from the teacher and distill it briefly.

`tune.py` wraps `run_candidate` in a Ray Tune trainable and passes `report`, which sends metrics (and a
checkpoint directory) to Tune. Everything heavy is read from the run directory by path: the teacher weights, the
importance scores, the token tensors and the teacher-logit cache, so trials share them and hold no teacher.

Where a trial runs: with `gpus_per_trial > 0` on the CUDA device Ray assigned it (Ray's CUDA_VISIBLE_DEVICES leaves
only that GPU, so it is `cuda:0`), fp32 weights and bf16 compute; it refuses at once, with one `FATAL_KEY` report,
when no CUDA device is visible. Every report carries the `PLACEMENT_KEYS`. The trial's stdout and stderr, at the
file-descriptor level (C libraries included), go to `protocol.trial_log_path`.

What a trial leaves on disk: its result JSON (`trial_result_path`) and, written just before it, its trained
student (`trial_weights_path`); its checkpoints live in a scratch directory on its node (`trial_scratch_dir`) only
until Ray has copied them into the run directory, and the scratch directory is removed when the trial ends.

Fault injection for tests (environment variables, ignored unless set):
  NAS_MINITRON_FAULT_NAN=<arch name>      the loss of that candidate becomes NaN at the first step
  NAS_MINITRON_FAULT_KILL=<arch name>     that trial's process dies after its first checkpoint, once per run dir;
                                          `first` kills whichever trial checkpoints first
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import signal
import socket
import sys
import time
import traceback
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nas_minitron._lazy import lazy_import
from nas_minitron.arch import ArchConfig
from nas_minitron.artifacts import reading
from nas_minitron.atomic import atomic_directory, write_json_atomic
from nas_minitron.distill.checkpoint import latest_checkpoint
from nas_minitron.distill.config import (
    GRAD_CHECKPOINTING_PARAMS,
    DistillConfig,
    DistillResult,
    EvalPoint,
    NonFiniteLossError,
)
from nas_minitron.distill.logit_cache import LogitCache
from nas_minitron.distill.trainer import distill
from nas_minitron.errors import UserError
from nas_minitron.integrity import write_checksums
from nas_minitron.prune.plan import PLAN_FILE, PruningPlan
from nas_minitron.prune.scores import ImportanceScores
from nas_minitron.prune.sliced import is_safetensors_dir
from nas_minitron.prune.student import build_student
from nas_minitron.search.protocol import (
    FAILED_KEY,
    FATAL_KEY,
    FINAL_KEY,
    Report,
    TrialSpec,
    rung_checkpoint_dir,
    rung_result_path,
    trial_log_path,
    trial_result_path,
    trial_scratch_dir,
    trial_weights_path,
)
from nas_minitron.tokens import open_tokens

if TYPE_CHECKING:
    import torch
    import transformers
    from transformers import PreTrainedModel
else:
    torch = lazy_import("torch")
    transformers = lazy_import("transformers")

__all__ = ["TrialRefused", "export_rung_weights", "placement", "redirect_output", "run_candidate", "run_rung",
           "trial_device"]


class TrialRefused(RuntimeError):
    """A trial that cannot run where Ray placed it (its message is one line naming the fault and the fix)."""


def trial_device(spec: TrialSpec, gpu_ids: Sequence[str] = ()) -> str:
    """`cpu`, or `cuda:0` for a trial that reserved GPUs (Ray's CUDA_VISIBLE_DEVICES leaves only its own).

    Raises TrialRefused when the trial reserved a GPU and torch sees none: training on the CPU instead would be
    silently orders of magnitude slower.
    """
    if spec.gpus_per_trial <= 0:
        return "cpu"
    if not torch.cuda.is_available():
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        raise TrialRefused(
            f"a trial reserved --gpus-per-trial {spec.gpus_per_trial:g} (Ray GPU ids {list(gpu_ids)}, "
            f"CUDA_VISIBLE_DEVICES={visible!r}) on node {socket.gethostname()}, but torch {torch.__version__} sees "
            f"no CUDA device (CUDA build: {torch.version.cuda or 'none'}); install a CUDA build of torch on every "
            f"GPU node, or pass --gpus-per-trial 0."
        )
    return "cuda:0"


def placement(student: torch.nn.Module, config: DistillConfig, gpu_ids: Sequence[str] = ()) -> dict[str, str]:
    """Where and in what precision a trial trains: the `PLACEMENT_KEYS` of its reports."""
    param = next(student.parameters())
    param_dtype = str(param.dtype).removeprefix("torch.")
    return {"device": str(param.device), "gpu_ids": ",".join(str(g) for g in gpu_ids), "param_dtype": param_dtype,
            "compute_dtype": "bfloat16" if config.dtype == "bf16" else param_dtype}


@contextlib.contextmanager
def redirect_output(path: Path) -> Iterator[None]:
    """Send this process's stdout and stderr (file descriptors 1 and 2) to `path`, appended, while inside.

    At the descriptor level, so that C extensions and libraries that write to the descriptors land there too; an
    exception leaving the block is written there with its traceback before the descriptors are restored.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    streams = sys.stdout, sys.stderr
    for stream in streams:
        stream.flush()
    saved = os.dup(1), os.dup(2)
    target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        os.dup2(target, 1)
        os.dup2(target, 2)
        # Python's own streams on the redirected descriptors, whatever sys.stdout was (a harness may replace it)
        with open(1, "w", buffering=1, closefd=False) as out, open(2, "w", buffering=1, closefd=False) as err:
            sys.stdout, sys.stderr = out, err
            try:
                yield
            except BaseException:
                traceback.print_exc()
                raise
            finally:
                sys.stdout, sys.stderr = streams
    finally:
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in (target, *saved):
            os.close(fd)


def _build(arch_name: str, spec: TrialSpec, device: str) -> tuple[PreTrainedModel, PruningPlan, PreTrainedModel | None]:
    """(student on `device` in fp32, its pruning plan, the teacher on `device` when the trial has no logit cache)."""
    arch = ArchConfig.parse(arch_name, spec.head_dim)
    scores = ImportanceScores.load(spec.importance_dir)
    teacher: PreTrainedModel | None = None
    if not spec.logit_cache_dir:  # no cache: the trial distills from the live teacher (float32 on CPU; bf16 on GPU)
        teacher = transformers.AutoModelForCausalLM.from_pretrained(spec.teacher_dir, dtype=torch.float32)
    if is_safetensors_dir(spec.teacher_dir):
        # Cut from the teacher's files straight onto the trial's device in fp32, as prune and the winners do.
        student, plan = build_student(spec.teacher_dir, spec.teacher_dir, arch, scores, depth_method=spec.depth_method,
                                      rescale_norms=spec.rescale_norms, device=device, dtype=torch.float32)
    else:  # weights not in safetensors files: cut from the loaded teacher
        source = teacher or transformers.AutoModelForCausalLM.from_pretrained(spec.teacher_dir, dtype=torch.float32)
        student, plan = build_student(source, spec.teacher_dir, arch, scores, depth_method=spec.depth_method,
                                      rescale_norms=spec.rescale_norms)
    # fp32 master weights whatever the checkpoint's dtype: bf16 parameters would round small updates away.
    student.to(device=device, dtype=torch.float32)  # type: ignore[call-arg]  # transformers' wrapped `to`
    if os.environ.get("NAS_MINITRON_FAULT_NAN") == arch_name:
        with torch.no_grad():
            student.model.norm.weight.fill_(float("nan"))
    if teacher is None or spec.logit_cache_dir:
        return student, plan, None  # the cache holds the teacher's targets: the teacher is not kept
    teacher.to(device)  # type: ignore[arg-type]
    teacher.eval().requires_grad_(False)
    return student, plan, teacher


def _student(arch_name: str, spec: TrialSpec) -> PreTrainedModel:
    """The student a trial of `arch_name` trains, on the CPU (tests compare it with the winners' build)."""
    return _build(arch_name, spec, "cpu")[0]


def _maybe_kill(arch_name: str, spec: TrialSpec) -> None:
    if os.environ.get("NAS_MINITRON_FAULT_KILL") not in (arch_name, "first"):
        return
    marker = Path(spec.run_dir) / "trial_results" / ".killed"
    if marker.exists():
        return
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text("killed once\n")
    os.kill(os.getpid(), signal.SIGKILL)


def _maybe_hang(spec: TrialSpec) -> None:
    """Test hook: the first trial that reports a checkpoint after another candidate finished stops there (its
    driver is then killed by the test, `tests/pipeline/test_search_cli.py`)."""
    if os.environ.get("NAS_MINITRON_FAULT_HANG") != "after_one_result":
        return
    results = Path(spec.run_dir) / "trial_results"
    if not list(results.glob("*.json")) or (results / ".hung").exists():
        return
    (results / ".hung").write_text("hung once\n")
    time.sleep(3600)


def _distill(student: PreTrainedModel, spec: TrialSpec, teacher: PreTrainedModel | None,
             **kwargs: Any) -> DistillResult:
    """The trainer on the spec's streams and logit cache (read by path, as every trial reads them)."""
    cache = LogitCache.open(spec.logit_cache_dir) if spec.logit_cache_dir else None
    config = spec.distill
    if sum(p.numel() for p in student.parameters()) >= GRAD_CHECKPOINTING_PARAMS:
        config = dataclasses.replace(config, grad_checkpointing=True)  # as the full distillation does; same numbers
    return distill(student, open_tokens(spec.train_path).batches(config.batch_size),
                   open_tokens(spec.val_path).tensor(), config,
                   teacher=teacher, logit_cache=cache, **kwargs)


def _save_weights(student: PreTrainedModel, plan: PruningPlan, folder: Path) -> None:
    """The trained student, from_pretrained-loadable, with its pruning plan and their checksums; all or nothing."""
    with atomic_directory(folder, overwrite=True) as tmp:
        student.save_pretrained(tmp)
        (tmp / PLAN_FILE).write_text(json.dumps(plan.to_dict(), indent=1) + "\n")
        write_checksums(tmp)


def run_candidate(arch_name: str, spec: TrialSpec, report: Report, resume_dir: Path | None, *, trial_id: str = "",
                  gpu_ids: Sequence[str] = ()) -> None:
    """Distill `arch_name` for the spec's short budget, reporting validation metrics at every eval point.

    The report at the last step carries `final` (and is the last report); a trial stopped early never sends it.
    A trial that cannot run where it was placed sends one report carrying `fatal` and returns. Its output goes to
    its log file (appended) while it runs.
    """
    torch.set_num_threads(max(1, spec.cpus_per_trial))
    with redirect_output(trial_log_path(spec.run_dir, arch_name)):
        print(f"=== trial {trial_id or '-'} of {arch_name}: pid {os.getpid()} on {socket.gethostname()}, "
              f"Ray GPU ids {list(gpu_ids)}, resumed from a checkpoint: {resume_dir is not None}", flush=True)
        try:
            device = trial_device(spec, gpu_ids)
            scratch = trial_scratch_dir(spec.scratch_dir, spec.run_dir, trial_id)
            try:  # what a killed attempt of this trial left here is stale: Ray's copy is what resumes
                shutil.rmtree(scratch, ignore_errors=True)
                scratch.mkdir(parents=True)
            except OSError as err:
                raise TrialRefused(
                    f"cannot write the trial checkpoint directory {str(scratch)!r} on node {socket.gethostname()}: "
                    f"{err.strerror or err}; choose another --scratch-dir.") from None
        except TrialRefused as err:
            _refuse(arch_name, spec, report, err)
            return
        try:
            _train(arch_name, spec, report, resume_dir, device, scratch, gpu_ids)
        except UserError as err:  # a damaged or inconsistent input (cache, checkpoint, scores): every trial would
            _refuse(arch_name, spec, report, err)  # hit it, so the search stops with its one line
        finally:
            shutil.rmtree(scratch, ignore_errors=True)  # its parent (the run's, shared by this node's trials) stays:
            # removing it could race another trial's mkdir of its own folder inside it


def _refuse(arch_name: str, spec: TrialSpec, report: Report, err: TrialRefused | UserError) -> None:
    print(f"trial refused: {err}", flush=True)
    report({"arch": arch_name, **spec.shape_objectives.get(arch_name, {}), FATAL_KEY: str(err), FAILED_KEY: True,
            FINAL_KEY: False, "error": str(err), "val_kl": float("inf"), "val_loss": float("inf")}, None)


def run_rung(arch_name: str, spec: TrialSpec, rung: int, tokens: int, report: Report, *, trial_id: str = "",
             gpu_ids: Sequence[str] = ()) -> bool:
    """One candidate at one rung of the successive-halving search: train it to `tokens` and validate it there.

    Rung 0 (`tokens` 0) only builds the pruned student and validates it. A later rung continues from the
    candidate's checkpoint of the rung before (`rung_checkpoint_dir`; the pruned init at rung 1), under the
    schedule over the whole `spec.distill.num_tokens`, and leaves a checkpoint at `tokens` for the next rung. The
    result (one report carrying `final`, with per-sequence validation values) is also written to
    `rung_result_path` before it is reported; a trial restarted after it was written only reports it again.
    Returns False when it reported `fatal` (the trial cannot run here, or an input is damaged): its batch stops.
    """
    torch.set_num_threads(max(1, spec.cpus_per_trial))
    with redirect_output(trial_log_path(spec.run_dir, arch_name)):
        print(f"=== rung {rung} ({tokens} tokens), trial {trial_id or '-'} of {arch_name}: pid {os.getpid()} on "
              f"{socket.gethostname()}, Ray GPU ids {list(gpu_ids)}", flush=True)
        try:
            device = trial_device(spec, gpu_ids)
        except TrialRefused as err:
            _refuse(arch_name, spec, report, err)
            return False
        done = rung_result_path(spec.run_dir, rung, arch_name)
        try:
            if done.is_file():
                with reading(done, "rung result", "delete it to run that candidate's rung again"):
                    metrics = json.loads(done.read_text())["metrics"]
                report({**metrics, FINAL_KEY: True}, None)
                return True
            _train_rung(arch_name, spec, rung, tokens, report, device, gpu_ids)
        except UserError as err:  # a damaged or inconsistent input: every trial would hit it
            _refuse(arch_name, spec, report, err)
            return False
    return True


def _train_rung(arch_name: str, spec: TrialSpec, rung: int, tokens: int, report: Report, device: str,
                gpu_ids: Sequence[str]) -> None:
    config = spec.distill
    stop = tokens // config.tokens_per_step()
    started = time.perf_counter()  # the rung's trial-seconds: building the student, training, validating
    student, plan, teacher = _build(arch_name, spec, device)
    where = placement(student, config, gpu_ids)
    print(f"training on {where['device']} with {where['param_dtype']} parameters, {where['compute_dtype']} compute, "
          f"to step {stop} of {config.num_steps()}", flush=True)
    base = {"arch": arch_name, **spec.shape_objectives.get(arch_name, {}),
            "params": sum(p.numel() for p in student.parameters()), FAILED_KEY: False, **where}
    folder = rung_checkpoint_dir(spec.run_dir, arch_name) if stop > 0 else None
    if folder is not None:
        folder.mkdir(parents=True, exist_ok=True)
        write_json_atomic(folder / PLAN_FILE, plan.to_dict())
    try:
        result = _distill(student, spec, teacher, checkpoint_dir=folder, resume=folder is not None,
                          stop_at_step=stop,
                          evaluate_start=stop == 0)  # rung 0 is the step-0 validation; later rungs: only their end
    except NonFiniteLossError as err:
        report({**base, FAILED_KEY: True, FINAL_KEY: True, "rung": rung, "rung_tokens": tokens, "error": str(err),
                "val_kl": float("inf"), "val_loss": float("inf")}, None)
        return
    point = result.curve[-1]
    if point.step != stop:
        raise RuntimeError(f"rung {rung} of {arch_name} ended at step {point.step}, not {stop}")
    metrics = {**base, **point.to_dict(), "rung": rung, "rung_tokens": tokens,
               "rung_wall_s": time.perf_counter() - started, FINAL_KEY: True}
    write_json_atomic(rung_result_path(spec.run_dir, rung, arch_name),
                      {"arch": arch_name, "rung": rung, "tokens": tokens, "metrics": metrics})
    report(metrics, None)


def export_rung_weights(run_dir: str | Path, arch_name: str, rung: int, tokens: int) -> Path:
    """Turn a candidate's last rung checkpoint into its trial weights (`trial_weights_path`, from_pretrained-
    loadable with the pruning plan) and its `trial_result_path` record, as a finished trial leaves them: the
    winners' full distillation continues from there. Returns the weights folder."""
    folder = rung_checkpoint_dir(run_dir, arch_name)
    latest = latest_checkpoint(folder)
    if latest is None:
        raise FileNotFoundError(f"no rung checkpoint of {arch_name} in {folder}")
    record = json.loads(rung_result_path(run_dir, rung, arch_name).read_text())
    weights = trial_weights_path(run_dir, arch_name)
    with atomic_directory(weights, overwrite=True) as tmp:
        for item in (latest / "student").iterdir():
            shutil.copy2(item, tmp / item.name)
        shutil.copy2(folder / PLAN_FILE, tmp / PLAN_FILE)
        write_checksums(tmp)
    write_json_atomic(trial_result_path(run_dir, arch_name), {
        "arch": arch_name, "trial_dir": str(latest), "final": record["metrics"], "curve": [record["metrics"]],
        "weights": {"path": str(weights.relative_to(Path(run_dir))), "num_tokens": tokens}})
    return weights


def _train(arch_name: str, spec: TrialSpec, report: Report, resume_dir: Path | None, device: str, scratch: Path,
           gpu_ids: Sequence[str]) -> None:
    done = trial_result_path(spec.run_dir, arch_name)
    if done.is_file():  # finished before (a re-proposal, or a trial restored after a driver crash): never rerun
        with reading(done, "trial result", "delete it to train that candidate again"):
            record = json.loads(done.read_text())
        report({**record["final"], "reused_from": record["trial_dir"], FINAL_KEY: True}, None)
        return
    student, plan, teacher = _build(arch_name, spec, device)
    params = sum(p.numel() for p in student.parameters())
    config = spec.distill
    where = placement(student, config, gpu_ids)
    print(f"training on {where['device']} with {where['param_dtype']} parameters, {where['compute_dtype']} compute",
          flush=True)
    base = {"arch": arch_name, **spec.shape_objectives.get(arch_name, {}), "params": params, FAILED_KEY: False,
            FINAL_KEY: False, **where}
    curve: list[dict[str, Any]] = []
    resumed_from = 0
    if resume_dir is not None:
        # Ray hands back the step directory's contents under a name of its own; the trainer looks for `step-*`
        # directories and reads the real step from the state inside.
        shutil.copytree(resume_dir, scratch / "step-00000000")
        state = json.loads((resume_dir / "state.json").read_text())
        resumed_from, curve = int(state["step"]), list(state["curve"])
    checkpoints: list[Path] = []
    last_step = config.num_steps()  # trials run in one process
    weights = trial_weights_path(spec.run_dir, arch_name)

    def on_checkpoint(path: Path) -> None:  # distill checkpoints first, then calls on_eval for the same step
        checkpoints.append(path)

    def on_eval(point: EvalPoint) -> None:
        checkpoint = checkpoints.pop() if checkpoints else None  # none at step 0 (the untrained ranking)
        curve.append(point.to_dict())
        metrics = {**base, **point.to_dict()}
        if point.step == last_step:
            # The last step: this report is the trial's final one. A scheduler stops a trial as soon as it reports
            # its whole budget (ASHA: time_attr >= max_t), so nothing may come after it; the weights and then the
            # result are kept first, so a re-proposal of this candidate is never retrained and a result never
            # names weights that are not there.
            metrics.update({FINAL_KEY: True, "resumed_from_step": resumed_from})
            _save_weights(student, plan, weights)
            write_json_atomic(done, {"arch": arch_name, "trial_dir": os.getcwd(), "final": metrics, "curve": curve,
                                     "weights": {"path": str(weights.relative_to(Path(spec.run_dir))),
                                                 "num_tokens": point.num_tokens}})
            if checkpoint is not None:  # the trained weights are kept: a checkpoint of a finished trial is waste
                shutil.rmtree(checkpoint, ignore_errors=True)
                checkpoint = None
        try:
            report(metrics, checkpoint)
        finally:  # also when Ray stops the trial inside report (ASHA, a fatal stop): no checkpoint left behind
            if checkpoint is not None:
                shutil.rmtree(checkpoint, ignore_errors=True)  # Ray copied it into the run directory during report
        if checkpoint is not None:
            _maybe_kill(arch_name, spec)
            _maybe_hang(spec)

    try:
        _distill(student, spec, teacher, checkpoint_dir=scratch, resume=resume_dir is not None, on_eval=on_eval,
                 on_checkpoint=on_checkpoint)
    except NonFiniteLossError as err:
        # Ends the trial normally so Ray does not retry it; searcher.py tells Optuna FAIL for `failed`.
        report({**base, FAILED_KEY: True, "error": str(err), "val_kl": float("inf"), "val_loss": float("inf")}, None)
