"""`nas-minitron distill`: distill a teacher (or its logit cache) into a student directory."""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path
from typing import TYPE_CHECKING

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
    config_from_args,
    device_and_dtype,
    model_config_json,
    non_negative,
    positive,
    progress,
    tokenize_streams,
)
from nas_minitron.distill.logit_cache import MANIFEST, LogitCache, build_logit_cache
from nas_minitron.distill.result import save_distilled
from nas_minitron.distill.trainer import NonFiniteLossError, distill
from nas_minitron.errors import UserError
from nas_minitron.integrity import verify_checksums
from nas_minitron.teacher import (
    load_teacher,
    load_teacher_config,
    tokenizer_fingerprint,
    weights_fingerprint,
)

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase
else:
    torch = lazy_import("torch")

__all__ = ["check_same_tokenizer", "layer_map_from_pruning", "register"]

PLAN_FILE = "pruning.json"


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "distill",
        help="distill a teacher into a (pruned) student",
        description=(
            "Train --student to match --teacher (forward KL on logits, optionally top-k sparse from a shared "
            "--logit-cache, plus optional LM and intermediate-state losses) for --tokens tokens of --data's train "
            "split; validate on its validation split; write the student to --out with distill.json."
        ),
    )
    add_teacher_args(parser, required=False, help="teacher: HF directory, .gguf, hub id or 'smollm2-135m' "
                                                  "(optional with an existing --logit-cache)")
    parser.add_argument("--student", type=Path, required=True,
                        help="student HF directory, e.g. from `nas-minitron prune` (its pruning.json maps layers)")
    parser.add_argument("--logit-cache", type=Path, default=None,
                        help="teacher top-k logit cache: used if it exists, else built here over train+validation")
    parser.add_argument("--topk", type=at_least(0), default=None,
                        help="sparse KD on the teacher's top-k (default: 0 = full logits; 64 with --logit-cache)")
    parser.add_argument("--temperature", type=positive, default=1.0, help="KD temperature (default: 1)")
    parser.add_argument("--lm-weight", type=non_negative, default=0.0,
                        help="weight of the student's LM loss (default: 0)")
    parser.add_argument("--is-loss", choices=("none", "cosine", "mse"), default="none",
                        help="intermediate-state loss between mapped layers (default: none)")
    parser.add_argument("--is-alpha", type=non_negative, default=None,
                        help="fixed weight of the intermediate-state loss (default: automatic L_logits / L_is)")
    add_training_args(parser, lr=1e-4)
    parser.add_argument("--verify", action="store_true",
                        help="check the sha256 of the artifacts this project wrote that it reads (--student's "
                             "checksums.json, an existing --logit-cache): a full read; without it only their sizes "
                             "(a --resume checkpoint is always checked in full)")
    parser.set_defaults(func=run)


def check_same_tokenizer(teacher_tok: PreTrainedTokenizerBase, student_tok: PreTrainedTokenizerBase,
                         teacher_vocab: int, student_vocab: int) -> None:
    """UserError unless teacher and student share tokenizer and vocabulary size: KD compares logits id by id."""
    if teacher_vocab != student_vocab:
        raise UserError(f"teacher and student vocabularies differ: {teacher_vocab} vs {student_vocab} entries.")
    if tokenizer_fingerprint(teacher_tok) != tokenizer_fingerprint(student_tok):
        raise UserError("teacher and student tokenizers differ (different token -> id maps); distillation needs "
                        "the teacher's tokenizer in the student.")


def layer_map_from_pruning(student_dir: Path) -> tuple[int, ...] | None:
    """Kept teacher layers from a pruned student's pruning.json (student layer i <- teacher layer layers[i])."""
    path = student_dir / PLAN_FILE
    if not path.is_file():
        return None
    try:
        return tuple(int(i) for i in json.loads(path.read_text())["keep"]["layers"])
    except (ValueError, KeyError, TypeError) as err:
        raise UserError(f"cannot read kept layers from {str(path)!r}: {err!r}") from None


def _load_student(path: Path, device: str, trust_remote_code: bool,
                  verify: bool = False) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    if not (path / "config.json").is_file():
        raise UserError(f"--student {str(path)!r} is not a Hugging Face model directory (no config.json).")
    hint = "prune or distill it again"
    verify_checksums(path, "student file", hint, full=verify)  # a directory without checksums.json: unchecked
    model, tokenizer = load_pretrained(str(path), "student", trust_remote_code=trust_remote_code, hint=hint)
    model.to(device)  # type: ignore[arg-type]  # transformers' wrapped `to` loses torch's signature
    return model, tokenizer


