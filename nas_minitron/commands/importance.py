"""`nas-minitron importance`: score a teacher's heads, neurons, channels and layers on calibration data."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nas_minitron.atomic import atomic_directory, check_output_dir
from nas_minitron.commands.args import add_teacher_args, at_least, check_seq_len
from nas_minitron.data import data_fingerprint, take_sequences
from nas_minitron.errors import UserError
from nas_minitron.families import describe_model
from nas_minitron.prune.importance import check_aggregations, compute_importance, reusable_scores
from nas_minitron.runtime import resolve_device
from nas_minitron.teacher import load_teacher, load_teacher_config, weights_fingerprint

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

__all__ = ["register"]


def _window_sizes(text: str) -> list[int]:
    if text.strip().lower() in ("", "none"):
        return []
    try:
        sizes = sorted({int(part) for part in text.split(",")})
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers like 1,2,4, but got {text!r}") from None
    if sizes[0] < 1:
        raise argparse.ArgumentTypeError(f"window sizes must be integers >= 1 (or none), but got {text!r}")
    return sizes


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "importance",
        help="rank a teacher's heads, neurons, embedding channels and layers by activation importance",
        description=(
            "Run the teacher over --num-samples calibration sequences of --seq-len tokens and save per-unit "
            "importance (Minitron) to --out as scores.safetensors + scores.json; `nas-minitron prune --importance "
            "DIR` and `nas-minitron search --importance DIR` consume it. A rerun with the same inputs reuses the "
            "saved scores."
        ),
    )
    add_teacher_args(parser, help="local HF model directory, .gguf file, hub id (org/name), or 'smollm2-135m'")
    parser.add_argument("--data", default="builtin",
                        help="'builtin', a .txt/.jsonl/.json/.parquet file or folder, or "
                             "hf:NAME[:CONFIG[:SPLIT[:COLUMN]]] (default: builtin)")
    parser.add_argument("--text-column", default="text", help="text field of json/parquet rows (default: text)")
    parser.add_argument("--num-samples", type=at_least(1), default=1024,
                        help="calibration sequences (search: --calibration-samples; default: 1024)")
    parser.add_argument("--seq-len", type=at_least(2), default=4096,
                        help="tokens per calibration sequence (search: --calib-seq-len; default: 4096)")
    parser.add_argument("--batch-size", type=at_least(1), default=8, help="sequences per forward pass (default: 8)")
    parser.add_argument("--seed", type=at_least(0), default=0, help="document order seed (default: 0)")
    parser.add_argument("--batch-agg", default="l2", help="across sequences: l2 or mean (default: l2)")
    parser.add_argument("--seq-agg", default="mean", help="over a sequence's tokens: mean or l2 (default: mean)")
    parser.add_argument("--head-metric", default="contribution",
                        help="contribution: norm of each head's o_proj output (default); attn_output: norm of its "
                             "attention output before o_proj (the Minitron papers')")
    parser.add_argument("--no-layer-metrics", dest="layer_metrics", action="store_false",
                        help="width scores only: no block importance, no layer-removal losses")
    parser.add_argument("--no-layer-loss", dest="layer_loss", action="store_false",
                        help="skip the layer-removal LM losses (loss_drop, windows), the expensive depth metrics")
    parser.add_argument("--window-sizes", type=_window_sizes, default=[1, 2, 4, 8],
                        help="k values: LM loss with each window of k contiguous layers removed (default: 1,2,4,8;"
                             " sizes >= the layer count are dropped)")
    parser.add_argument("--loss-samples", type=at_least(1), default=None,
                        help="sequences used for the layer-removal losses, at most --num-samples (default: 64, or "
                             "--num-samples when fewer)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="auto: CUDA (bf16 autocast) when available, else CPU float32")
    parser.add_argument("--out", required=True, type=Path, help="output directory")
    parser.add_argument("--overwrite", action="store_true", help="recompute and replace --out")
    parser.set_defaults(func=run)


DEFAULT_LOSS_SAMPLES = 64


def _check_args(args: argparse.Namespace, config: dict[str, Any]) -> None:
    check_aggregations(args.batch_agg, args.seq_agg)
    if args.loss_samples is None:
        args.loss_samples = min(DEFAULT_LOSS_SAMPLES, max(1, args.num_samples))
    if args.layer_metrics and args.layer_loss and args.loss_samples > args.num_samples:  # given explicitly
        raise UserError(f"--loss-samples {args.loss_samples} is above --num-samples {args.num_samples}: the "
                        f"layer-removal losses use a subset of the calibration sequences; use at most "
                        f"{args.num_samples}.")
    check_seq_len(args.seq_len, config, "teacher")


def _expected_meta(
    args: argparse.Namespace, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase
) -> dict[str, Any]:
    """The inputs a saved record must match to be reused (see importance.REUSE_KEYS)."""
    _family, arch = describe_model(model)
    num_layers = arch.num_hidden_layers
    layer_loss = args.layer_metrics and args.layer_loss
    return {
        "teacher_arch": arch.name,
        "weights_fingerprint": weights_fingerprint(model),
        "data_fingerprint": data_fingerprint(args.data, tokenizer, "calibration", args.seq_len, args.num_samples,
                                             args.seed, args.text_column),
        "batch_agg": args.batch_agg,
        "seq_agg": args.seq_agg,
        "head_metric": args.head_metric,
        "layer_metrics": args.layer_metrics,
        "layer_loss": layer_loss,
        "window_sizes": [k for k in args.window_sizes if k < num_layers] if layer_loss else [],
        "loss_sequences": args.loss_samples if layer_loss else None,
    }


def run(args: argparse.Namespace) -> int:
    check_output_dir(args.out, overwrite=True)  # an existing --out may be reused or replaced below
    config = load_teacher_config(args.teacher, args.cache_dir, args.trust_remote_code)
    _check_args(args, config)
    device = resolve_device(args.device)
    model, tokenizer = load_teacher(args.teacher, args.cache_dir, device=device,
                                    trust_remote_code=args.trust_remote_code)
    expected = _expected_meta(args, model, tokenizer)
    if args.out.exists() and not args.overwrite:
        if reusable_scores(args.out, expected) is not None:
            print(f"importance scores in {args.out} match these inputs; reusing them (--overwrite recomputes)")
            return 0
        raise UserError(f"output directory {str(args.out)!r} already exists; pass --overwrite to replace it.")
    batches = take_sequences(args.data, tokenizer, "calibration", args.seq_len, args.num_samples, args.seed,
                             args.text_column)  # [N, T]
    scores = compute_importance(
        model, batches, batch_size=args.batch_size, batch_agg=args.batch_agg, seq_agg=args.seq_agg,
        head_metric=args.head_metric, layer_metrics=args.layer_metrics, layer_loss=expected["layer_loss"],
        window_sizes=expected["window_sizes"],
        loss_sequences=args.loss_samples, progress=True,
    )
    meta = dict(scores.meta, **expected, teacher=args.teacher, data=args.data, seed=args.seed, device=device,
                compute_dtype="bfloat16" if device == "cuda" else "float32")
    with atomic_directory(args.out, overwrite=args.overwrite) as tmp:
        dataclasses.replace(scores, meta=meta).save(tmp)
    rate = scores.meta["num_tokens"] / max(scores.meta["width_pass_s"], 1e-9)
    print(f"importance of {meta['teacher_arch']} on {meta['num_tokens']:,} tokens ({rate:,.0f} tok/s) -> {args.out}")
    sys.stdout.flush()
    return 0
