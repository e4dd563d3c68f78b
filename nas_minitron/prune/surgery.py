"""Surgery: teacher + target ArchConfig + keep indices → a stock HF model of the teacher's class.

The student's config is built from the teacher's config and the ArchConfig before the model exists (never patched
afterwards); weights are then gathered from the teacher with `index_select`, so keeping everything in the original
order reproduces the teacher bit for bit.
"""

from __future__ import annotations

import contextlib
import math
from typing import TYPE_CHECKING, Any

from nas_minitron._lazy import lazy_import
from nas_minitron.arch import ArchConfig, count_params, prune_problems
from nas_minitron.errors import UserError
from nas_minitron.families import DecoderFamily, describe_model
from nas_minitron.prune.keep import KeepIndices

if TYPE_CHECKING:
    import torch
    import transformers
    import transformers.initialization as transformers_init
    from transformers import PreTrainedModel
else:
    torch = lazy_import("torch")
    transformers = lazy_import("transformers")
    transformers_init = lazy_import("transformers.initialization")

__all__ = ["check_target", "materialize"]


def check_target(family: DecoderFamily, teacher: ArchConfig, target: ArchConfig) -> None:
    """UserError unless `target` can be pruned out of `teacher` and stock transformers loads it."""
    problems = prune_problems(target, teacher)
    loadable = family.loadable_problem(target)
    if loadable:
        problems.append(loadable)
    if problems:
        raise UserError(f"cannot prune {teacher.name} to {target.name}: " + "; ".join(problems) + ".")


def materialize(
    teacher: PreTrainedModel, target: ArchConfig, keep: KeepIndices, rescale_norms: bool = True
) -> PreTrainedModel:
    """Build the student. `rescale_norms` multiplies RMSNorm weights by sqrt(H/H') when channels are pruned.

    RMSNorm divides by the root mean square over the *remaining* channels; when the pruned channels carry little
    energy (which is why importance pruned them) the student's RMS is overestimated by sqrt(H/H'), and this
    factor undoes that. Pruning channels that are exactly zero is then lossless up to the norm's epsilon.
    """
    family, t_arch = describe_model(teacher)
    check_target(family, t_arch, target)
    keep.validate(t_arch, target)
    config_dict = family.student_config_dict(teacher.config.to_dict(), target, keep.layers)
    config = transformers.AutoConfig.for_model(**config_dict)
    param = next(teacher.parameters())
    with _no_init(), torch.device(param.device):
        student: PreTrainedModel = transformers.AutoModelForCausalLM.from_config(config, dtype=param.dtype)
    student.tie_weights()  # transformers ties inside init_weights, which _no_init skips
    student.eval()
    with torch.no_grad():
        _copy_weights(family, teacher, student, t_arch, target, keep, rescale_norms)
    expected = count_params(target, family.invariants_from_config(teacher.config.to_dict()))
    actual = sum(p.numel() for p in student.parameters())
    assert actual == expected, f"{target.name}: counted {expected} parameters, built {actual}"
    return student


def _no_init() -> contextlib.AbstractContextManager[object]:
    """Skip random initialisation of weights that are overwritten right after."""
    try:
        no_init_weights = transformers_init.no_init_weights
    except ImportError:  # pragma: no cover - older transformers
        return contextlib.nullcontext()
    return no_init_weights()


def _rows(units: tuple[int, ...], width: int, device: torch.device) -> torch.Tensor:
    """Row indices of whole `width`-sized blocks (heads), in the given unit order."""
    idx = torch.tensor(units, dtype=torch.long, device=device)
    return (idx[:, None] * width + torch.arange(width, device=device)).reshape(-1)  # [len(units) * width]


def _take(weight: torch.Tensor, rows: torch.Tensor | None, cols: torch.Tensor | None) -> torch.Tensor:
    if rows is not None:
        weight = weight.index_select(0, rows)
    if cols is not None:
        weight = weight.index_select(1, cols)
    return weight


def _copy_linear(dst: Any, src: Any, rows: torch.Tensor | None, cols: torch.Tensor | None) -> None:
    """Copy an nn.Linear's kept rows/columns (Any: see `LayerParts`)."""
    dst.weight.copy_(_take(src.weight, rows, cols))
    if src.bias is not None:
        dst.bias.copy_(src.bias if rows is None else src.bias.index_select(0, rows))


def _copy_norm(dst: Any, src: Any, hidden: torch.Tensor, scale: float) -> None:
    """Copy an RMSNorm's kept channels, scaled (Any: see `LayerParts`)."""
    weight = src.weight.index_select(0, hidden)
    dst.weight.copy_(weight * scale if scale != 1.0 else weight)


def _copy_weights(
    family: DecoderFamily,
    teacher: PreTrainedModel,
    student: PreTrainedModel,
    t_arch: ArchConfig,
    target: ArchConfig,
    keep: KeepIndices,
    rescale_norms: bool,
) -> None:
    device = next(teacher.parameters()).device
    hidden = torch.tensor(keep.hidden, dtype=torch.long, device=device)  # [H']
    scale = math.sqrt(t_arch.hidden_size / target.hidden_size) if rescale_norms else 1.0
    head_dim = t_arch.head_dim

    family.embed_tokens(student).weight.copy_(family.embed_tokens(teacher).weight.index_select(1, hidden))
    _copy_norm(family.final_norm(student), family.final_norm(teacher), hidden, scale)
    if not teacher.config.tie_word_embeddings:
        _copy_linear(family.lm_head(student), family.lm_head(teacher), None, hidden)

    t_layers = family.decoder_layers(teacher)
    for i, (layer, s_layer) in enumerate(zip(keep.layers, family.decoder_layers(student), strict=True)):
        src, dst = family.layer_parts(t_layers[layer]), family.layer_parts(s_layer)
        q_rows = _rows(keep.heads[i], head_dim, device)  # [A' * head_dim]
        kv_rows = _rows(keep.kv_groups[i], head_dim, device)  # [KV' * head_dim]
        neurons = torch.tensor(keep.neurons[i], dtype=torch.long, device=device)  # [I']
        _copy_linear(dst.q_proj, src.q_proj, q_rows, hidden)
        _copy_linear(dst.k_proj, src.k_proj, kv_rows, hidden)
        _copy_linear(dst.v_proj, src.v_proj, kv_rows, hidden)
        _copy_linear(dst.o_proj, src.o_proj, hidden, q_rows)
        _copy_linear(dst.gate_proj, src.gate_proj, neurons, hidden)
        _copy_linear(dst.up_proj, src.up_proj, neurons, hidden)
        _copy_linear(dst.down_proj, src.down_proj, hidden, neurons)
        _copy_norm(dst.input_layernorm, src.input_layernorm, hidden, scale)
        _copy_norm(dst.post_attention_layernorm, src.post_attention_layernorm, hidden, scale)
        if src.q_norm is not None:
            assert src.k_norm is not None and dst.q_norm is not None and dst.k_norm is not None
            dst.q_norm.weight.copy_(src.q_norm.weight)  # over head_dim: shared by heads, never pruned
            dst.k_norm.weight.copy_(src.k_norm.weight)
