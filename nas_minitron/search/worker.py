"""One search trial without Ray in it: prune a candidate from the teacher and distill it briefly.

`tune.py` wraps `run_candidate` in a Ray Tune trainable and passes `report`, which sends metrics (and a
checkpoint directory) to Tune. Everything heavy is read from the run directory by path: the teacher weights, the
importance scores, the token tensors and the teacher-logit cache, so trials share them and hold no teacher.

Fault injection for tests (environment variables, ignored unless set):
  NAS_MINITRON_FAULT_NAN=<arch name>      the loss of that candidate becomes NaN at the first step
  NAS_MINITRON_FAULT_KILL=<arch name>     that trial's process dies after its first checkpoint, once per run dir;
                                          `first` kills whichever trial checkpoints first
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nas_minitron._lazy import lazy_import
from nas_minitron.arch import ArchConfig
from nas_minitron.atomic import write_json_atomic
from nas_minitron.data import load_sequences
from nas_minitron.distill.config import EvalPoint, NonFiniteLossError
from nas_minitron.distill.logit_cache import LogitCache
from nas_minitron.distill.trainer import distill
from nas_minitron.prune.scores import ImportanceScores
from nas_minitron.prune.student import build_student
from nas_minitron.search.protocol import FAILED_KEY, FINAL_KEY, Report, TrialSpec, trial_result_path

if TYPE_CHECKING:
    import torch
    import transformers
    from transformers import PreTrainedModel
else:
    torch = lazy_import("torch")
    transformers = lazy_import("transformers")

__all__ = ["run_candidate"]


def _student(arch_name: str, spec: TrialSpec) -> PreTrainedModel:
    teacher = transformers.AutoModelForCausalLM.from_pretrained(spec.teacher_dir)
    arch = ArchConfig.parse(arch_name, spec.head_dim)
    student, _ = build_student(teacher, spec.teacher_dir, arch, ImportanceScores.load(spec.importance_dir),
                               depth_method=spec.depth_method, rescale_norms=spec.rescale_norms)
    if os.environ.get("NAS_MINITRON_FAULT_NAN") == arch_name:
        with torch.no_grad():
            student.model.norm.weight.fill_(float("nan"))
    return student


def _maybe_kill(arch_name: str, spec: TrialSpec) -> None:
    if os.environ.get("NAS_MINITRON_FAULT_KILL") not in (arch_name, "first"):
        return
    marker = Path(spec.run_dir) / "trial_results" / ".killed"
    if marker.exists():
        return
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text("killed once\n")
    os.kill(os.getpid(), signal.SIGKILL)


def run_candidate(arch_name: str, spec: TrialSpec, report: Report, resume_dir: Path | None) -> None:
    """Distill `arch_name` for the spec's short budget, reporting validation metrics at every eval point.

    The report at the last step carries `final` (and is the last report); a trial stopped early never sends it.
    """
    torch.set_num_threads(max(1, spec.cpus_per_trial))
    done = trial_result_path(spec.run_dir, arch_name)
    if done.is_file():  # finished before (a re-proposal, or a trial restored after a driver crash): never rerun
        record = json.loads(done.read_text())
        report({**record["final"], "reused_from": record["trial_dir"], FINAL_KEY: True}, None)
        return
    student = _student(arch_name, spec)
    params = sum(p.numel() for p in student.parameters())
    config = spec.distill
    base = {"arch": arch_name, "params": params, FAILED_KEY: False, FINAL_KEY: False}
    work = Path(tempfile.mkdtemp(prefix="nasm-trial-"))
    curve: list[dict[str, Any]] = []
    resumed_from = 0
    if resume_dir is not None:
        # Ray hands back the step directory's contents under a name of its own; the trainer looks for `step-*`
        # directories and reads the real step from the state inside.
        shutil.copytree(resume_dir, work / "step-00000000")
        state = json.loads((resume_dir / "state.json").read_text())
        resumed_from, curve = int(state["step"]), list(state["curve"])
    checkpoints: list[Path] = []
    last_step = config.num_steps()  # trials run in one process

    def on_checkpoint(path: Path) -> None:  # distill checkpoints first, then calls on_eval for the same step
        checkpoints.append(path)

    def on_eval(point: EvalPoint) -> None:
        checkpoint = checkpoints.pop() if checkpoints else None  # none at step 0 (the untrained ranking)
        curve.append(point.to_dict())
        metrics = {**base, **point.to_dict()}
        if point.step == last_step:
            # The last step: this report is the trial's final one. A scheduler stops a trial as soon as it reports
            # its whole budget (ASHA: time_attr >= max_t), so nothing may come after it; the result is kept first,
            # so a re-proposal of this candidate is never retrained.
            metrics.update({FINAL_KEY: True, "resumed_from_step": resumed_from})
            write_json_atomic(done, {"arch": arch_name, "trial_dir": os.getcwd(), "final": metrics, "curve": curve})
        report(metrics, checkpoint)
        if checkpoint is not None:
            _maybe_kill(arch_name, spec)

    try:
        distill(
            student,
            load_sequences(spec.train_path),
            load_sequences(spec.val_path),
            config,
            logit_cache=LogitCache.open(spec.logit_cache_dir) if spec.logit_cache_dir else None,
            checkpoint_dir=work,
            resume=resume_dir is not None,
            on_eval=on_eval,
            on_checkpoint=on_checkpoint,
        )
    except NonFiniteLossError as err:
        # Ends the trial normally so Ray does not retry it; searcher.py tells Optuna FAIL for `failed`.
        report({**base, FAILED_KEY: True, "error": str(err), "val_kl": float("inf"), "val_loss": float("inf")}, None)
    finally:
        shutil.rmtree(work, ignore_errors=True)
