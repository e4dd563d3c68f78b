"""Ray Tune trials with Optuna proposals: the only module that imports ray and optuna.

Each Ray trial prunes one candidate and distills it briefly (`worker.run_candidate`); Optuna, inside Ray
Tune through `OptunaSearch`, proposes candidates from a define-by-run space that only yields in-budget ones
(`proposals.py`). The Optuna study lives in real storage (SQLite in the run directory by default), one Optuna trial
per Ray trial.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import shutil
import socket
import tempfile
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nas_minitron._lazy import lazy_import
from nas_minitron.arch import ArchConfig
from nas_minitron.errors import UserError, first_line
from nas_minitron.search.proposals import encode
from nas_minitron.search.protocol import (
    FAILED_KEY,
    FATAL_KEY,
    FINAL_KEY,
    SAMPLERS,
    TrialRecord,
    TrialSpec,
    trial_resume_dir,
)
from nas_minitron.search.records import carry_checkpoints, load_records, save_record, trial_status
from nas_minitron.search.winners import finite_objectives
from nas_minitron.search.worker import run_candidate
from nas_minitron.teacher import local_teacher_dir

if TYPE_CHECKING:
    import huggingface_hub
    import optuna
    import ray
    from ray import tune
    from ray.tune import schedulers

    from nas_minitron.search import callbacks, searcher
else:
    huggingface_hub = lazy_import("huggingface_hub")
    optuna = lazy_import("optuna")
    ray = lazy_import("ray")
    tune = lazy_import("ray.tune")
    schedulers = lazy_import("ray.tune.schedulers")
    searcher = lazy_import("nas_minitron.search.searcher")  # subclasses OptunaSearch: importing it loads ray
    callbacks = lazy_import("nas_minitron.search.callbacks")  # subclasses Tune's Callback: importing it loads ray

__all__ = ["check_resources", "check_run_dir_shared", "connect_ray", "fatal_message", "finish_study",
           "largest_node_gpus", "make_sampler", "num_alive_nodes", "optuna_numbers", "propose", "RayOptions",
           "record_rung", "reopen_unfinished", "run_rung_trials", "run_trials", "screening_study",
           "study_storage_url", "told_screen", "tpe_startup_trials", "trial_records"]

STUDY_NAME = "nas-minitron"
EXPERIMENT_NAME = "trials"


@dataclass(frozen=True)
class RayOptions:
    address: str | None = None  # None: start a local cluster bound to loopback
    num_cpus: int | None = None
    dashboard: bool = True
    max_concurrent: int = 1
    max_failures: int = 2
    sampler: str = "auto"  # auto | tpe | nsga2 | random
    asha: bool = False
    seed: int = 0
    storage_url: str | None = None


def study_storage_url(run_dir: str | os.PathLike[str], storage_url: str | None) -> str:
    return storage_url or f"sqlite:///{Path(run_dir).resolve() / 'optuna.db'}"


def _shown(storage_url: str) -> str:
    """A storage URL as a message may show it: without a password."""
    head, sep, tail = storage_url.partition("@")
    if not sep or "://" not in head:
        return repr(storage_url)
    scheme, _, user = head.partition("://")
    return repr(f"{scheme}://{user.split(':')[0]}@{tail}")


# Read by huggingface_hub, transformers and datasets on every node: caches, endpoint, offline mode, downloads.
HF_ENV = ("HF_HOME", "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_ASSETS_CACHE", "HF_XET_CACHE", "HF_DATASETS_CACHE",
          "TRANSFORMERS_CACHE", "HF_ENDPOINT", "HF_TOKEN_PATH", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE",
          "HF_DATASETS_OFFLINE", "HF_HUB_ENABLE_HF_TRANSFER", "HF_HUB_DISABLE_TELEMETRY", "HF_HUB_ETAG_TIMEOUT",
          "HF_HUB_DOWNLOAD_TIMEOUT")
# Secrets: never in the runtime_env (`_secret_hook` hands them over).
SECRET_ENV = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")


def _worker_env() -> dict[str, str]:
    """Environment variables the Ray workers must see (read at import time by HF libraries), secrets excepted.

    They travel as the job's runtime_env `env_vars`, which Ray keeps in its GCS and shows in the dashboard, the
    state API (`ray list jobs/actors/tasks --detail`) and its runtime-env logs: nothing secret may be among them."""
    keys = (*HF_ENV, "NAS_MINITRON_CACHE", "TRANSFORMERS_VERBOSITY", "TOKENIZERS_PARALLELISM", "PYTHONPATH")
    env = {k: v for k, v in os.environ.items() if k in keys or k.startswith("NAS_MINITRON_FAULT_")}
    env.setdefault("TRANSFORMERS_VERBOSITY", "error")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env


def _secret_env() -> dict[str, str]:
    """The driver's Hugging Face token, for the workers: HF_TOKEN / HUGGING_FACE_HUB_TOKEN as set, else the token
    file `huggingface-cli login` wrote on this machine (other nodes may have none)."""
    env = {k: os.environ[k] for k in SECRET_ENV if os.environ.get(k)}
    if not env and os.environ.get("HF_HUB_DISABLE_IMPLICIT_TOKEN", "").lower() not in ("1", "true", "yes"):
        token = huggingface_hub.get_token()
        if token:
            env["HF_TOKEN"] = token
    return env


def _secret_hook(secrets: dict[str, str]) -> Callable[[], None]:
    """A `worker_process_setup_hook` that sets `secrets` in every worker process of the job before it runs anything.

    Ray pickles the hook (with its closure) into its GCS key-value store, which neither the dashboard nor the state
    API nor the logs show; the runtime_env holds only the hook's name and key. Tune trials, Ray Train workers and
    plain tasks all run it: they are worker processes of this job."""

    def nas_minitron_secrets() -> None:
        os.environ.update(secrets)

    return nas_minitron_secrets


def _probe(address: str, timeout_s: float = 3.0) -> None:
    """Fail fast on an unreachable host:port (ray.init would retry for minutes)."""

    if address == "auto" or address.startswith("ray://") and ":" not in address[6:]:
        return
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        raise UserError(f"--ray-address must be 'auto' or host:port (e.g. 127.0.0.1:6379), but got {address!r}.")
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except OSError as err:
        raise UserError(f"cannot reach the Ray cluster at --ray-address {address!r}: {err}.") from None


def connect_ray(options: RayOptions) -> str | None:
    """Start (or join) Ray; returns the dashboard URL when there is one. Local clusters bind to loopback only.

    Every worker of the job gets the driver's HF cache, endpoint and offline variables (`_worker_env`, as the
    runtime_env) and its Hugging Face token (`_secret_hook`, never in the runtime_env), so that a gated teacher loads
    on every node."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # read when ray is first imported: below
    if ray.is_initialized():
        return None
    runtime_env: dict[str, Any] = {"env_vars": _worker_env()}
    secrets = _secret_env()
    if secrets:
        runtime_env["worker_process_setup_hook"] = _secret_hook(secrets)
    kwargs: dict[str, Any] = dict(runtime_env=runtime_env, log_to_driver=False)
    if options.address:
        _probe(options.address)
        try:
            context = ray.init(address=options.address, **kwargs)
        except (ConnectionError, ValueError, RuntimeError) as err:
            raise UserError(f"cannot reach the Ray cluster at --ray-address {options.address!r}: {err}") from None
    else:
        temp_dir = Path(tempfile.gettempdir()) / f"nasm-ray-{os.getuid()}"  # short: unix socket path limit
        context = ray.init(
            num_cpus=options.num_cpus,
            include_dashboard=options.dashboard,
            dashboard_host="127.0.0.1",
            _node_ip_address="127.0.0.1",
            _temp_dir=str(temp_dir),
            **kwargs,
        )
    url = getattr(context, "dashboard_url", None)
    return f"http://{url}" if url and not url.startswith("http") else url


