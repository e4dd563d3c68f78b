"""Running the real CLI in a subprocess, as a user would, and reading what it printed (shared by the CLI tests).

`run_in_process` runs the same entry point (`nas_minitron.cli.main`) inside the test process, for the many refusals
of the bad-input tables: one interpreter start-up (torch + transformers imports, ~3 s here) less per case. Each
command keeps cases through the real subprocess too.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import subprocess
import sys
import traceback
from pathlib import Path

# A search on a tiny teacher that finishes in about a minute (3 trials, 2 at once).
TINY_SEARCH_ARGS = ("--budget", "0.6x", "--space", "tiny", "--strategy", "sample", "--trials", "3",
                    "--short-tokens", "256", "--full-tokens", "128", "--seq-len", "32", "--batch-size", "2",
                    "--calibration-samples", "8", "--validation-sequences", "4", "--eval-limit", "8", "--topk", "16",
                    "--max-concurrent", "2")
# The same tiny search with the successive-halving strategy: the 8 candidates closest to the budget, all screened,
# rungs 0, 64, 256 tokens, eta 2 (8 -> 4 -> 2 trials).
TINY_RUNG_ARGS = tuple(a for a in TINY_SEARCH_ARGS if a not in ("--strategy", "sample", "--trials", "3")) + (
    "--rungs", "0,64,256", "--eta", "2", "--max-candidates", "8")
_RAY_LOG = re.compile(r"^\d{4}-\d\d-\d\d [\d:,]+\s+(INFO|WARNING) ")  # Ray's own start-up lines on stderr


# A cap for hung commands only: several times the slowest CLI test's duration on a loaded 2-core machine.
CLI_TIMEOUT_S = 1800


def run_cli(*args: str, env: dict[str, str] | None = None, timeout: int = CLI_TIMEOUT_S,
            cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """`python -m nas_minitron ARGS`, output captured; `env` is added to this process's environment."""
    return subprocess.run([sys.executable, "-m", "nas_minitron", *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})}, cwd=cwd)


def run_in_process(*args: str, env: dict[str, str] | None = None,
                   cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """`nas_minitron.cli.main(ARGS)` in this process, with what it prints and its exit code as `run_cli` returns
    them; an exception that escapes main is printed as its traceback (as the interpreter would) with exit 1. The
    environment and working directory are restored afterwards."""
    from nas_minitron.cli import main

    out, err = io.StringIO(), io.StringIO()
    saved_env, saved_cwd = dict(os.environ), os.getcwd()
    os.environ.update(env or {})
    # transformers reads the progress-bar switch when first imported: an earlier case may have imported it
    hf_logging = sys.modules.get("transformers.utils.logging")
    bars = hf_logging is not None and hf_logging.is_progress_bar_enabled()
    if bars and os.environ.get("TQDM_DISABLE"):
        hf_logging.disable_progress_bar()  # type: ignore[union-attr]
    try:
        if cwd is not None:
            os.chdir(cwd)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main(list(args))
            except SystemExit as stop:  # argparse's refusals
                code = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
            except Exception:  # noqa: BLE001 - shown as the interpreter would show it
                traceback.print_exc()
                code = 1
    finally:
        if bars:
            hf_logging.enable_progress_bar()  # type: ignore[union-attr]
        os.chdir(saved_cwd)
        os.environ.clear()
        os.environ.update(saved_env)
    return subprocess.CompletedProcess(list(args), code, out.getvalue(), err.getvalue())


def search(teacher: Path, run_dir: Path, *extra: str, env: dict[str, str] | None = None,
           timeout: int = CLI_TIMEOUT_S,
           cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """The tiny search in `run_dir`, run from `cwd` (default: the run directory's parent)."""
    return run_cli("search", "--teacher", str(teacher), *TINY_SEARCH_ARGS, "--run-dir", str(run_dir), *extra,
                   env=env, timeout=timeout, cwd=cwd or run_dir.parent)


def one_error_line(result: subprocess.CompletedProcess[str]) -> str:
    """The refusal's one stderr line, asserting exit code 2 and no traceback (Ray's start-up log lines aside)."""
    assert result.returncode == 2, result.stderr[-2000:]
    lines = [line for line in result.stderr.strip().splitlines() if not _RAY_LOG.match(line)]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    return lines[0]


def assert_streams_continue(run_dir: Path, full_tokens: int) -> None:
    """A search's token streams: train_short the train split's first sequences and train_full the ones right after
    (a winner that continues from its trial never sees its data again), as data.take_sequences packs them, in
    uint16 shards (the tiny vocabulary)."""
    import torch

    from nas_minitron.data import take_sequences
    from nas_minitron.teacher import load_teacher_tokenizer, resolve_teacher_dir
    from nas_minitron.tokens import open_tokens

    data = {name: open_tokens(run_dir / "data" / name) for name in ("train_short", "train_full", "validation")}
    short, full = data["train_short"].num_sequences, data["train_full"].num_sequences
    config = json.loads((run_dir / "config.json").read_text())
    tokenizer = load_teacher_tokenizer(resolve_teacher_dir(config["teacher"]))
    train = take_sequences(config["data"], tokenizer, "train", config["seq_len"], short + full, config["seed"])
    assert torch.equal(train[:short], data["train_short"].tensor())
    assert torch.equal(train[short:], data["train_full"].tensor())
    assert data["train_full"].tensor().numel() >= full_tokens  # --full-tokens of its own
    assert json.loads((run_dir / "data" / "train_full" / "manifest.json").read_text())["dtype"] == "uint16"
