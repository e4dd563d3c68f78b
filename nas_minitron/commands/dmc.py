"""`nas-minitron dmc`: retrofit a model with Dynamic Memory Compression and write it with its `dmc.json`."""

from __future__ import annotations

import argparse
import copy
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nas_minitron._lazy import lazy_import
from nas_minitron.artifacts import load_pretrained
from nas_minitron.atomic import atomic_directory
from nas_minitron.commands.args import (
    add_teacher_args,
    add_training_args,
    at_least,
    check_outputs,
    check_seq_len,
    checkpoint_dir,
    device_and_dtype,
    fraction,
    model_config_json,
    non_negative,
    positive,
    tokenize_streams,
)
from nas_minitron.commands.distill import check_same_tokenizer
from nas_minitron.dmc.export import record_for, save_dmc_model
from nas_minitron.dmc.schedule import LOSSES, RetrofitConfig
from nas_minitron.dmc.settings import DMC_FILE, DMCSettings, check_target_cr
from nas_minitron.dmc.train import RetrofitResult, RetrofitStep, retrofit
from nas_minitron.errors import UserError
from nas_minitron.teacher import load_teacher, load_teacher_config

if TYPE_CHECKING:
    import tqdm
    from transformers import PreTrainedModel

    from nas_minitron.dmc import attention
else:
    tqdm = lazy_import("tqdm")
    attention = lazy_import("nas_minitron.dmc.attention")

__all__ = ["register"]


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "dmc",
        help="retrofit a model to compress its own KV cache (Dynamic Memory Compression)",
        description=(
            "Continue training --model so that each KV head learns to merge tokens into its last cache entry "
            "(DMC, arXiv 2403.09636): stage 1 fades the decision channels out of attention, stage 2 ramps the "
            "target compression ratio from 1 to --target-cr, stage 3 fine-tunes at --target-cr. Loss: KD from the "
            "uncompressed model (default; --teacher to use another) or the LM loss, plus the compression penalty. "
            "--out is a stock-loadable model directory plus dmc.json; load it with nas_minitron.dmc.load_dmc_model."
        ),
    )
    parser.add_argument("--model", type=Path, required=True, help="HF model directory to retrofit")
    parser.add_argument("--target-cr", type=float, required=True, help="final KV-cache compression ratio (>= 1)")
    add_teacher_args(parser, required=False, help="KD teacher (default: --model itself, uncompressed): HF "
                                                  "directory, .gguf, hub id or 'smollm2-135m'")
    parser.add_argument("--loss", choices=LOSSES, default="kd", help="kd (default) or lm")
    parser.add_argument("--fade-fraction", type=fraction, default=0.1, help="share of steps in stage 1 (default 0.1)")
    parser.add_argument("--finetune-fraction", type=fraction, default=0.2,
                        help="share of steps in stage 3, at the final ratio (default 0.2)")
    parser.add_argument("--penalty-weight", type=non_negative, default=1.0, help="weight of the CR penalty (default 1)")
    parser.add_argument("--decision-lr-scale", type=positive, default=1.0,
                        help="multiply the learning rate of the decision channels' rows (q[-1], k[-1]; past stage 1 "
                             "they feed only the decisions) by this (default 1, the paper's single rate; short "
                             "retrofits need ~100 to reach their target CR, see benchmarks/RESULTS.md)")
    parser.add_argument("--reset-decision-rows", action="store_true",
                        help="zero the decision channels' rows when stage 2 begins, so every head starts appending "
                             "(a pretrained channel may already exceed the threshold in some layers)")
    parser.add_argument("--window", type=at_least(1), default=12,
                        help="tokens a merged entry averages at most (default 12)")
    add_training_args(parser, lr=1e-4)
    parser.set_defaults(func=run)


def _config(args: argparse.Namespace, dtype: str) -> RetrofitConfig:
    tokens_per_step = args.seq_len * args.batch_size * args.grad_accum
    every = args.eval_every_tokens // max(1, tokens_per_step) if args.eval_every_tokens else 0
    return RetrofitConfig(
        target_cr=args.target_cr, num_tokens=args.tokens, seq_len=args.seq_len, batch_size=args.batch_size,
        grad_accum=args.grad_accum, lr=args.lr, warmup_fraction=args.warmup_fraction,
        fade_fraction=args.fade_fraction, finetune_fraction=args.finetune_fraction, loss=args.loss,
        penalty_weight=args.penalty_weight,
        decision_lr_scale=args.decision_lr_scale, reset_decision_rows=args.reset_decision_rows,
        seed=args.seed, dtype=dtype, settings=DMCSettings(window=args.window),
        checkpoint_every_steps=max(every, 0), keep_last_k=args.keep_last_k,
    )


