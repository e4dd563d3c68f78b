"""Surgery: teacher + target ArchConfig + keep indices → a stock HF model of the teacher's class.

The student's config is built from the teacher's config and the ArchConfig before the model exists (never patched
afterwards); weights are then gathered from the teacher with `index_select`, so keeping everything in the original
order reproduces the teacher bit for bit. The rules (which rows / columns of which teacher tensor fill each student
tensor) are one list, `copy_plan`, applied here from a live teacher and by `prune.sliced` from the teacher's files.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Mapping
from dataclasses import dataclass
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

__all__ = ["TensorCopy", "check_count", "check_target", "copy_plan", "empty_student", "materialize"]


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
    `prune.sliced.slice_student` builds the same student from the teacher's files without loading it.
    """
    family, t_arch = describe_model(teacher)
    check_target(family, t_arch, target)
    keep.validate(t_arch, target)
    config = teacher.config.to_dict()
    param = next(teacher.parameters())
    student = empty_student(family, config, target, keep, param.dtype, param.device)
    with torch.no_grad():
        for copy in copy_plan(family, student, t_arch, target, keep, rescale_norms):
            source = teacher.get_parameter(copy.source)
            weight = _take(source, _index(copy.rows, param.device), _index(copy.cols, param.device))
            student.get_parameter(copy.name).copy_(weight * copy.scale if copy.scale != 1.0 else weight)
    check_count(family, config, target, student)
    return student


def empty_student(
    family: DecoderFamily,
    teacher_config: Mapping[str, Any],
    target: ArchConfig,
    keep: KeepIndices,
    dtype: torch.dtype,
    device: torch.device | str,
) -> PreTrainedModel:
    """The student model with uninitialised weights, in `dtype` on `device`, its config built from the teacher's."""
    config_dict = family.student_config_dict(teacher_config, target, keep.layers)
    config = transformers.AutoConfig.for_model(**config_dict)
    with _no_init(), torch.device(device):
        student: PreTrainedModel = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
    student.tie_weights()  # transformers ties inside init_weights, which _no_init skips
    student.eval()
    return student


def check_count(
    family: DecoderFamily, teacher_config: Mapping[str, Any], target: ArchConfig, student: PreTrainedModel
) -> None:
    """The built student has exactly the config-only parameter count (an internal invariant)."""
    expected = count_params(target, family.invariants_from_config(teacher_config))
    actual = sum(p.numel() for p in student.parameters())
    assert actual == expected, f"{target.name}: counted {expected} parameters, built {actual}"


def _no_init() -> contextlib.AbstractContextManager[object]:
    """Skip random initialisation of weights that are overwritten right after."""
    try:
        no_init_weights = transformers_init.no_init_weights
    except ImportError:  # pragma: no cover - older transformers
        return contextlib.nullcontext()
    return no_init_weights()


@dataclass(frozen=True)
class TensorCopy:
    """One student tensor and where it comes from: the kept rows / columns of one teacher tensor, in kept order.

    `rows` / `cols` are teacher indices along dims 0 / 1 (None: all, in order); `scale` multiplies the gathered
    values in the student's dtype (RMSNorm rescaling; 1.0 elsewhere).
    """

    name: str  # the student's parameter name
    source: str  # the teacher's tensor name (its state_dict / safetensors key)
    rows: tuple[int, ...] | None
    cols: tuple[int, ...] | None
    scale: float = 1.0


def copy_plan(
    family: DecoderFamily,
    student: PreTrainedModel,
    t_arch: ArchConfig,
    target: ArchConfig,
    keep: KeepIndices,
    rescale_norms: bool,
) -> list[TensorCopy]:
    """Every student tensor with its teacher source: the pruning rules, shared by `materialize` and the files.

    Embedding and lm_head keep hidden columns; norms keep hidden channels (rescaled); q/k/v keep whole head rows
    and hidden columns, o_proj hidden rows and head columns; gate/up keep neuron rows, down_proj neuron columns;
    biases follow their rows; Qwen3's q/k norms (over head_dim) are copied whole. Student layer i reads teacher
    layer keep.layers[i]. Teacher names are the student's module names (same class) with the layer renumbered.
    """
    names = {id(module): name for name, module in student.named_modules()}
    hidden = keep.hidden  # [H']
    scale = math.sqrt(t_arch.hidden_size / target.hidden_size) if rescale_norms else 1.0
    head_dim = t_arch.head_dim
    copies: list[TensorCopy] = []

    def add(module: Any, rows: tuple[int, ...] | None, cols: tuple[int, ...] | None, norm: bool = False,
            renumber: tuple[str, str] | None = None) -> None:
        name = names[id(module)]
        source = name if renumber is None else renumber[1] + name[len(renumber[0]):]
        copies.append(TensorCopy(f"{name}.weight", f"{source}.weight", rows, cols, scale if norm else 1.0))
        if not norm and getattr(module, "bias", None) is not None:
            copies.append(TensorCopy(f"{name}.bias", f"{source}.bias", rows, None))

    add(family.embed_tokens(student), None, hidden)
    add(family.final_norm(student), hidden, None, norm=True)
    if not student.config.tie_word_embeddings:
        add(family.lm_head(student), None, hidden)
    layers = family.decoder_layers(student)
    prefix = names[id(layers)]
    for i, (layer, s_layer) in enumerate(zip(keep.layers, layers, strict=True)):
        renumber = (f"{prefix}.{i}", f"{prefix}.{layer}")
        assert names[id(s_layer)] == renumber[0], f"unexpected layer name {names[id(s_layer)]!r}"
        dst = family.layer_parts(s_layer)
        q_rows = _rows(keep.heads[i], head_dim)  # [A' * head_dim]
        kv_rows = _rows(keep.kv_groups[i], head_dim)  # [KV' * head_dim]
        neurons = keep.neurons[i]  # [I']
        for module, rows, cols in (
            (dst.q_proj, q_rows, hidden),
            (dst.k_proj, kv_rows, hidden),
            (dst.v_proj, kv_rows, hidden),
            (dst.o_proj, hidden, q_rows),
            (dst.gate_proj, neurons, hidden),
            (dst.up_proj, neurons, hidden),
            (dst.down_proj, hidden, neurons),
        ):
            add(module, rows, cols, renumber=renumber)
        add(dst.input_layernorm, hidden, None, norm=True, renumber=renumber)
        add(dst.post_attention_layernorm, hidden, None, norm=True, renumber=renumber)
        for qk_norm in (dst.q_norm, dst.k_norm):
            if qk_norm is not None:  # over head_dim: shared by heads, never pruned or rescaled
                add(qk_norm, None, None, renumber=renumber)
    return copies


def _rows(units: tuple[int, ...], width: int) -> tuple[int, ...]:
    """Row indices of whole `width`-sized blocks (heads), in the given unit order."""
    return tuple(unit * width + j for unit in units for j in range(width))  # [len(units) * width]


def _index(values: tuple[int, ...] | None, device: torch.device) -> torch.Tensor | None:
    return None if values is None else torch.tensor(values, dtype=torch.long, device=device)


def _take(weight: torch.Tensor, rows: torch.Tensor | None, cols: torch.Tensor | None) -> torch.Tensor:
    if rows is not None:
        weight = weight.index_select(0, rows)
    if cols is not None:
        weight = weight.index_select(1, cols)
    return weight