def _teacher_and_cache(
    args: argparse.Namespace, student: PreTrainedModel, student_tok: PreTrainedTokenizerBase, train: torch.Tensor,
    val: torch.Tensor, device: str, topk: int,
) -> tuple[PreTrainedModel | None, LogitCache | None]:
    """(teacher or None, cache or None). An existing cache means no teacher is loaded at all."""
    if args.logit_cache is not None and (args.logit_cache / MANIFEST).is_file():
        cache = LogitCache.open(args.logit_cache, verify=args.verify)
        if cache.manifest.get("tokenizer_fingerprint") not in (None, tokenizer_fingerprint(student_tok)):
            raise UserError(f"logit cache {str(args.logit_cache)!r} was built with another tokenizer.")
        if args.teacher:  # the cache replaces the teacher; a teacher named beside it must be the cache's teacher
            teacher, _ = load_teacher(args.teacher, args.cache_dir, trust_remote_code=args.trust_remote_code)
            built, given = cache.manifest.get("teacher_fingerprint"), weights_fingerprint(teacher)
            del teacher
            if built is not None and built != given:
                raise UserError(f"logit cache {str(args.logit_cache)!r} was built from another teacher than "
                                f"--teacher {args.teacher!r} (teacher_fingerprint {built} in the cache, {given} for "
                                f"--teacher); rebuild the cache or drop --teacher.")
        return None, cache
    if not args.teacher:
        raise UserError("--teacher is required (unless --logit-cache names an existing cache).")
    teacher, teacher_tok = load_teacher(args.teacher, args.cache_dir, device=device,
                                        trust_remote_code=args.trust_remote_code)
    check_same_tokenizer(teacher_tok, student_tok, teacher.config.vocab_size, student.config.vocab_size)
    if args.logit_cache is None:
        return teacher, None
    both = torch.cat([train, val])  # [N + V, T]: validation KL comes from the cache too
    cache = build_logit_cache(teacher, both, args.logit_cache, topk, args.batch_size, tokenizer=teacher_tok)
    return None, cache


def _check_positions(args: argparse.Namespace) -> None:
    """--seq-len within the student's (and the teacher's, when one is named) max_position_embeddings."""
    check_seq_len(args.seq_len, model_config_json(args.student), "student")
    if args.teacher:
        check_seq_len(args.seq_len, load_teacher_config(args.teacher, args.cache_dir, args.trust_remote_code),
                      "teacher")


def run(args: argparse.Namespace) -> int:
    check_outputs(args)
    device, dtype = device_and_dtype(args)
    topk = args.topk if args.topk is not None else (64 if args.logit_cache else 0)
    config = config_from_args(args, dtype, topk=topk, temperature=args.temperature, lm_weight=args.lm_weight,
                              is_loss=args.is_loss, is_alpha=args.is_alpha)
    _check_positions(args)
    student, tokenizer = _load_student(args.student, device, args.trust_remote_code, args.verify)
    train, val = tokenize_streams(args, tokenizer)
    teacher, cache = _teacher_and_cache(args, student, tokenizer, train, val, device, topk)
    ckpt = checkpoint_dir(args)
    on_step, close = progress(config.num_tokens, "distill")
    try:
        result = distill(student, train, val, config, teacher=teacher, logit_cache=cache, checkpoint_dir=ckpt,
                         resume=args.resume, on_step=on_step,
                         layer_map=layer_map_from_pruning(args.student) if args.is_loss != "none" else None)
    except NonFiniteLossError as err:
        raise UserError(f"{err}; try a lower --lr or float32.") from None
    finally:
        close()
    plan = args.student / PLAN_FILE
    with atomic_directory(args.out, overwrite=args.overwrite) as tmp:
        save_distilled(tmp, student, tokenizer, result, config=config, teacher=args.teacher,
                       student_source=args.student, data=args.data, logit_cache=args.logit_cache,
                       extra_files={PLAN_FILE: plan.read_text()} if plan.is_file() else None)
    if not args.keep_checkpoints:
        shutil.rmtree(ckpt, ignore_errors=True)
    first = result.curve[0]
    print(f"val_loss {first.val_loss:.4f} -> {result.val_loss:.4f}, val_kl {first.val_kl:.4f} -> "
          f"{result.val_kl:.4f} after {result.num_tokens:,} tokens in {result.wall_s:.0f} s -> {args.out}")
    sys.stdout.flush()
    return 0
