"""`nas-minitron inspect`: family, arch name and parameter count of a model directory or teacher spec."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from nas_minitron.arch import count_params
from nas_minitron.artifacts import artifact_error, reading, safetensors_shapes
from nas_minitron.commands.args import add_teacher_args
from nas_minitron.families import describe
from nas_minitron.teacher import load_teacher_config, resolve_teacher_dir

__all__ = ["register", "weight_count"]

_FIX = "if the files are damaged, download, convert or copy the model again"
_REPRUNE = "prune the student again"


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


def weight_count(directory: Path, finite: bool = True) -> int | None:
    """Parameters stored in a directory's safetensors files (tied weights once); UserError naming a corrupt file or,
    with `finite`, a tensor holding NaN/Inf (each tensor is then read once, memory-mapped, one at a time)."""
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        return None
    total = 0
    for file in files:
        for shape in safetensors_shapes(file, "weights", hint=_FIX, finite=finite).values():
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
            with reading(plan, "pruning record", _REPRUNE):
                data = json.loads(plan.read_text())
            if not isinstance(data, dict):
                raise artifact_error(plan, "pruning record", "not a JSON object", _REPRUNE)
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