def num_alive_nodes() -> int:
    """The alive nodes of the connected Ray cluster."""
    return sum(1 for n in ray.nodes() if n.get("Alive"))


def largest_node_gpus() -> float:
    """The GPUs of the connected cluster's largest live node: a trial runs on one node, so no more than that."""
    return max((float(n.get("Resources", {}).get("GPU", 0)) for n in ray.nodes() if n.get("Alive")), default=0.0)


PROBE_DIR = ".probe"  # in the run directory, removed when the check ends


def _visit(probe_dir: str, driver_note: str, node_id: str) -> str | None:
    """On one node: write `node-<id>` into the probe folder and read the driver's note back; None when both worked,
    else what failed."""
    folder = Path(probe_dir)
    try:
        seen = (folder / "driver").read_text()
    except OSError as err:
        return f"cannot read the driver's probe file: {err.strerror or err}"
    if seen != driver_note:
        return "reads another directory at that path (the driver's probe file differs)"
    try:
        (folder / f"node-{node_id}").write_text(node_id)
    except OSError as err:
        return f"cannot write into it: {err.strerror or err}"
    return None


def check_run_dir_shared(run_dir: str | os.PathLike[str], *, timeout_s: float = 120.0,
                         task_dirs: dict[str, str] | None = None) -> tuple[int, float]:
    """UserError unless every alive node of the connected Ray cluster sees `run_dir` as the driver does: one
    zero-CPU task per node (pinned to it) reads a file the driver wrote under `run_dir/.probe/` and writes one
    back, which the driver must then read. Returns (nodes checked, wall seconds); the probe files are removed.

    Trials, checkpoints and the winners' Ray Train jobs write into the run directory from whatever node runs them:
    without a filesystem shared at the same path, their results would land on that node's disk, unseen.
    `task_dirs` (node id -> folder), for tests only, sends a node's task elsewhere, as a node without the mount.
    """
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    start = time.perf_counter()
    nodes = {n["NodeID"]: n.get("NodeManagerAddress", "?") for n in ray.nodes() if n.get("Alive")}
    folder = Path(run_dir).resolve() / PROBE_DIR / uuid.uuid4().hex[:12]
    note = uuid.uuid4().hex
    folder.mkdir(parents=True)
    try:
        (folder / "driver").write_text(note)
        visit = ray.remote(num_cpus=0, max_retries=0)(_visit)
        refs = {node: visit.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False)).remote(
            (task_dirs or {}).get(node, str(folder)), note, node) for node in nodes}
        try:
            answers = dict(zip(refs, ray.get(list(refs.values()), timeout=timeout_s), strict=True))
        except ray.exceptions.GetTimeoutError:
            raise UserError(f"checking that every Ray node sees the run directory {str(folder.parent.parent)!r} "
                            f"took over {timeout_s:.0f} s (a node without free workers?); retry, or check the "
                            f"cluster with `ray status`.") from None
        for node, ip in nodes.items():
            problem = answers[node] or (None if (folder / f"node-{node}").is_file()
                                        else "its file written there never appeared in the driver's directory")
            if problem:
                raise UserError(
                    f"Ray node {node[:12]} ({ip}) does not see the run directory {str(folder.parent.parent)!r}: "
                    f"{problem}; mount one shared filesystem (NFS, Lustre, ...) at the same path on every node "
                    f"and pass a --run-dir on it.")
    finally:
        shutil.rmtree(folder, ignore_errors=True)
        with contextlib.suppress(OSError):
            folder.parent.rmdir()  # only when no other probe is running
    return len(nodes), time.perf_counter() - start


