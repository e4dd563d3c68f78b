"""Activation importance (Minitron): per-head, per-neuron, per-channel and per-layer scores from calibration data.

Width (one pass, forward hooks, nothing stored but float32 accumulators):
  head h of layer l     ‖attention output of head h‖₂ per token   (o_proj's input, slice h·d:(h+1)·d)
  neuron j of layer l   |MLP intermediate activation j| per token (down_proj's input)
  embedding channel c   |normalized hidden state c| per token, from every RMSNorm's output (input_layernorm,
                        post_attention_layernorm of each layer, and the final norm), summed over those norms
Each is aggregated over a sequence's real tokens (`seq_agg`: mean or l2), then across sequences (`batch_agg`: l2 or
mean); the papers' best choice, and the default, is mean over tokens then l2 over the batch.

Depth: block importance (1 − cosine between a layer's input and output hidden states, mean over tokens) from hooks in
the same pass; `loss_drop` (LM-loss rise when one layer is skipped) and `windows[k]` (LM loss when layers i..i+k-1
are skipped) from extra forward passes over the first `loss_sequences` sequences.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nas_minitron._lazy import lazy_import
from nas_minitron.errors import UserError
from nas_minitron.families import describe_model, get_family
from nas_minitron.prune.lm_loss import removal_losses, token_loss_sum
from nas_minitron.prune.scores import ImportanceScores
from nas_minitron.runtime import bf16_autocast

if TYPE_CHECKING:
    import torch
    import tqdm.auto as tqdm_auto
    from transformers import PreTrainedModel
else:
    torch = lazy_import("torch")
    tqdm_auto = lazy_import("tqdm.auto")

__all__ = [
    "BATCH_AGGS", "HEAD_METRICS", "REUSE_KEYS", "SEQ_AGGS", "check_aggregations", "compute_importance",
    "importance_hooks", "reusable_scores",
]

BATCH_AGGS = ("l2", "mean")
# contribution: ‖o_proj(head slice)‖, the head's write into the residual stream (default: on SmolLM2 the papers'
# attn_output norm picked heads worse than random, see benchmarks/bench_importance_quality.py);
# attn_output: ‖head slice of o_proj's input‖, the Minitron papers' definition.
HEAD_METRICS = ("contribution", "attn_output")
SEQ_AGGS = ("mean", "l2")


def check_aggregations(batch_agg: str, seq_agg: str) -> None:
    if batch_agg not in BATCH_AGGS:
        raise UserError(f"--batch-agg must be one of {', '.join(BATCH_AGGS)}, but got {batch_agg!r}.")
    if seq_agg not in SEQ_AGGS:
        raise UserError(f"--seq-agg must be one of {', '.join(SEQ_AGGS)}, but got {seq_agg!r}.")


@dataclass
class _Accumulators:
    """Float32 running sums over sequences (sum of squares for batch l2, plain sums for batch mean)."""

    heads: torch.Tensor  # [L, A]
    neurons: torch.Tensor  # [L, I]
    channels: torch.Tensor  # [2L + 1, H]: one row per norm
    block_cos: torch.Tensor  # [L] sum over sequences of the mean cosine(input, output)
    mask: torch.Tensor | None = None  # [B, T] float of the batch in flight; None = no padding
    layer_inputs: dict[int, torch.Tensor] = field(default_factory=dict)


def _per_sequence(values: torch.Tensor, mask: torch.Tensor | None, seq_agg: str) -> torch.Tensor:
    """[B, T, U] non-negative per-token values → [B, U] aggregated over each sequence's real tokens."""
    if seq_agg == "l2":
        squares = values.pow(2)
        if mask is not None:
            squares = squares * mask[:, :, None]
        return squares.sum(dim=1).sqrt()
    if mask is None:
        return values.mean(dim=1)
    return (values * mask[:, :, None]).sum(dim=1) / mask.sum(dim=1).clamp(min=1)[:, None]


def _accumulate(acc: torch.Tensor, per_seq: torch.Tensor, batch_agg: str) -> None:
    """Add a batch's [B, U] per-sequence values into the running [U] accumulator."""
    acc += per_seq.pow(2).sum(dim=0) if batch_agg == "l2" else per_seq.sum(dim=0)


def _finalize(acc: torch.Tensor, num_sequences: int, batch_agg: str) -> torch.Tensor:
    return acc.sqrt() if batch_agg == "l2" else acc / max(num_sequences, 1)


