"""The trial side of the search without the CLI: placement, per-trial logs, lean checkpoints, trial weights.

The worker runs for real on tiny models (no Ray in it, a `report` standing in for Tune's that copies each checkpoint
as Tune does); the Ray pieces (the weights keeper, the per-node GPU check) run on real Ray objects.
"""

from __future__ import annotations

import contextlib
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from nas_minitron.data import save_sequences
from nas_minitron.distill.config import DistillConfig
from nas_minitron.errors import UserError
from nas_minitron.search.protocol import (
    FATAL_KEY,
    FINAL_KEY,
    PLACEMENT_KEYS,
    TrialSpec,
    trial_log_path,
    trial_result_path,
    trial_scratch_dir,
    trial_weights_path,
)

ARCH = "L2-H48-I64-A2-KV1"
SEQ_LEN, BATCH = 16, 2


def _spec(run_dir: Path, teacher_dir: Path, **overrides: Any) -> TrialSpec:
    """A real trial spec: the tiny teacher's magnitude scores, token files, a 4-step distillation (no logit cache:
    the trial keeps the teacher)."""
    from transformers import AutoModelForCausalLM

    from nas_minitron.prune.baselines import magnitude_scores

    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir)
    (run_dir / "importance").mkdir(parents=True)
    magnitude_scores(teacher).save(run_dir / "importance")
    tokens = torch.randint(4, 1024, (12, SEQ_LEN), generator=torch.Generator().manual_seed(0))  # [12, T]
    save_sequences(run_dir / "train.safetensors", tokens[:8])
    save_sequences(run_dir / "val.safetensors", tokens[8:])
    config = DistillConfig(num_tokens=4 * SEQ_LEN * BATCH, seq_len=SEQ_LEN, batch_size=BATCH, lr=1e-3,
                           num_val_sequences=4, eval_every_tokens=SEQ_LEN * BATCH, keep_last_k=1)
    fields: dict[str, Any] = dict(
        run_dir=str(run_dir), teacher_dir=str(teacher_dir), importance_dir=str(run_dir / "importance"),
        train_path=str(run_dir / "train.safetensors"), val_path=str(run_dir / "val.safetensors"),
        logit_cache_dir=None, candidates=(ARCH,), head_dim=16, distill=config, scratch_dir=str(run_dir / "scratch"))
    fields.update(overrides)
    return TrialSpec(**fields)


class _FakeTune:
    """Stands in for Tune's report: keeps every report, and copies each checkpoint as Tune does before returning,
    counting the trial's checkpoints in its scratch directory at that moment."""

    def __init__(self, spec: TrialSpec, trial_id: str, copies: Path) -> None:
        self.reports: list[dict[str, Any]] = []
        self.scratch = trial_scratch_dir(spec.scratch_dir, spec.run_dir, trial_id)
        self.copies = copies
        self.in_scratch: list[int] = []

    def __call__(self, metrics: dict[str, Any], checkpoint: Path | None) -> None:
        self.reports.append(dict(metrics))
        if checkpoint is not None:
            self.in_scratch.append(len(list(self.scratch.glob("step-*"))))
            shutil.copytree(checkpoint, self.copies / f"checkpoint_{len(self.reports):06d}")


def test_a_trial_trains_logs_keeps_its_weights_and_leaves_no_checkpoint(
    tiny_teacher_dir: Path, tmp_path: Path, one_torch_thread: None
) -> None:
    from transformers import AutoModelForCausalLM

    from nas_minitron.data import load_sequences
    from nas_minitron.distill.objective import validate
    from nas_minitron.prune.plan import PLAN_FILE
    from nas_minitron.search.worker import run_candidate

    spec = _spec(tmp_path / "run", tiny_teacher_dir)
    tune = _FakeTune(spec, "t1", tmp_path / "ray_copies")
    run_candidate(ARCH, spec, tune, None, trial_id="t1")
    final = tune.reports[-1]
    assert final[FINAL_KEY] and final["step"] == 4 and not final.get(FATAL_KEY)
    # where it ran, in every report
    assert all({k: r[k] for k in PLACEMENT_KEYS} == {"device": "cpu", "gpu_ids": "", "param_dtype": "float32",
                                                     "compute_dtype": "float32"} for r in tune.reports)
    # lean checkpoints: one in scratch at each report before the last (the final report carries none: the trained
    # weights are kept instead), none once the trial has ended
    assert tune.in_scratch == [1, 1, 1] and tune.reports[-1][FINAL_KEY]
    assert not tune.scratch.exists()
    # the log file holds the trial's own lines
    log = trial_log_path(spec.run_dir, ARCH).read_text()
    assert "trial t1 of " + ARCH in log and "training on cpu with float32 parameters" in log
    # the weights are written before the result, loadable, and are the model the trial scored
    record = json.loads(trial_result_path(spec.run_dir, ARCH).read_text())
    weights = trial_weights_path(spec.run_dir, ARCH)
    assert record["weights"] == {"path": f"trial_results/{ARCH}", "num_tokens": final["num_tokens"]}
    assert (weights / PLAN_FILE).is_file()
    model = AutoModelForCausalLM.from_pretrained(weights)
    assert sum(p.numel() for p in model.parameters()) == final["params"]
    val = load_sequences(spec.val_path)
    val_loss, _ = validate(model, val, None, None, BATCH, contextlib.nullcontext)
    assert math.isclose(val_loss, final["val_loss"], rel_tol=1e-5)
    untrained = tune.reports[0]["val_loss"]
    assert not math.isclose(val_loss, untrained, rel_tol=1e-5)  # trained weights, not the pruned student's
    # a second trial of the same candidate reuses the result (and appends to the same log)
    again = _FakeTune(spec, "t2", tmp_path / "ray_copies2")
    run_candidate(ARCH, spec, again, None, trial_id="t2")
    assert len(again.reports) == 1 and again.reports[0]["val_loss"] == final["val_loss"]
    assert "trial t1 of" in trial_log_path(spec.run_dir, ARCH).read_text()


