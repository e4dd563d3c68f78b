"""Flags and helpers that several commands share: the teacher flags, and what `distill` and `correct-teacher`
share (training flags, device and dtype, data loading, progress bar)."""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nas_minitron._lazy import lazy_import
from nas_minitron.atomic import check_output_dir, check_writable_dir
from nas_minitron.data import iter_sequences, take_sequences
from nas_minitron.distill.config import DistillConfig, StepInfo
from nas_minitron.errors import UserError
from nas_minitron.runtime import resolve_device

if TYPE_CHECKING:
    import torch
    import tqdm
    from transformers import PreTrainedTokenizerBase
else:
    torch = lazy_import("torch")
    tqdm = lazy_import("tqdm")

__all__ = [
    "MAX_DATA_PASSES",
    "TEACHER_HELP",
    "add_teacher_args",
    "add_training_args",
    "at_least",
    "check_outputs",
    "check_seq_len",
    "checkpoint_dir",
    "config_from_args",
    "device_and_dtype",
    "fraction",
    "non_negative",
    "positive",
    "model_config_json",
    "tokenize_streams",
    "progress",
]

MAX_DATA_PASSES = 4  # a training run may pass over its data at most this often unless --allow-repeat



# ---- numeric flags: every command's numbers are parsed by one of these, so a bad value is refused by argparse in one
# line (cli.py) that names the flag, the value and the valid range, before anything is loaded.
def at_least(low: int) -> Callable[[str], int]:
    """argparse type: an integer >= `low`."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}, but got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be an integer >= {low}, but got {value}")
        return value

    parse.__name__ = f"integer >= {low}"
    return parse


def _number(text: str, valid: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number {valid}, but got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number {valid}, but got {text!r}")
    return value


def positive(text: str) -> float:
    """argparse type: a finite number > 0 (learning rates, temperatures)."""
    value = _number(text, "> 0")
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a number > 0, but got {text!r}")
    return value


def non_negative(text: str) -> float:
    """argparse type: a finite number >= 0 (loss weights)."""
    value = _number(text, ">= 0")
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be a number >= 0, but got {text!r}")
    return value


def fraction(text: str) -> float:
    """argparse type: a share in [0, 1) (warmup and stage fractions)."""
    value = _number(text, "in [0, 1)")
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"must be a number in [0, 1), but got {text!r}")
    return value


def model_config_json(directory: Path) -> dict[str, Any]:
    """A model directory's config.json as read, or {} when it cannot be read (its loader says why, with the file)."""
    try:
        data = json.loads((Path(directory) / "config.json").read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def check_seq_len(seq_len: int, config: dict[str, Any], what: str, flag: str = "--seq-len") -> None:
    """UserError when `seq_len` exceeds the model's max_position_embeddings (positions past it were never trained;
    no RoPE scaling is applied)."""
    max_positions = config.get("max_position_embeddings")
    if isinstance(max_positions, int) and seq_len > max_positions:
        raise UserError(f"{flag} {seq_len} exceeds the {what}'s max_position_embeddings ({max_positions}); valid: "
                        f"1..{max_positions}.")


TEACHER_HELP = "local HF model directory, .gguf file, hub id (org/name), or the embedded default 'smollm2-135m'"


def add_teacher_args(
    parser: argparse.ArgumentParser, *, required: bool = True, help: str | None = None, default: str | None = None
) -> None:
    """--teacher, --cache-dir and --trust-remote-code, shared by every command that reads a teacher.

    `help` replaces the --teacher help (default `TEACHER_HELP`); `default` is --teacher's value when not given.
    """
    parser.add_argument("--teacher", required=required, default=default, help=help or TEACHER_HELP)
    parser.add_argument(
        "--cache-dir",
        default=None,
        help="where converted GGUF teachers are cached (default: $NAS_MINITRON_CACHE or ~/.cache/nas-minitron)",
    )
    parser.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="allow code from the model repositories (config and model classes; transformers' trust_remote_code)",
    )