def check_resources(cpus_per_trial: int, gpus_per_trial: float, memory_per_trial_bytes: int) -> None:
    """UserError before any work when one trial cannot fit the connected Ray cluster."""
    total = ray.cluster_resources()
    if cpus_per_trial > total.get("CPU", 0):
        raise UserError(f"--cpus-per-trial {cpus_per_trial} but the Ray cluster has {total.get('CPU', 0):g} CPUs.")
    if not gpus_per_trial >= 0:  # also NaN; Ray would wait forever for a negative request
        raise UserError(f"--gpus-per-trial must be >= 0 (a fraction shares a GPU), but got {gpus_per_trial:g}.")
    if gpus_per_trial > 1 and not float(gpus_per_trial).is_integer():
        raise UserError(f"--gpus-per-trial above 1 must be a whole number (Ray shares only fractions of one GPU), "
                        f"but got {gpus_per_trial:g}.")
    if gpus_per_trial > total.get("GPU", 0):
        raise UserError(f"--gpus-per-trial {gpus_per_trial:g} but the Ray cluster has {total.get('GPU', 0):g} GPUs.")
    per_node = largest_node_gpus()
    if gpus_per_trial > per_node:
        raise UserError(f"--gpus-per-trial {gpus_per_trial:g} but the largest node of the Ray cluster has "
                        f"{per_node:g} GPUs (a trial runs on one node); valid: 0..{per_node:g}.")
    available = ray.available_resources().get("memory", total.get("memory", 0))
    if available and memory_per_trial_bytes > available:
        raise UserError(
            f"one trial needs about {memory_per_trial_bytes / 2**30:.1f} GiB but the Ray cluster offers "
            f"{available / 2**30:.1f} GiB of memory; lower --batch-size/--seq-len or use a bigger machine."
        )