def _first_tensor(output: Any) -> torch.Tensor:
    first: torch.Tensor = output[0] if isinstance(output, tuple) else output
    return first


@contextlib.contextmanager
def importance_hooks(
    model: PreTrainedModel, acc: _Accumulators, batch_agg: str, seq_agg: str, block_importance: bool,
    head_metric: str = "contribution",
) -> Iterator[_Accumulators]:
    """Register the scoring hooks for the block's duration; they read `acc.mask` of the batch in flight."""
    family = get_family(model.config.model_type)
    num_heads = acc.heads.shape[1]
    handles = []

    def add(values: torch.Tensor, target: torch.Tensor) -> None:
        _accumulate(target, _per_sequence(values, acc.mask, seq_agg), batch_agg)

    def on_heads(index: int, o_proj: Any):  # type: ignore[no-untyped-def]
        gram = None
        if head_metric == "contribution":
            # ‖W_o[:, h] x_h‖ = sqrt(x_hᵀ (W_hᵀ W_h) x_h): head h's write into the residual, at d² per head per token
            w = o_proj.weight.detach().float().unflatten(1, (num_heads, -1))  # [H, A, d]
            gram = torch.einsum("kad,kae->ade", w, w)  # [A, d, d]

        def hook(_module: Any, args: tuple[Any, ...]) -> None:
            x = args[0].detach().float().unflatten(-1, (num_heads, -1))  # [B, T, A, d]
            if gram is None:
                norms = x.norm(dim=-1)  # [B, T, A]
            else:
                norms = torch.einsum("btad,ade,btae->bta", x, gram, x).clamp(min=0).sqrt()  # [B, T, A]
            add(norms, acc.heads[index])
        return hook

    def on_neurons(index: int):  # type: ignore[no-untyped-def]
        def hook(_module: Any, args: tuple[Any, ...]) -> None:
            add(args[0].detach().float().abs(), acc.neurons[index])  # [B, T, I]
        return hook

    def on_norm(row: int):  # type: ignore[no-untyped-def]
        def hook(_module: Any, _args: Any, output: Any) -> None:
            add(_first_tensor(output).detach().float().abs(), acc.channels[row])  # [B, T, H]
        return hook

    def on_layer_in(index: int):  # type: ignore[no-untyped-def]
        def hook(_module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            acc.layer_inputs[index] = args[0] if args else kwargs["hidden_states"]
        return hook

    def on_layer_out(index: int):  # type: ignore[no-untyped-def]
        def hook(_module: Any, _args: Any, output: Any) -> None:
            before = acc.layer_inputs.pop(index).detach().float()  # [B, T, H]
            after = _first_tensor(output).detach().float()
            cos = torch.nn.functional.cosine_similarity(before, after, dim=-1)  # [B, T]
            acc.block_cos[index] += _per_sequence(cos[:, :, None], acc.mask, "mean").sum()
        return hook

    try:
        for i, layer in enumerate(family.decoder_layers(model)):
            parts = family.layer_parts(layer)
            handles.append(parts.o_proj.register_forward_pre_hook(on_heads(i, parts.o_proj)))
            handles.append(parts.down_proj.register_forward_pre_hook(on_neurons(i)))
            handles.append(parts.input_layernorm.register_forward_hook(on_norm(2 * i)))
            handles.append(parts.post_attention_layernorm.register_forward_hook(on_norm(2 * i + 1)))
            if block_importance:
                handles.append(layer.register_forward_pre_hook(on_layer_in(i), with_kwargs=True))
                handles.append(layer.register_forward_hook(on_layer_out(i)))
        handles.append(family.final_norm(model).register_forward_hook(on_norm(acc.channels.shape[0] - 1)))
        yield acc
    finally:
        for handle in handles:
            handle.remove()
        acc.layer_inputs.clear()


_STAGES = ("input norm output", "attention output (o_proj input)", "post-attention norm output",
           "MLP intermediate activation (down_proj input)")


def _check_finite(acc: _Accumulators) -> None:
    """UserError naming the first layer (in forward order) whose activations went NaN/Inf; one sync per batch."""
    norms = acc.channels[:-1].isfinite().all(dim=1).view(-1, 2)  # [L, 2]: input norm, post-attention norm
    finite = torch.stack(
        [norms[:, 0], acc.heads.isfinite().all(dim=1), norms[:, 1], acc.neurons.isfinite().all(dim=1)], dim=1
    )  # [L, 4] in forward order
    final_ok = acc.channels[-1].isfinite().all()
    if bool(finite.all() & final_ok):
        return
    bad = (~finite).flatten().nonzero()
    if len(bad) == 0:
        raise UserError("non-finite (NaN/Inf) activations at the final norm output.")
    layer, stage = divmod(int(bad[0]), len(_STAGES))
    raise UserError(f"non-finite (NaN/Inf) activations in layer {layer}: {_STAGES[stage]}.")


def _progress(total_tokens: int, label: str, enabled: bool) -> tqdm_auto.tqdm[Any]:
    return tqdm_auto.tqdm(total=total_tokens, desc=label, unit="tok", unit_scale=True, disable=not enabled, leave=False)


def _check_inputs(model: PreTrainedModel, batches: torch.Tensor, batch_size: int, batch_agg: str, seq_agg: str,
                  head_metric: str) -> None:
    check_aggregations(batch_agg, seq_agg)
    if head_metric not in HEAD_METRICS:
        raise UserError(f"--head-metric must be one of {', '.join(HEAD_METRICS)}, but got {head_metric!r}.")
    if batches.dim() != 2 or batches.shape[0] == 0 or batches.shape[1] < 2:
        raise UserError(f"expected token batches of shape [N>0, T>1], but got {tuple(batches.shape)}.")
    max_positions = getattr(model.config, "max_position_embeddings", None)
    if max_positions and batches.shape[1] > max_positions:
        raise UserError(
            f"--seq-len {batches.shape[1]} is above the teacher's max_position_embeddings={max_positions}."
        )
    if batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, but got {batch_size}.")


def _width_pass(
    model: PreTrainedModel,
    batches: torch.Tensor,
    mask: torch.Tensor | None,
    acc: _Accumulators,
    options: dict[str, Any],
) -> tuple[float, int]:
    """The hooked pass over all batches; returns (summed LM loss, predicted tokens) when layer metrics are on."""
    device = next(model.parameters()).device
    want_loss = options["loss_sequences"] > 0
    total, count = 0.0, 0
    bar = _progress(int(batches.numel()), "importance", options["progress"])
    hooks = importance_hooks(model, acc, options["batch_agg"], options["seq_agg"], options["layer_metrics"],
                             options["head_metric"])
    with hooks as state, \
            torch.inference_mode(), bf16_autocast(device, device.type == "cuda"), bar:
        for start in range(0, batches.shape[0], options["batch_size"]):
            ids = batches[start : start + options["batch_size"]].to(device)  # [b, T]
            part = None if mask is None else mask[start : start + options["batch_size"]].to(device)
            state.mask = None if part is None else part.float()
            # logits are only needed for the base loss; without it the LM head would be wasted work
            out = model(input_ids=ids, attention_mask=part, use_cache=False, logits_to_keep=0 if want_loss else 1)
            if want_loss and start < options["loss_sequences"]:
                keep = options["loss_sequences"] - start
                loss, num = token_loss_sum(out.logits[:keep], ids[:keep], None if part is None else part[:keep])
                total, count = total + loss, count + num
            _check_finite(acc)
            bar.update(int(ids.numel()))
    return total, count


def _removal_losses(
    model: PreTrainedModel,
    batches: torch.Tensor,
    mask: torch.Tensor | None,
    removals: Sequence[tuple[int, ...]],
    options: dict[str, Any],
) -> dict[tuple[int, ...], float]:
    """Mean LM loss with each set of layers skipped, on the first `loss_sequences` sequences."""
    rows = options["loss_sequences"]
    with _progress(len(removals) * rows * batches.shape[1], "layer removal", options["progress"]) as bar:
        return removal_losses(model, batches[:rows], None if mask is None else mask[:rows], removals,
                              options["batch_size"], on_tokens=bar.update)


def compute_importance(
    model: PreTrainedModel,
    batches: torch.Tensor,
    *,
    batch_size: int = 8,
    batch_agg: str = "l2",
    seq_agg: str = "mean",
    layer_metrics: bool = True,
    layer_loss: bool = True,
    window_sizes: Sequence[int] = (1,),
    loss_sequences: int | None = None,
    attention_mask: torch.Tensor | None = None,
    progress: bool = False,
    head_metric: str = "contribution",
) -> ImportanceScores:
    """Score every head, neuron, embedding channel and layer of `model` on [N, T] token `batches`.

    `layer_metrics=False` gives width scores only (one hooked pass, nothing else). With it, block importance comes
    from the same pass; `layer_loss` adds `loss_drop` and `windows[k]` for each k in `window_sizes`, measured on the
    first `loss_sequences` sequences (default all). `attention_mask` [N, T] (1 = real token) masks padding.
    """
    _check_inputs(model, batches, batch_size, batch_agg, seq_agg, head_metric)
    _, arch = describe_model(model)
    num_layers, num_sequences = arch.num_hidden_layers, int(batches.shape[0])
    windows = sorted({int(k) for k in window_sizes}) if layer_metrics and layer_loss else []
    if any(not 1 <= k < num_layers for k in windows):
        raise UserError(f"window sizes must lie in [1, {num_layers - 1}], but got {list(window_sizes)}.")
    rows = min(loss_sequences or num_sequences, num_sequences)
    options = dict(batch_size=batch_size, batch_agg=batch_agg, seq_agg=seq_agg, layer_metrics=layer_metrics,
                   loss_sequences=rows if layer_metrics and layer_loss else 0, progress=progress,
                   head_metric=head_metric)
    device = next(model.parameters()).device
    zeros = lambda *shape: torch.zeros(*shape, dtype=torch.float32, device=device)  # noqa: E731
    acc = _Accumulators(zeros(num_layers, arch.num_attention_heads), zeros(num_layers, arch.intermediate_size),
                        zeros(2 * num_layers + 1, arch.hidden_size), zeros(num_layers))
    mask = None if attention_mask is None or bool(attention_mask.all()) else attention_mask.long()
    start = time.perf_counter()
    loss_sum, loss_count = _width_pass(model, batches, mask, acc, options)
    width_s = time.perf_counter() - start
    layers: dict[str, torch.Tensor] = {}
    window_losses: dict[int, torch.Tensor] = {}
    meta: dict[str, Any] = {}
    if layer_metrics:
        layers["block_importance"] = 1.0 - acc.block_cos.cpu() / num_sequences
    if options["loss_sequences"]:
        base = loss_sum / max(loss_count, 1)
        removals = sorted({tuple(range(i, i + k)) for k in set(windows) | {1} for i in range(num_layers - k + 1)})
        losses = _removal_losses(model, batches, mask, removals, options)
        layers["loss_drop"] = torch.tensor([losses[(i,)] - base for i in range(num_layers)])
        for k in windows:
            window_losses[k] = torch.tensor([losses[tuple(range(i, i + k))] for i in range(num_layers - k + 1)])
        meta.update(base_loss=base)
    num_tokens = int(batches.numel() if mask is None else mask.sum())
    finalize = lambda t: _finalize(t, num_sequences, batch_agg).cpu()  # noqa: E731
    meta.update(
        criterion="activation", teacher_arch=arch.name, batch_agg=batch_agg, seq_agg=seq_agg, head_metric=head_metric,
        num_sequences=num_sequences, seq_len=int(batches.shape[1]), num_tokens=num_tokens,
        layer_metrics=layer_metrics, layer_loss=bool(options["loss_sequences"]), window_sizes=windows,
        loss_sequences=options["loss_sequences"] or None,
        width_pass_s=round(width_s, 3), wall_s=round(time.perf_counter() - start, 3),
    )
    return ImportanceScores(
        heads=finalize(acc.heads),
        neurons=finalize(acc.neurons),
        channels=finalize(acc.channels).sum(dim=0),  # summed over every norm, each aggregated on its own
        layers=layers,
        windows=window_losses,
        meta=meta,
    )


# ---- provenance: what a saved record was computed from, and whether a rerun may reuse it ----------------------------
# Meta keys that must match for a saved record to stand in for a new computation (device, dtype and batch size only
# move scores by rounding, so they are recorded but not compared).
REUSE_KEYS = (
    "teacher_arch", "weights_fingerprint", "data_fingerprint", "batch_agg", "seq_agg", "head_metric", "layer_metrics",
    "layer_loss", "window_sizes", "loss_sequences",
)


def reusable_scores(directory: str | os.PathLike[str], expected: dict[str, Any]) -> ImportanceScores | None:
    """The record saved in `directory` if its inputs match `expected`; None if there is none; UserError otherwise."""
    if not (Path(directory) / "scores.json").is_file():
        return None
    scores = ImportanceScores.load(directory)
    differ = [f"{key} saved {scores.meta.get(key)!r}, now {value!r}"
              for key, value in expected.items() if scores.meta.get(key) != value]
    if differ:
        raise UserError(
            f"{str(directory)!r} holds importance scores computed from other inputs ({'; '.join(differ)}); "
            f"pass --overwrite to recompute, or choose another --out."
        )
    return scores