def _teacher(args: argparse.Namespace, model: PreTrainedModel, tokenizer: object, device: str,
             ) -> PreTrainedModel | None:
    if args.loss != "kd":
        return None
    if args.teacher is None:
        teacher = copy.deepcopy(model)  # the uncompressed model, before apply_dmc
    else:
        teacher, teacher_tok = load_teacher(args.teacher, args.cache_dir, device=device,
                                            trust_remote_code=args.trust_remote_code)
        check_same_tokenizer(teacher_tok, tokenizer, teacher.config.vocab_size,  # type: ignore[arg-type]
                             model.config.vocab_size)
    teacher.requires_grad_(False)
    teacher.to(device)  # type: ignore[arg-type]  # transformers' wrapped `to` loses torch's signature
    teacher.eval()
    return teacher


def _progress(total_tokens: int) -> tuple[Any, Callable[[RetrofitStep], None]]:
    """A tqdm bar on stderr showing the stage and the achieved / target CR: (bar, per-step callback)."""
    bar = tqdm.tqdm(total=total_tokens, desc="dmc", unit="tok", unit_scale=True, file=sys.stderr,
                                     dynamic_ncols=True)

    def on_step(info: RetrofitStep) -> None:
        bar.update(info.num_tokens - bar.n)
        bar.set_postfix(stage=info.stage, cr=f"{info.achieved_cr:.2f}/{info.target_cr:.2f}", loss=f"{info.loss:.4f}")

    return bar, on_step


def run(args: argparse.Namespace) -> int:
    check_target_cr(args.target_cr)
    check_outputs(args)
    device, dtype = device_and_dtype(args)
    config = _config(args, dtype)  # validates every setting before anything is loaded or written
    if not (args.model / "config.json").is_file():
        raise UserError(f"--model {str(args.model)!r} is not a Hugging Face model directory (no config.json).")
    if (args.model / DMC_FILE).is_file():
        raise UserError(f"--model {str(args.model)!r} is already a DMC model ({DMC_FILE}); retrofit its uncompressed "
                        f"original instead.")
    check_seq_len(args.seq_len, model_config_json(args.model), "model")
    if args.teacher is not None and args.loss == "kd":
        check_seq_len(args.seq_len, load_teacher_config(args.teacher, args.cache_dir, args.trust_remote_code),
                      "teacher")
    model, tokenizer = load_pretrained(str(args.model), "model", trust_remote_code=args.trust_remote_code,
                                       hint="pass an HF model directory")
    attention.check_supported(model)
    teacher = _teacher(args, model, tokenizer, device)
    attention.apply_dmc(model, config.settings)
    model.to(device)  # type: ignore[arg-type]
    if args.grad_checkpointing:
        model.gradient_checkpointing_enable()
    train, val = tokenize_streams(args, tokenizer)
    ckpt = checkpoint_dir(args)
    bar, on_step = _progress(config.total_steps * config.tokens_per_step)
    try:
        result = retrofit(model, train, val, config, teacher=teacher, checkpoint_dir=ckpt, resume=args.resume,
                          on_step=on_step)
    finally:
        bar.close()
    _write(args, model, tokenizer, config, result)
    if not args.keep_checkpoints:
        shutil.rmtree(ckpt, ignore_errors=True)
    m = result.metrics
    kl = f", val_kl {m['val_kl']:.4f}" if m.get("val_kl") is not None else ""
    print(f"achieved CR {m['achieved_cr']:.2f} (target {config.target_cr:g}), val_loss {m['val_loss']:.4f}{kl} "
          f"after {result.num_tokens:,} tokens in {result.wall_s:.0f} s -> {args.out}")
    sys.stdout.flush()
    return 0


def _write(args: argparse.Namespace, model: PreTrainedModel, tokenizer: object, config: RetrofitConfig,
           result: RetrofitResult) -> None:
    m = result.metrics
    training = {"source_model": str(args.model), "teacher": args.teacher or "the source model (uncompressed)",
                "data": args.data, "num_tokens": result.num_tokens, "num_steps": result.num_steps,
                "stage_steps": list(config.stage_steps()), "config": config.to_dict(), "val_loss": m["val_loss"],
                "val_kl": m["val_kl"], "per_head_cr": m["per_head_cr"], "wall_s": result.wall_s}
    record = record_for(model, settings=config.settings, target_cr=config.target_cr, achieved_cr=m["achieved_cr"],
                        per_layer_cr=m["per_layer_cr"], training=training)
    with atomic_directory(args.out, overwrite=args.overwrite) as tmp:
        save_dmc_model(tmp, model, tokenizer, record)  # type: ignore[arg-type]