def test_a_trial_resumes_from_tunes_copy_of_its_checkpoint(
    tiny_teacher_dir: Path, tmp_path: Path, one_torch_thread: None
) -> None:
    """A trial killed after step 2 restarts from Tune's copy (its scratch copy is long gone) and ends where an
    uninterrupted one ends."""
    from nas_minitron.search.worker import run_candidate

    spec = _spec(tmp_path / "run", tiny_teacher_dir)
    full = _FakeTune(spec, "a", tmp_path / "copies_a")
    run_candidate(ARCH, spec, full, None, trial_id="a")
    trial_result_path(spec.run_dir, ARCH).unlink()  # so that the next trial trains instead of reusing it
    resumed = _FakeTune(spec, "b", tmp_path / "copies_b")
    second = sorted(full.copies.iterdir())[1]  # Tune's copy of the step-2 checkpoint
    run_candidate(ARCH, spec, resumed, second, trial_id="b")
    assert resumed.reports[0]["step"] == 3 and resumed.reports[-1]["resumed_from_step"] == 2
    assert math.isclose(resumed.reports[-1]["val_loss"], full.reports[-1]["val_loss"], rel_tol=1e-6)
    assert resumed.in_scratch == [1]  # the resumed copy was replaced, not kept beside the new one


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for a machine without CUDA")
def test_a_trial_that_reserved_a_gpu_it_cannot_see_refuses_at_once(
    tiny_teacher_dir: Path, tmp_path: Path
) -> None:
    from nas_minitron.search.worker import run_candidate

    spec = _spec(tmp_path / "run", tiny_teacher_dir, gpus_per_trial=1.0)
    tune = _FakeTune(spec, "g", tmp_path / "copies")
    run_candidate(ARCH, spec, tune, None, trial_id="g", gpu_ids=["0"])
    assert len(tune.reports) == 1
    message = tune.reports[0][FATAL_KEY]
    assert "--gpus-per-trial 1" in message and "Ray GPU ids ['0']" in message and "no CUDA device" in message
    assert "\n" not in message
    assert not trial_result_path(spec.run_dir, ARCH).exists()  # nothing trained, nothing kept
    assert "trial refused" in trial_log_path(spec.run_dir, ARCH).read_text()


def test_a_damaged_input_in_a_trial_stops_the_search_with_one_line(tiny_teacher_dir: Path, tmp_path: Path) -> None:
    """A file that fails its check inside a trial (here the importance scores, truncated; a logit cache or a
    checkpoint take the same path) is reported `fatal`, which ends the search with that line: every other trial
    would hit it too. The rung path does the same, and a rung batch stops at the first such candidate."""
    from nas_minitron.search.worker import run_candidate, run_rung

    spec = _spec(tmp_path / "run", tiny_teacher_dir)
    scores = next((tmp_path / "run" / "importance").glob("*.safetensors"))
    scores.write_bytes(scores.read_bytes()[:100])
    tune = _FakeTune(spec, "d", tmp_path / "copies")
    run_candidate(ARCH, spec, tune, None, trial_id="d")
    assert len(tune.reports) == 1
    message = tune.reports[0][FATAL_KEY]
    assert str(scores) in message and "cannot read importance scores" in message and "\n" not in message, message
    assert not trial_result_path(spec.run_dir, ARCH).exists()
    rung_reports: list[dict[str, Any]] = []
    assert run_rung(ARCH, spec, 0, 0, lambda m, _c: rung_reports.append(m), trial_id="r") is False
    assert len(rung_reports) == 1 and str(scores) in rung_reports[0][FATAL_KEY]


def test_an_unwritable_scratch_dir_refuses_the_trial(tiny_teacher_dir: Path, tmp_path: Path) -> None:
    from nas_minitron.search.worker import run_candidate

    (tmp_path / "file").write_text("not a directory")
    spec = _spec(tmp_path / "run", tiny_teacher_dir, scratch_dir=str(tmp_path / "file"))
    tune = _FakeTune(spec, "s", tmp_path / "copies")
    run_candidate(ARCH, spec, tune, None, trial_id="s")
    assert len(tune.reports) == 1 and "--scratch-dir" in tune.reports[0][FATAL_KEY]