def _on_this_node(spec: TrialSpec) -> TrialSpec:
    """The spec with a teacher this node can read: a hub teacher's snapshot folder (the driver's HF cache) is
    fetched at the same commit into this node's cache when the node does not share it (`local_teacher_dir`)."""
    here = local_teacher_dir(spec.teacher_dir)
    return spec if here == spec.teacher_dir else dataclasses.replace(spec, teacher_dir=here)


def _trainable(config: dict[str, Any], spec: TrialSpec) -> None:
    """One Ray trial: prune and briefly distill the candidate the config names; report as it goes.

    It continues from Ray's checkpoint when Ray retries it, else from the checkpoint `--resume` carried over for
    its candidate (`records.carry_checkpoints`), else from the pruned student.
    """

    def report(metrics: dict[str, Any], checkpoint_dir: Path | None) -> None:
        checkpoint = tune.Checkpoint.from_directory(str(checkpoint_dir)) if checkpoint_dir else None
        tune.report(metrics, checkpoint=checkpoint)  # copies the checkpoint into the run directory before it returns

    trial_id = str(tune.get_context().get_trial_id() or "")
    gpu_ids = [str(i) for i in ray.get_gpu_ids()]  # Ray set CUDA_VISIBLE_DEVICES to these
    spec = _on_this_node(spec)
    resume = tune.get_checkpoint()
    if resume is None:
        carried = trial_resume_dir(spec.run_dir, config["arch"])
        start = carried if (carried / "state.json").is_file() else None
        run_candidate(config["arch"], spec, report, start, trial_id=trial_id, gpu_ids=gpu_ids)
        return
    with resume.as_directory() as resume_dir:
        # A trial that ended has an empty checkpoint (callbacks.CheckpointCleaner); retried, it starts over (and a
        # finished one reuses its result).
        start = Path(resume_dir) if (Path(resume_dir) / "state.json").is_file() else None
        run_candidate(config["arch"], spec, report, start, trial_id=trial_id, gpu_ids=gpu_ids)


