"""`nas-minitron correct-teacher`: fine-tune the teacher on the distillation data (LM loss) before distilling.

The second Minitron paper's fix for a distribution shift between the teacher's pre-training data and the
distillation data: a short LM fine-tune of the teacher on the distillation split.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys

from nas_minitron.atomic import atomic_directory
from nas_minitron.commands.args import (
    add_teacher_args,
    add_training_args,
    check_outputs,
    check_seq_len,
    checkpoint_dir,
    config_from_args,
    device_and_dtype,
    progress,
    tokenize_streams,
)
from nas_minitron.distill.result import distill_record
from nas_minitron.distill.trainer import NonFiniteLossError, distill
from nas_minitron.errors import UserError
from nas_minitron.teacher import load_teacher, load_teacher_config

__all__ = ["register"]

RECORD_FILE = "correction.json"


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "correct-teacher",
        help="fine-tune the teacher on the distillation data (teacher correction)",
        description=(
            "Fine-tune --teacher with its own next-token loss for --tokens tokens of --data's train split, "
            "validating on the validation split; write a from_pretrained-loadable directory to --out, usable as "
            "--teacher afterwards."
        ),
    )
    add_teacher_args(parser, help="teacher: HF directory, .gguf, hub id or the embedded default 'smollm2-135m'")
    add_training_args(parser, lr=1e-5)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    check_outputs(args)
    device, dtype = device_and_dtype(args)
    config = config_from_args(args, dtype, kd_weight=0.0, lm_weight=1.0)
    check_seq_len(args.seq_len, load_teacher_config(args.teacher, args.cache_dir, args.trust_remote_code), "teacher")
    teacher, tokenizer = load_teacher(args.teacher, args.cache_dir, device=device,
                                      trust_remote_code=args.trust_remote_code)
    train, val = tokenize_streams(args, tokenizer)
    ckpt = checkpoint_dir(args)
    on_step, close = progress(config.num_tokens, "correct-teacher")
    try:
        result = distill(teacher, train, val, config, checkpoint_dir=ckpt, resume=args.resume, on_step=on_step)
    except NonFiniteLossError as err:
        raise UserError(f"{err}; try a lower --lr or float32.") from None
    finally:
        close()
    teacher.eval()
    record = distill_record(result, config=config, teacher=args.teacher, data=args.data)
    with atomic_directory(args.out, overwrite=args.overwrite) as tmp:
        teacher.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / RECORD_FILE).write_text(json.dumps(record, indent=1) + "\n")
    if not args.keep_checkpoints:
        shutil.rmtree(ckpt, ignore_errors=True)
    print(f"val_loss {result.curve[0].val_loss:.4f} -> {result.val_loss:.4f} after {result.num_tokens:,} tokens "
          f"-> {args.out}")
    sys.stdout.flush()
    return 0