_REDIRECTED = """
import os, subprocess, sys
from pathlib import Path
from nas_minitron.search.worker import redirect_output
log = Path(sys.argv[1])
with redirect_output(log):
    print("from python")
    sys.stderr.write("from stderr\\n")
    os.write(1, b"from fd 1\\n")
    subprocess.run(["sh", "-c", "echo from a child; echo child stderr >&2"], check=True)
print("after, on the console")
try:
    with redirect_output(log):
        raise ValueError("boom")
except ValueError:
    pass
"""


def test_output_is_captured_at_the_descriptor_level(tmp_path: Path) -> None:
    """In a fresh interpreter, as in a Ray worker (pytest's own capture replaces sys.stdout here)."""
    log = tmp_path / "logs" / "a.log"
    log.parent.mkdir()
    log.write_text("earlier\n")
    result = subprocess.run([sys.executable, "-c", _REDIRECTED, str(log)], capture_output=True, text=True,
                            timeout=300, check=True)
    text = log.read_text()
    for line in ("earlier", "from python", "from stderr", "from fd 1", "from a child", "child stderr",
                 "ValueError: boom"):
        assert line in text, line
    assert "after, on the console" in result.stdout and "after" not in text
    assert "from" not in result.stdout + result.stderr


def _finished(run_dir: Path, arch: str, val_kl: float, params: int) -> None:
    """A finished trial's files as the worker leaves them: weights, then the result."""
    folder = trial_weights_path(run_dir, arch)
    folder.mkdir(parents=True)
    (folder / "model.safetensors").write_text("weights")
    trial_result_path(run_dir, arch).write_text(json.dumps(
        {"arch": arch, "final": {"val_kl": val_kl, "params": params, "final": True, "failed": False}}))


def test_weights_are_kept_only_for_candidates_that_can_still_win(tmp_path: Path) -> None:
    from nas_minitron.search.callbacks import WeightsKeeper

    shape = {"a": {"params": 10.0}, "b": {"params": 12.0}, "c": {"params": 8.0}, "d": {"params": 9.0}}
    single = WeightsKeeper(str(tmp_path / "one"), ["val_kl"], 2, shape)
    _finished(tmp_path / "one", "a", 0.5, 10)
    _finished(tmp_path / "one", "b", 0.3, 12)
    assert single.prune() == []  # two winners wanted, two finished
    _finished(tmp_path / "one", "c", 0.4, 8)
    assert single.prune() == ["a"]
    _finished(tmp_path / "one", "d", 0.9, 9)
    assert single.prune() == ["d"]
    assert sorted(p.name for p in (tmp_path / "one" / "trial_results").iterdir() if p.is_dir()) == ["b", "c"]
    # two objectives: the Pareto front stays, although only one winner is wanted
    multi = WeightsKeeper(str(tmp_path / "two"), ["val_kl", "params"], 1, shape)
    for arch, kl in (("a", 0.5), ("b", 0.3), ("c", 0.4), ("d", 0.35)):
        _finished(tmp_path / "two", arch, kl, int(shape[arch]["params"]))
    assert multi.prune() == ["a"]  # dominated by c (0.4 < 0.5, 8 < 10); b, c and d are each best somewhere
    assert {p.name for p in (tmp_path / "two" / "trial_results").iterdir() if p.is_dir()} == {"b", "c", "d"}


def test_gpus_per_trial_is_checked_against_the_largest_node() -> None:
    """Two simulated nodes of one GPU each: 2 GPUs in the cluster, but no trial can hold 2."""
    from ray.cluster_utils import Cluster

    from nas_minitron.search.tune import check_resources, largest_node_gpus

    loopback: dict[str, Any] = {"node_ip_address": "127.0.0.1", "num_cpus": 1, "num_gpus": 1}
    cluster = Cluster(initialize_head=True, head_node_args={**loopback, "include_dashboard": False})
    try:
        cluster.add_node(**loopback)
        import ray

        ray.init(address=cluster.address)
        cluster.wait_for_nodes()
        assert ray.cluster_resources().get("GPU") == 2 and largest_node_gpus() == 1
        check_resources(1, 1, 0)
        check_resources(1, 0.5, 0)
        with pytest.raises(UserError, match=r"--gpus-per-trial 2 but the largest node .* has 1 GPUs"):
            check_resources(1, 2, 0)
        with pytest.raises(UserError, match=r"--gpus-per-trial must be >= 0"):
            check_resources(1, -1, 0)
    finally:
        import ray

        ray.shutdown()
        cluster.shutdown()


def test_scratch_dir_is_checked_writable_before_work(tmp_path: Path) -> None:
    from nas_minitron.pipeline.runner import _check_scratch_dir

    _check_scratch_dir(None)
    _check_scratch_dir(str(tmp_path / "new" / "scratch"))  # creatable
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match=r"--scratch-dir '.*file' is a file"):
        _check_scratch_dir(str(tmp_path / "file"))
    with pytest.raises(UserError, match=r"--scratch-dir '.*file/sub' is not writable"):
        _check_scratch_dir(str(tmp_path / "file" / "sub"))
