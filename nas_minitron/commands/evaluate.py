"""`nas-minitron eval`: lm-eval scores (and optionally speed) of a model directory, saved into a run directory."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from nas_minitron.atomic import check_output_dir, check_writable_dir
from nas_minitron.commands.args import at_least, check_seq_len
from nas_minitron.evaluate.harness import (
    DEFAULT_TASKS,
    MINITRON_PRESET,
    eval_table,
    evaluate_model,
    find_tasks,
    load_model,
    resolve_tasks,
    save_eval,
    wide_table,
)
from nas_minitron.evaluate.speed import measure_speed
from nas_minitron.runtime import resolve_device

__all__ = ["register"]


def register(subparsers: argparse._SubParsersAction) -> None:
    preset = ", ".join(f"{task} {shots}-shot" for task, shots in MINITRON_PRESET.items())
    parser = subparsers.add_parser(
        "eval",
        help="score a model with lm-eval (and measure its speed)",
        description=(
            f"Score a model with lm-eval. --tasks takes task names or the preset 'minitron' ({preset}; these "
            f"download from the Hugging Face hub). The bundled offline task is {DEFAULT_TASKS!r}."
        ),
    )
    parser.add_argument("--model", required=True, help="model directory (save_pretrained) or 'smollm2-135m'")
    parser.add_argument("--tasks", default=DEFAULT_TASKS, help=f"'minitron' or TASK,... (default {DEFAULT_TASKS})")
    parser.add_argument("--num-fewshot", type=at_least(0), default=None, help="few-shot count for every task")
    parser.add_argument("--limit", type=at_least(1), default=None, help="examples per task (default: all)")
    parser.add_argument("--include-path", default=None, help="directory of extra lm-eval task YAML files")
    parser.add_argument("--batch-size", type=at_least(1), default=8, help="lm-eval batch size (default 8)")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default: cuda if available)")
    parser.add_argument("--label", default=None, help="name in the results table (default: the directory name)")
    parser.add_argument("--out", default=None, help="run directory to save eval/results.json, table.csv into")
    parser.add_argument("--verify", action="store_true",
                        help="check the sha256 of every file a --model directory written by this project lists in "
                             "its checksums.json (a full read); without it only their sizes")
    parser.add_argument("--speed", action="store_true", help="also measure prefill/decode speed and memory")
    parser.add_argument("--speed-batch-size", type=at_least(1), default=1, help="batch for --speed (default 1)")
    parser.add_argument("--speed-seq-len", type=at_least(1), default=128,
                        help="prompt length for --speed (default 128)")
    parser.add_argument("--speed-decode-tokens", type=at_least(1), default=32,
                        help="tokens decoded for --speed (default 32)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.out:  # results go to OUT/eval/, merged with what is there
        check_writable_dir(args.out, "--out")
        check_output_dir(Path(args.out) / "eval", overwrite=True, flag="--out")
    device = resolve_device(args.device)
    find_tasks(list(resolve_tasks(args.tasks, args.num_fewshot)), args.include_path)  # before loading the model
    model, tokenizer, label = load_model(args.model, device=device, verify=args.verify)
    if args.speed:  # the prompt and the decoded tokens: positions the model was trained for
        check_seq_len(args.speed_seq_len + args.speed_decode_tokens, model.config.to_dict(), "model",
                      f"--speed-seq-len {args.speed_seq_len} + --speed-decode-tokens {args.speed_decode_tokens} =")
    result = evaluate_model(
        model,
        tokenizer,
        args.tasks,
        num_fewshot=args.num_fewshot,
        limit=args.limit,
        include_path=args.include_path,
        batch_size=args.batch_size,
        device=device,
        label=args.label or label,
    )
    result = dataclasses.replace(result, path=str(args.model))
    speeds = []
    if args.speed:
        speeds.append(
            measure_speed(
                model, args.speed_batch_size, args.speed_seq_len, device, args.speed_decode_tokens, label=result.label
            )
        )
    print(wide_table(eval_table([result])).to_string())
    for speed in speeds:
        print(
            f"speed {speed.model} on {speed.device} ({speed.batch_size}x{speed.seq_len}): prefill "
            f"{speed.prefill_tok_s:.1f} tok/s, decode {speed.decode_tok_s:.1f} tok/s, peak memory "
            f"{speed.peak_mem_bytes / 2**20:.1f} MiB ({speed.peak_mem_method}), KV cache {speed.kv_cache_bytes} bytes"
        )
    if args.out:
        print(f"saved {save_eval(args.out, [result], speeds)}")
    return 0