def tpe_startup_trials(num_trials: int) -> int:
    """Random trials before TPE models: Optuna's 10 for searches of 40+ trials, fewer (>= 4) for shorter ones.

    With Optuna's default of 10 a search of <= 10 trials never leaves random sampling; replaying the search on a
    fully measured table (benchmarks/bench_sampler_simulation.py, RESULTS.md) found the best candidate in 42% of
    12-trial searches with 4 startup trials vs 18% with 10.
    """
    return min(10, max(4, num_trials // 4))


def make_sampler(name: str, num_objectives: int, seed: int, num_trials: int = 40) -> optuna.samplers.BaseSampler:
    """The Optuna sampler a search uses (one of `SAMPLERS`): `auto` is TPE (multivariate) for one objective,
    NSGA-II for several."""
    if name not in SAMPLERS:
        raise UserError(f"sampler {name!r} is not one of {', '.join(SAMPLERS)}.")
    name = name if name != "auto" else ("nsga2" if num_objectives > 1 else "tpe")
    samplers = {
        "tpe": lambda: optuna.samplers.TPESampler(seed=seed, multivariate=True,
                                                  n_startup_trials=tpe_startup_trials(num_trials)),
        "nsga2": lambda: optuna.samplers.NSGAIISampler(seed=seed),
        "random": lambda: optuna.samplers.RandomSampler(seed=seed),
    }
    return samplers[name]()


def _search(spec: TrialSpec, options: RayOptions, enqueue: Sequence[str], num_trials: int) -> searcher.StudySearch:
    archs = [ArchConfig.parse(name, spec.head_dim) for name in spec.candidates]
    objectives = list(spec.objectives)
    multi = len(objectives) > 1
    storage = optuna.storages.RDBStorage(study_storage_url(spec.run_dir, options.storage_url))
    points = [encode(archs, ArchConfig.parse(name, spec.head_dim)) for name in enqueue]
    return searcher.StudySearch(
        space=searcher.CandidateSpace(archs),
        metric=objectives if multi else objectives[0],
        mode=["min"] * len(objectives) if multi else "min",
        sampler=make_sampler(options.sampler, len(objectives), options.seed, num_trials),
        storage=storage,
        study_name=STUDY_NAME,
        points_to_evaluate=points or None,
        seed=options.seed,
    )


def _experiment_dir(run_dir: str | os.PathLike[str]) -> Path:
    return Path(run_dir).resolve() / "ray" / EXPERIMENT_NAME


def fatal_message(records: Sequence[TrialRecord]) -> str | None:
    """The message of the first trial that refused to run where it was placed, if any."""
    return next((str(r.metrics[FATAL_KEY]) for r in records if r.metrics.get(FATAL_KEY)), None)


def _hooks(spec: TrialSpec, log: Callable[[str], None] | None,
           num_winners: int) -> tuple[list[tune.Callback], tune.Stopper]:
    keeper = callbacks.WeightsKeeper(spec.run_dir, spec.objectives, num_winners, spec.shape_objectives)
    hooks = [callbacks.TrialRecorder(spec.run_dir), callbacks.TrialLogNames(spec.run_dir, log),
             callbacks.CheckpointCleaner(), keeper]
    return hooks, callbacks.FatalStopper()


def _sweep(spec: TrialSpec, hooks: Sequence[tune.Callback], grid: tune.ResultGrid) -> None:
    """After the experiment: no checkpoint of an ended trial left, no weights of a candidate that cannot win.

    Trials stopped together with the experiment (a fatal stop) may never reach the callbacks' hooks. A trial that
    neither finished nor failed (the driver was interrupted: Ray Tune catches SIGINT and returns) keeps its
    checkpoint, so that `--resume` continues it.
    """
    for result in _results(grid):
        last = result.metrics or {}
        ended = result.error is not None or any(last.get(k) for k in (FINAL_KEY, FAILED_KEY, FATAL_KEY))
        if result.path and ended:
            callbacks.delete_trial_checkpoints(result.path)
    for hook in hooks:
        if isinstance(hook, callbacks.WeightsKeeper):
            hook.prune()


def run_trials(
    spec: TrialSpec, options: RayOptions, num_trials: int, enqueue: Sequence[str], resume: bool, *,
    log: Callable[[str], None] | None = None, num_winners: int = 1,
) -> list[TrialRecord]:
    """Run (or resume) the trials; returns the records of the trials this call ran (all of them are also kept in
    the run directory, `records.load_records`).

    Driver-side hooks (search/callbacks.py): every report is recorded as it arrives; each trial's log file is named
    through `log` as it starts; a trial's checkpoints are deleted once it ends (at most one is kept while it runs);
    trial weights are kept only for the candidates that can still be among the `num_winners` (or on the Pareto
    front); a `fatal` report ends the search.

    `--resume` never restores Ray's experiment (its state is pickled: a run directory from elsewhere could run code).
    It starts a fresh experiment from what the project wrote: the Optuna study in storage (`reopen_unfinished`: the
    trials cut short are told FAIL and their candidates asked again, first), the finished candidates' results
    (reused, never retrained) and the newest checkpoint of each candidate cut short (`records.carry_checkpoints`).
    Only the trials not yet finished are run. Under --asha the scheduler starts without the history of the trials
    before the resume.
    """
    storage_path = str(Path(spec.run_dir).resolve() / "ray")
    storage_url = study_storage_url(spec.run_dir, options.storage_url)
    asha = options.asha and len(spec.objectives) == 1
    points = list(enqueue)
    if resume:
        carried = carry_checkpoints(spec.run_dir, _experiment_dir(spec.run_dir))
        shutil.rmtree(_experiment_dir(spec.run_dir), ignore_errors=True)
        reopened = reopen_unfinished(storage_url, pruned_is_final=asha)
        if reopened is None and load_records(spec.run_dir):
            raise UserError(f"the Optuna study {STUDY_NAME!r} of this search is not in its storage "
                            f"{_shown(storage_url)} although trials ran: the study was deleted or replaced; "
                            f"restore it, or start the search again in a new --run-dir.")
        if reopened is not None:
            finished, again = reopened
            points = []  # the baselines were enqueued in storage when the study began
            num_trials = max(0, num_trials - finished)
            (log or print)(f"  resuming: {finished} trials finished before; {again} cut short are asked again "
                           f"({len(carried)} continue from a checkpoint); {num_trials} to run")
    if num_trials == 0:
        return []
    trainable = tune.with_resources(
        tune.with_parameters(_trainable, spec=spec), {"cpu": spec.cpus_per_trial, "gpu": spec.gpus_per_trial}
    )
    hooks, stopper = _hooks(spec, log, num_winners)
    scheduler = None
    if asha:
        scheduler = schedulers.ASHAScheduler(metric=spec.objectives[0], mode="min", time_attr="num_tokens",
                                             max_t=spec.distill.num_tokens,
                                             grace_period=max(1, spec.distill.num_tokens // 4), reduction_factor=2)
    tuner = tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(
            search_alg=_search(spec, options, points, num_trials),
            scheduler=scheduler,
            num_samples=num_trials,
            max_concurrent_trials=options.max_concurrent,
            metric=None,
            mode=None,
        ),
        run_config=tune.RunConfig(
            name=EXPERIMENT_NAME,
            storage_path=storage_path,
            failure_config=tune.FailureConfig(max_failures=options.max_failures),
            checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
            callbacks=hooks,
            stop=stopper,
            verbose=1,
        ),
    )
    grid = tuner.fit()
    _sweep(spec, hooks, grid)
    ran = trial_records(grid)
    for record in ran:  # Ray's view at the end (errors included) replaces what the hooks recorded on the way
        save_record(spec.run_dir, record)
    return ran


def _results(grid: tune.ResultGrid) -> list[tune.Result]:
    return [grid[i] for i in range(len(grid))]


def trial_records(grid: tune.ResultGrid) -> list[TrialRecord]:
    """One record per Ray trial (status, metrics at the end and at its first report) with its per-report curve."""
    out = []
    for result in _results(grid):
        frame = result.metrics_dataframe
        last = result.metrics or {}
        config = result.config or {}
        curve = tuple({k: v for k, v in point.items() if k != "config"} for point in frame.to_dict("records")) \
            if frame is not None else ()
        out.append(TrialRecord(
            trial_id=last.get("trial_id") or Path(result.path).name,
            name=config.get("arch"),
            status=trial_status(last, errored=result.error is not None),
            error=first_line(result.error, limit=300) if result.error else last.get("error", ""),
            metrics=last,
            first=curve[0] if curve else {},
            curve=curve,
        ))
    return out


def reopen_unfinished(storage_url: str, pruned_is_final: bool) -> tuple[int, int] | None:
    """Before a resumed search: tell FAIL for the Optuna trials cut short and enqueue their candidates again.

    Cut short: still RUNNING (its driver died; told FAIL with user attr `interrupted`), stopped by a fatal trial
    (user attr `fatal`, or PRUNED with the experiment), or PRUNED when no scheduler prunes (`pruned_is_final`
    False: the driver was interrupted). Each is enqueued once (the new trial's `retry_of` names it). Returns
    (trials finished for good, trials enqueued again), or None when storage holds no study yet (never started).
    """
    try:
        study = optuna.load_study(study_name=STUDY_NAME, storage=storage_url)
    except KeyError:
        return None
    state = optuna.trial.TrialState
    trials = study.get_trials(deepcopy=False)
    retried = {int(t.user_attrs["retry_of"]) for t in trials if "retry_of" in t.user_attrs}
    finished = again = 0
    for trial in trials:
        attrs = trial.user_attrs
        cut = (trial.state == state.RUNNING
               or (trial.state == state.FAIL and (attrs.get("fatal") or attrs.get("interrupted")))
               or (trial.state == state.PRUNED and not pruned_is_final))
        if not cut:
            finished += trial.state in (state.COMPLETE, state.PRUNED, state.FAIL)
            continue
        if trial.state == state.RUNNING:
            study._storage.set_trial_user_attr(trial._trial_id, "interrupted", True)
            study.tell(trial.number, state=state.FAIL)
        if trial.number not in retried and trial.params:
            study.enqueue_trial(trial.params, user_attrs={"retry_of": trial.number})
            again += 1
    return finished, again


def optuna_numbers(storage_url: str) -> dict[str, int]:
    """Ray trial id -> Optuna trial number, from the study in storage."""
    try:
        study = optuna.load_study(study_name=STUDY_NAME, storage=storage_url)
    except KeyError:
        return {}
    return {t.user_attrs["ray_trial_id"]: t.number for t in study.trials if "ray_trial_id" in t.user_attrs}


# ---- successive halving: one Ray Tune experiment per rung (search/halving.py drives them) ------------------------
def _rung_trainable(config: dict[str, Any], spec: TrialSpec) -> None:
    """One candidate at one rung (`worker.run_rung`); its checkpoint lives in the run directory, not with Ray."""
    from nas_minitron.search.worker import run_rung

    def report(metrics: dict[str, Any], _checkpoint_dir: Path | None) -> None:
        tune.report(metrics)

    trial_id = str(tune.get_context().get_trial_id() or "")
    gpu_ids = [str(i) for i in ray.get_gpu_ids()]
    spec = _on_this_node(spec)
    for arch in config.get("archs") or [config["arch"]]:  # rung 0 screens a batch of candidates per trial
        if not run_rung(arch, spec, int(config["rung"]), int(config["tokens"]), report, trial_id=trial_id,
                        gpu_ids=gpu_ids):
            return  # it reported `fatal`: the search stops


def run_rung_trials(spec: TrialSpec, options: RayOptions, rung: int, tokens: int, names: Sequence[str], *,
                    log: Callable[[str], None] | None = None) -> list[TrialRecord]:
    """Run `names` at one rung as one Ray Tune experiment (a grid over the names; at rung 0 over batches of
    them) and return its records.

    The experiment is never restored: a driver that died mid-rung leaves the rung's finished results in the run
    directory (`rung_result_path`) and its candidates' checkpoints there too, so the next driver starts a fresh
    experiment for the candidates without a result; nothing Ray pickled is ever read back.
    """
    storage_path = str(Path(spec.run_dir).resolve() / "ray")
    name = f"rung-{rung}"
    if tokens == 0:
        # Screening validates once per candidate: a trial per candidate would spend most of its time starting a
        # worker process; a few batches per worker slot amortize that and still balance the slots.
        size = max(1, math.ceil(len(names) / (2 * max(1, options.max_concurrent))))
        space: dict[str, Any] = {"archs": tune.grid_search([list(names[i:i + size])
                                                             for i in range(0, len(names), size)])}
    else:
        space = {"arch": tune.grid_search(list(names))}
    shutil.rmtree(Path(storage_path) / name, ignore_errors=True)
    trainable = tune.with_resources(tune.with_parameters(_rung_trainable, spec=spec),
                                    {"cpu": spec.cpus_per_trial, "gpu": spec.gpus_per_trial})
    tuner = tune.Tuner(
        trainable,
        param_space={**space, "rung": rung, "tokens": tokens},
        tune_config=tune.TuneConfig(num_samples=1, max_concurrent_trials=options.max_concurrent),
        run_config=tune.RunConfig(
            name=name,
            storage_path=storage_path,
            failure_config=tune.FailureConfig(max_failures=options.max_failures),
            callbacks=[callbacks.TrialLogNames(spec.run_dir, log)],
            stop=callbacks.FatalStopper(),
            verbose=0,  # the driver logs each rung's decisions; trial logs name themselves (TrialLogNames)
        ),
    )
    return trial_records(tuner.fit())


def screening_study(objectives: Sequence[str], options: RayOptions, num_candidates: int) -> optuna.Study:
    """An in-memory study whose sampler chooses which candidates rung 0 screens (`--screen`); the record of the
    search is the study in storage (`record_rung`), this one only drives the sampler."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna.create_study(sampler=make_sampler(options.sampler, len(objectives), options.seed, num_candidates),
                               directions=["minimize"] * len(objectives))


def propose(study: optuna.Study, archs: Sequence[ArchConfig]) -> tuple[optuna.trial.Trial, str]:
    """Ask the screening study for one candidate (through the define-by-run space)."""
    trial = study.ask()
    return trial, searcher.CandidateSpace(archs)(trial)["arch"]


def told_screen(study: optuna.Study, archs: Sequence[ArchConfig], name: str, values: Sequence[float]) -> None:
    """Tell the screening study a screened candidate's rung-0 values (a finished trial added at its point)."""
    point = encode(archs, ArchConfig.parse(name, archs[0].head_dim))
    distributions: dict[str, optuna.distributions.BaseDistribution] = {
        k: optuna.distributions.FloatDistribution(0.0, 1.0) for k in point}
    study.add_trial(optuna.trial.create_trial(params=point, distributions=distributions, values=list(values)))


def _record_study(storage_url: str, num_objectives: int) -> optuna.Study:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna.create_study(study_name=STUDY_NAME, storage=storage_url, load_if_exists=True,
                               directions=["minimize"] * num_objectives)


def record_rung(storage_url: str, archs: Sequence[ArchConfig], objectives: Sequence[str], tokens: int,
                rows: Sequence[dict[str, Any]]) -> None:
    """Record one rung in the one Optuna study: a trial per candidate (created at its first rung, its point the
    candidate's), the rung's value an intermediate value at step `tokens` (one objective; with several, Optuna has
    no intermediate values and the user attribute `rung_<tokens>` holds them), its interval a user attribute.
    Idempotent: a resumed driver records nothing twice."""
    study = _record_study(storage_url, len(objectives))
    by_arch = {t.user_attrs.get("arch"): t for t in study.get_trials(deepcopy=False)}
    space = searcher.CandidateSpace(archs)
    for row in rows:
        name = str(row["name"])
        existing = by_arch.get(name)
        if existing is None:
            study.enqueue_trial(encode(archs, ArchConfig.parse(name, archs[0].head_dim)), user_attrs={"arch": name})
            trial = study.ask()
            space(trial)
        elif existing.state == optuna.trial.TrialState.RUNNING:
            trial = optuna.trial.Trial(study, existing._trial_id)
        else:
            continue
        values = finite_objectives(row, objectives)
        if values is None:
            continue
        if len(objectives) == 1 and tokens not in (existing.intermediate_values if existing else {}):
            trial.report(values[0], step=tokens)
        trial.set_user_attr(f"rung_{tokens}", values)
        if row.get("ci_low") is not None:
            trial.set_user_attr(f"rung_{tokens}_interval", [row["ci_low"], row["ci_high"]])


def finish_study(storage_url: str, objectives: Sequence[str],
                 outcome: dict[str, tuple[str, list[float] | None]]) -> None:
    """Close the candidates' Optuna trials: name -> (COMPLETE with its values | PRUNED | FAIL)."""
    study = _record_study(storage_url, len(objectives))
    states = {"PRUNED": optuna.trial.TrialState.PRUNED, "FAIL": optuna.trial.TrialState.FAIL}
    for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        state, values = outcome.get(str(trial.user_attrs.get("arch")), ("", None))
        if state == "COMPLETE" and values is not None:
            study.tell(trial.number, values if len(values) > 1 else values[0])
        elif state in states:
            study.tell(trial.number, state=states[state])
