"""`nas-minitron correct-teacher`: fine-tune the teacher on the distillation data (LM loss) before distilling.

The second Minitron paper's fix for a distribution shift between the teacher's pre-training data and the
distillation data: a short LM fine-tune of the teacher on the distillation split.
"""

from __future__ import annotations

import argparse
import json
import sys

from nas_minitron.commands.training_args import (
    add_training_args,
    config_from_args,
    load_sequences,
    progress,
    resolve_device,
)
from nas_minitron.errors import UserError

__all__ = ["register"]


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
    parser.add_argument("--teacher", required=True,
                        help="teacher: HF directory, .gguf, hub id or the embedded default 'smollm2-135m'")
    parser.add_argument("--cache-dir", default=None, help="where converted GGUF teachers are cached")
    parser.add_argument("--trust-remote-code", action="store_true", help="allow model code from the repository")
    add_training_args(parser, lr=1e-5)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from nas_minitron.atomic import atomic_directory, check_output_dir
    from nas_minitron.distill.trainer import NonFiniteLossError, distill
    from nas_minitron.teacher import load_teacher

    check_output_dir(args.out, args.overwrite)
    device, dtype = resolve_device(args)
    config = config_from_args(args, dtype, kd_weight=0.0, lm_weight=1.0)
    teacher, tokenizer = load_teacher(args.teacher, args.cache_dir, device=device,
                                      trust_remote_code=args.trust_remote_code)
    train, val = load_sequences(args, tokenizer)
    ckpt = args.checkpoint_dir or args.out.with_name(args.out.name + ".ckpt")
    on_step, close = progress(config.num_tokens, "correct-teacher")
    try:
        result = distill(teacher, train, val, config, checkpoint_dir=ckpt, resume=args.resume, on_step=on_step)
    except NonFiniteLossError as err:
        raise UserError(f"{err}; try a lower --lr or float32.") from None
    finally:
        close()
    teacher.eval()
    record = {"teacher": args.teacher, "data": args.data, "config": config.to_dict(), **result.to_dict()}
    with atomic_directory(args.out, overwrite=args.overwrite) as tmp:
        teacher.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "correction.json").write_text(json.dumps(record, indent=1) + "\n")
    if not args.keep_checkpoints:
        import shutil

        shutil.rmtree(ckpt, ignore_errors=True)
    print(f"val_loss {result.curve[0].val_loss:.4f} -> {result.val_loss:.4f} after {result.num_tokens:,} tokens "
          f"-> {args.out}")
    sys.stdout.flush()
    return 0
