"""`nas-minitron inspect`: family, arch name and parameter count of a model directory or teacher spec."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING

from nas_minitron._lazy import lazy_import
from nas_minitron.arch import count_params
from nas_minitron.commands.args import add_teacher_args
from nas_minitron.families import describe
from nas_minitron.teacher import load_teacher_config, resolve_teacher_dir

if TYPE_CHECKING:
    import safetensors
else:
    safetensors = lazy_import("safetensors")

__all__ = ["register", "weight_count"]


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "inspect",
        help="print a model's family, arch name and parameter count",
        description=(
            "Print family, arch name and parameter count (from the config, and from the safetensors files when "
            "the weights are local) of a model directory, .gguf file, hub id or 'smollm2-135m'."
        ),
    )
    parser.add_argument("path", help="model directory, .gguf file, hub id or 'smollm2-135m'")
    add_teacher_args(parser, required=False)
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    parser.set_defaults(func=run)


def weight_count(directory: Path) -> int | None:
    """Parameters stored in a directory's safetensors files, read from their headers (tied weights once)."""
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        return None
    total = 0
    for file in files:
        with safetensors.safe_open(str(file), framework="pt") as handle:
            for name in handle.keys():  # noqa: SIM118 (a safetensors handle, not a dict)
                shape = handle.get_slice(name).get_shape()
                count = 1
                for dim in shape:
                    count *= dim
                total += count
    return total


def run(args: argparse.Namespace) -> int:
    config = load_teacher_config(args.path, args.cache_dir, args.trust_remote_code)
    family, arch = describe(config)
    info = {
        "family": family.model_type,
        "arch": arch.name,
        "head_dim": arch.head_dim,
        "vocab_size": config["vocab_size"],
        "tie_word_embeddings": bool(config.get("tie_word_embeddings", False)),
        "params": count_params(arch, family.invariants_from_config(config)),
    }
    where = Path(resolve_teacher_dir(args.path, args.cache_dir))
    if where.is_dir():
        info["weights_params"] = weight_count(where)
        plan = where / "pruning.json"
        if plan.is_file():
            data = json.loads(plan.read_text())
            info.update(teacher=data.get("teacher"), teacher_arch=data.get("teacher_arch"),
                        criterion=data.get("criterion"))
    if args.json:
        print(json.dumps(info))
        return 0
    for key, value in info.items():
        is_count = isinstance(value, int) and not isinstance(value, bool) and key.endswith("params")
        shown = f"{value:,}" if is_count else value
        print(f"{key:20} {shown}")
    return 0
