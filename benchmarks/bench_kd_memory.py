"""Peak CPU memory of the KD loss forward + backward, chunked vs unchunked, at a Llama-3 vocabulary (128,256).

What is measured: the loss alone, from final hidden states [N, H] to gradients of the hidden states and of the
student's lm_head (the part of a step that depends on the vocabulary): full-logit KD (teacher logits from its
hidden states and head) and top-k KD (cached top-k log-probs), each unchunked (`forward_kl` / `topk_forward_kl` on
full logits, as the trainer did before #12) and chunked (`chunked_logit_losses`, as it does now). Each
measurement runs in a fresh subprocess: inputs are built first, then `resource.getrusage(RUSAGE_SELF).ru_maxrss`
(the process's peak RSS) is read before and after one forward + backward; the difference is the loss's peak above
its inputs. float32 on CPU (the same tensors exist under bf16 autocast on a GPU, the logits themselves in bf16).

Then the arithmetic for batch 8 x seq 4096 (N = 32,768): a line a + b * N fitted through two measured N per variant.

  PYTHONPATH=. python benchmarks/bench_kd_memory.py
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

VOCAB = 128_256
HIDDEN = 576  # SmolLM2-135M's width; the teacher's is HIDDEN + 384 (960, SmolLM2-360M's)
TOPK = 64
GIB = 1024**3


def child(variant: str, num_tokens: int, chunk: int) -> dict[str, float]:
    """One forward + backward of one loss variant; the peak RSS above the inputs, in bytes."""
    import torch

    from nas_minitron.distill.losses import TeacherTargets, chunked_logit_losses, forward_kl, topk_forward_kl

    torch.manual_seed(0)
    hidden = torch.randn(num_tokens, HIDDEN).requires_grad_()  # [N, H]
    head = torch.nn.Linear(HIDDEN, VOCAB, bias=False)  # [V, H] student lm_head
    teacher_head = torch.nn.Linear(HIDDEN + 384, VOCAB, bias=False).requires_grad_(False)
    teacher_hidden = torch.randn(num_tokens, HIDDEN + 384)  # [N, H_t]
    logprobs = torch.log_softmax(torch.randn(num_tokens, TOPK), -1).half()  # [N, k] as a cache stores them
    indices = torch.randint(0, VOCAB, (num_tokens, TOPK))  # [N, k]
    head.weight.grad = torch.zeros_like(head.weight)  # allocated up front: not part of the loss's own peak
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: kilobytes
    start = time.perf_counter()
    if variant == "full-unchunked":
        with torch.no_grad():
            teacher_logits = teacher_head(teacher_hidden)  # [N, V]
        loss = forward_kl(head(hidden), teacher_logits)
    elif variant == "topk-unchunked":
        loss = topk_forward_kl(head(hidden), logprobs, indices)
    elif variant == "full-chunked":
        loss = chunked_logit_losses(hidden, head, chunk,
                                    teacher=TeacherTargets(hidden=teacher_hidden, head=teacher_head))["kd"]
    elif variant == "topk-chunked":
        cached = TeacherTargets(logprobs=logprobs, indices=indices)
        loss = chunked_logit_losses(hidden, head, chunk, teacher=cached)["kd"]
    else:
        raise SystemExit(f"unknown variant {variant!r}")
    loss.backward()
    wall_s = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"peak_delta_bytes": after - before, "wall_s": wall_s, "loss": float(loss.detach())}


def measure(variant: str, num_tokens: int, chunk: int) -> dict[str, float]:
    out = subprocess.run([sys.executable, __file__, "--child", variant, str(num_tokens), str(chunk)],
                         capture_output=True, text=True, check=True).stdout
    return dict(json.loads(out.strip().splitlines()[-1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--child", nargs=3, metavar=("VARIANT", "N", "CHUNK"), help=argparse.SUPPRESS)
    parser.add_argument("--chunk", type=int, default=1024, help="loss_chunk_tokens of the chunked variants")
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child[0], int(args.child[1]), int(args.child[2]))))
        return
    target = 8 * 4096
    plan = {"full-unchunked": (1024, 2048), "topk-unchunked": (1024, 2048),
            "full-chunked": (2048, 4096), "topk-chunked": (2048, 4096)}
    nv = VOCAB * 4  # bytes of one float32 row of logits
    print(f"vocab {VOCAB:,}, hidden {HIDDEN}, top-k {TOPK}, chunk {args.chunk}; peak RSS above the inputs")
    print("| variant | N tokens | peak delta GiB | = fp32 [N, V] tensors | wall s | loss |")
    print("|---|---|---|---|---|---|")
    fits = {}
    for variant, sizes in plan.items():
        points = []
        for n in sizes:
            m = measure(variant, n, args.chunk)
            points.append((n, m["peak_delta_bytes"]))
            print(f"| {variant} | {n:,} | {m['peak_delta_bytes'] / GIB:.2f} | {m['peak_delta_bytes'] / (n * nv):.2f} | "
                  f"{m['wall_s']:.1f} | {m['loss']:.4f} |")
        (n0, p0), (n1, p1) = points
        slope = (p1 - p0) / (n1 - n0)
        fits[variant] = (p0 - slope * n0, slope)
    print(f"\nfitted a + b * N, extrapolated to batch 8 x seq 4096 (N = {target:,}):")
    print("| variant | a GiB | b bytes/token | = fp32 V-rows per token | at N = 32,768 GiB |")
    print("|---|---|---|---|---|")
    for variant, (a, b) in fits.items():
        print(f"| {variant} | {a / GIB:.2f} | {b:,.0f} | {b / nv:.2f} | {(a + b * target) / GIB:.1f} |")
    print(f"\none float32 [32768, {VOCAB}] tensor: {target * nv / GIB:.1f} GiB; one [chunk, V] chunk: "
          f"{args.chunk * nv / GIB:.2f} GiB")


if __name__ == "__main__":
    main()