def add_training_args(parser: argparse.ArgumentParser, lr: float) -> None:
    """--data, --tokens, --out and the optimisation flags."""
    parser.add_argument("--data", default="builtin",
                        help="'builtin', a local file/folder, or hf:NAME (default: builtin)")
    parser.add_argument("--tokens", type=at_least(1), required=True, help="training budget in tokens")
    parser.add_argument("--out", type=Path, required=True, help="output model directory (must not exist)")
    parser.add_argument("--seq-len", type=at_least(2), default=256, help="tokens per sequence (default: 256)")
    parser.add_argument("--batch-size", type=at_least(1), default=4, help="sequences per micro-batch (default: 4)")
    parser.add_argument("--grad-accum", type=at_least(1), default=1,
                        help="micro-batches per optimizer step (default: 1)")
    parser.add_argument("--lr", type=positive, default=lr, help=f"peak learning rate (default: {lr:g})")
    parser.add_argument("--warmup-fraction", type=fraction, default=0.05,
                        help="warmup share of steps (default: 0.05)")
    parser.add_argument("--eval-every-tokens", type=at_least(0), default=None,
                        help="validate and checkpoint every this many tokens (default: a tenth of --tokens)")
    parser.add_argument("--val-sequences", type=at_least(1), default=16,
                        help="held-out validation sequences (default: 16)")
    parser.add_argument("--seed", type=at_least(0), default=0,
                        help="seed of data order and initialisation (default: 0)")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    parser.add_argument("--dtype", choices=("float32", "bf16"), default=None,
                        help="float32, or bf16 autocast (default: bf16 on CUDA, float32 on CPU)")
    parser.add_argument("--grad-checkpointing", action="store_true", help="recompute activations to save memory")
    parser.add_argument("--checkpoint-dir", type=Path, default=None,
                        help="where training checkpoints go (default: OUT.ckpt next to --out)")
    parser.add_argument("--keep-last-k", type=at_least(1), default=2, help="checkpoints kept (default: 2)")
    parser.add_argument("--keep-checkpoints", action="store_true", help="keep the checkpoints after success")
    parser.add_argument("--resume", action="store_true", help="continue from the newest checkpoint")
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    parser.add_argument("--allow-repeat", action="store_true",
                        help=f"allow --tokens to pass over the train split more than {MAX_DATA_PASSES} times "
                             "(refused otherwise: a typo in --tokens would loop over a small file for hours)")


def checkpoint_dir(args: argparse.Namespace) -> Path:
    """--checkpoint-dir, or OUT.ckpt next to --out."""
    return Path(args.checkpoint_dir or args.out.with_name(args.out.name + ".ckpt"))


def check_outputs(args: argparse.Namespace) -> None:
    """--out and the checkpoint directory of a training command: refused now if they could not be written later."""
    check_output_dir(args.out, args.overwrite)
    check_writable_dir(checkpoint_dir(args), "--checkpoint-dir")


def device_and_dtype(args: argparse.Namespace) -> tuple[str, str]:
    """(device, dtype): cuda when available, and bf16 there unless told otherwise."""
    device = resolve_device(args.device or "auto")
    return device, args.dtype or ("bf16" if device.startswith("cuda") else "float32")


def config_from_args(args: argparse.Namespace, dtype: str, **fields: Any) -> DistillConfig:
    return DistillConfig(
        num_tokens=args.tokens, seq_len=args.seq_len, batch_size=args.batch_size, grad_accum=args.grad_accum,
        lr=args.lr, warmup_fraction=args.warmup_fraction,
        eval_every_tokens=args.eval_every_tokens if args.eval_every_tokens is not None else max(1, args.tokens // 10),
        num_val_sequences=args.val_sequences, seed=args.seed, dtype=dtype,
        grad_checkpointing=args.grad_checkpointing, keep_last_k=args.keep_last_k, **fields,
    )


def tokenize_streams(
    args: argparse.Namespace, tokenizer: PreTrainedTokenizerBase
) -> tuple[torch.Tensor, torch.Tensor]:
    """Training sequences [N, T] covering --tokens once (fewer if the split is smaller: they repeat, at most
    `MAX_DATA_PASSES` times unless --allow-repeat) and validation sequences [V, T] from the held-out split."""
    needed = -(-args.tokens // args.seq_len)
    rows = list(itertools.islice(iter_sequences(args.data, tokenizer, "train", args.seq_len, args.seed), needed))
    if len(rows) < args.batch_size:
        raise UserError(f"the train split of {args.data!r} holds {len(rows)} sequences of {args.seq_len} tokens, "
                        f"fewer than one batch of {args.batch_size}; use more data or a smaller --batch-size.")
    passes = needed / len(rows)
    if passes > MAX_DATA_PASSES and not getattr(args, "allow_repeat", False):
        raise UserError(
            f"--tokens {args.tokens:,} would pass over the train split of {args.data!r} {passes:.1f} times (it holds "
            f"{len(rows):,} sequences of {args.seq_len} tokens = {len(rows) * args.seq_len:,} tokens; at most "
            f"{MAX_DATA_PASSES} passes allowed); use fewer --tokens, more data, or pass --allow-repeat."
        )
    val = take_sequences(args.data, tokenizer, "validation", args.seq_len, args.val_sequences, args.seed)
    return torch.stack(rows), val  # [N, T], [V, T]


def progress(total_tokens: int, desc: str) -> tuple[Callable[[StepInfo], None], Callable[[], None]]:
    """A tqdm bar on stderr (tokens/s, loss, ETA): (per-step callback, close)."""
    bar = tqdm.tqdm(total=total_tokens, desc=desc, unit="tok", unit_scale=True, file=sys.stderr, dynamic_ncols=True,
                    disable=os.environ.get("TQDM_DISABLE", "") not in ("", "0"))  # read now, not at tqdm's import

    def on_step(info: StepInfo) -> None:
        bar.update(info.num_tokens - bar.n)  # after a resume the first update jumps to the checkpoint's tokens
        bar.set_postfix(loss=f"{info.loss:.4f}", lr=f"{info.lr:.2e}")

    return on_step, bar.close
