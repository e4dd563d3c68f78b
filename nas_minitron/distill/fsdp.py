"""FSDP2 (`torch.distributed.fsdp.fully_shard`) for the distillation trainer: shard, clip, gather, restore.

`shard_student` applies `fully_shard` to every decoder layer and then to the root, so that embeddings, final norm
and lm_head (tied or not) form the root's group. Parameters become DTensors sharded on dim 0; the model keeps its
FQNs and stays an HF model (class renamed `FSDP<Class>`), so `getattr(student, "module", student)` is the model.
Mixed precision: bf16 compute over fp32 master weights, gradients reduced in fp32 (`mixed_precision_policy`).
Tested on CPU with 2 gloo workers (torch 2.13), bf16 policy included; meant for GPUs with NCCL, not tested there.

Everything that reads or writes whole tensors goes through full state dicts keyed by FQN
(`torch.distributed.checkpoint.state_dict`): gathering is a collective that every rank must enter; the result
lands on rank 0, in CPU memory.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, cast

from nas_minitron._lazy import lazy_import
from nas_minitron.families import get_family

if TYPE_CHECKING:
    import torch
    import torch.distributed as dist
    import torch.distributed.checkpoint.state_dict as dcp_state
    import torch.distributed.device_mesh as device_mesh
    import torch.distributed.fsdp as torch_fsdp
    import torch.distributed.tensor as dtensor
    from transformers import PreTrainedModel
else:
    torch = lazy_import("torch")
    dist = lazy_import("torch.distributed")
    dcp_state = lazy_import("torch.distributed.checkpoint.state_dict")
    device_mesh = lazy_import("torch.distributed.device_mesh")
    torch_fsdp = lazy_import("torch.distributed.fsdp")
    dtensor = lazy_import("torch.distributed.tensor")

__all__ = ["clip_grad_norm_", "full_optimizer_state", "full_student_state", "is_sharded", "load_full_optimizer",
           "load_full_student", "mixed_precision_policy", "shard_student"]


def mixed_precision_policy(bf16: bool) -> torch_fsdp.MixedPrecisionPolicy:
    """FSDP2's precision policy: bf16 compute with fp32 gradient reduction when `bf16`, else all fp32.

    The sharded parameters stay fp32 either way (the master weights the optimizer steps, and so fp32 AdamW state);
    under bf16 each layer's all-gather casts them to bf16 for forward and backward, and gradients are reduce-scattered
    in fp32 into fp32 shards. The same regime as the single-process trainer: fp32 weights under bf16 autocast.
    """
    if not bf16:
        return torch_fsdp.MixedPrecisionPolicy()
    return torch_fsdp.MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)


def shard_student(model: PreTrainedModel, device_type: str, *, bf16: bool = False) -> None:
    """Shard `model` in place over all ranks of the default process group (one FSDP group per decoder layer).

    `bf16`: compute in bf16 over fp32 master weights (`mixed_precision_policy`); pass it when the run's
    `DistillConfig.dtype` is bf16. Runs on CPU with gloo too (tested there) and on GPUs with NCCL.
    """
    mesh = device_mesh.init_device_mesh(device_type, (dist.get_world_size(),))
    policy = mixed_precision_policy(bf16)
    for layer in get_family(model.config.model_type).decoder_layers(model):
        torch_fsdp.fully_shard(layer, mesh=mesh, mp_policy=policy)
    torch_fsdp.fully_shard(model, mesh=mesh, mp_policy=policy)


def is_sharded(module: torch.nn.Module) -> bool:
    """True when any parameter of `module` is a DTensor (FSDP2-sharded)."""
    return any(isinstance(p, dtensor.DTensor) for p in module.parameters())


def clip_grad_norm_(params: list[torch.Tensor], max_norm: float) -> torch.Tensor:
    """`torch.nn.utils.clip_grad_norm_` over sharded (DTensor) and replicated parameters: the global 2-norm.

    Sharded gradients contribute their shards from all ranks (DTensor ops reduce the norm across ranks; `full_tensor`
    makes it a plain tensor); a replicated gradient (the objective's projection, equal on every rank) counts once.
    Returns the total norm before clipping.
    """
    sharded = [p.grad for p in params if p.grad is not None and isinstance(p, dtensor.DTensor)]
    replicated = [p.grad for p in params if p.grad is not None and not isinstance(p, dtensor.DTensor)]
    norms = [torch.nn.utils.get_total_norm(replicated)] if replicated else []
    if sharded:
        norms.append(cast("dtensor.DTensor", torch.nn.utils.get_total_norm(sharded)).full_tensor())
    if not norms:
        return torch.zeros(())
    total: torch.Tensor = torch.linalg.vector_norm(torch.stack(norms))
    coef = float(torch.clamp(max_norm / (total + 1e-6), max=1.0))  # the formula of torch's clip_grad_norm_
    for grad in sharded + replicated:
        grad.mul_(coef)
    return total


def full_student_state(model: PreTrainedModel) -> dict[str, torch.Tensor]:
    """The unsharded student state dict on CPU on rank 0 ({} on the others); every rank must call it."""
    options = dcp_state.StateDictOptions(full_state_dict=True, cpu_offload=True)
    return cast("dict[str, torch.Tensor]", dcp_state.get_model_state_dict(model, options=options))


def _holder(model: PreTrainedModel, objective: torch.nn.Module) -> torch.nn.ModuleDict:
    """One module over everything the optimizer steps, so that every optimized parameter has an FQN."""
    return torch.nn.ModuleDict({"student": model, "objective": objective})


def full_optimizer_state(
    model: PreTrainedModel, objective: torch.nn.Module, optimizer: torch.optim.Optimizer
) -> dict[str, Any]:
    """The unsharded optimizer state keyed by FQN (`student.…`, `objective.…`) on rank 0 ({} on the others).

    Every rank must call it.
    """
    options = dcp_state.StateDictOptions(full_state_dict=True, cpu_offload=True)
    return dcp_state.get_optimizer_state_dict(_holder(model, objective), optimizer, options=options)


def load_full_student(model: PreTrainedModel, state: dict[str, torch.Tensor]) -> tuple[list[str], list[str]]:
    """Load a full student state dict (every rank holds it) into a sharded or plain model; (missing, unexpected)."""
    options = dcp_state.StateDictOptions(full_state_dict=True, strict=False)
    keys = dcp_state.set_model_state_dict(model, cast("dict[str, Any]", state), options=options)
    return list(keys.missing_keys), list(keys.unexpected_keys)


def load_full_optimizer(
    model: PreTrainedModel, objective: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]
) -> None:
    """Load a full optimizer state keyed by FQN (every rank holds it), as `full_optimizer_state` wrote it."""
    dcp_state.set_optimizer_state_dict(_holder(model, objective), optimizer, state,
                                       options=dcp_state.StateDictOptions(full_state_dict=True))
