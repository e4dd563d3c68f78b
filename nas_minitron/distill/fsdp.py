"""FSDP2 (`torch.distributed.fsdp.fully_shard`) for the distillation trainer: shard, clip, gather, restore.

`shard_student` applies `fully_shard` to every decoder layer and then to the root, so that embeddings, final norm
and lm_head (tied or not) form the root's group. Parameters become DTensors sharded on dim 0; the model keeps its
FQNs and stays an HF model (class renamed `FSDP<Class>`), so `getattr(student, "module", student)` is the model.
Tested on CPU with 2 gloo workers (torch 2.13); meant for GPUs with NCCL, not tested there.

Everything that reads or writes whole tensors goes through full state dicts keyed by FQN
(`torch.distributed.checkpoint.state_dict`): gathering is a collective that every rank must enter; the result
lands on rank 0, in CPU memory.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

__all__ = ["clip_grad_norm_", "full_optimizer_state", "full_student_state", "is_sharded", "load_full_optimizer",
           "load_full_student", "shard_student"]


def shard_student(model: Any, device_type: str) -> None:
    """Shard `model` in place over all ranks of the default process group (one FSDP group per decoder layer)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from nas_minitron.families import get_family

    mesh = init_device_mesh(device_type, (dist.get_world_size(),))
    for layer in get_family(model.config.model_type).decoder_layers(model):
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)


def is_sharded(module: Any) -> bool:
    """True when any parameter of `module` is a DTensor (FSDP2-sharded)."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in module.parameters())


def clip_grad_norm_(params: list[torch.Tensor], max_norm: float) -> torch.Tensor:
    """`torch.nn.utils.clip_grad_norm_` over sharded (DTensor) and replicated parameters: the global 2-norm.

    Sharded gradients contribute their shards from all ranks (DTensor ops reduce the norm across ranks; `full_tensor`
    makes it a plain tensor); a replicated gradient (the objective's projection, equal on every rank) counts once.
    Returns the total norm before clipping.
    """
    import torch
    from torch.distributed.tensor import DTensor

    sharded = [p.grad for p in params if p.grad is not None and isinstance(p, DTensor)]
    replicated = [p.grad for p in params if p.grad is not None and not isinstance(p, DTensor)]
    norms = [torch.nn.utils.get_total_norm(replicated)] if replicated else []
    if sharded:
        norms.append(torch.nn.utils.get_total_norm(sharded).full_tensor())
    if not norms:
        return torch.zeros(())
    total = torch.linalg.vector_norm(torch.stack(norms))
    coef = float(torch.clamp(max_norm / (total + 1e-6), max=1.0))  # the formula of torch's clip_grad_norm_
    for grad in sharded + replicated:
        grad.mul_(coef)
    return total


def full_student_state(model: Any) -> dict[str, torch.Tensor]:
    """The unsharded student state dict on CPU on rank 0 ({} on the others); every rank must call it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def _holder(model: Any, objective: Any) -> Any:
    """One module over everything the optimizer steps, so that every optimized parameter has an FQN."""
    import torch

    return torch.nn.ModuleDict({"student": model, "objective": objective})


def full_optimizer_state(model: Any, objective: Any, optimizer: Any) -> dict[str, Any]:
    """The unsharded optimizer state keyed by FQN (`student.…`, `objective.…`) on rank 0 ({} on the others).

    Every rank must call it.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_optimizer_state_dict(_holder(model, objective), optimizer, options=options)


def load_full_student(model: Any, state: dict[str, torch.Tensor]) -> tuple[list[str], list[str]]:
    """Load a full student state dict (every rank holds it) into a sharded or plain model; (missing, unexpected)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    keys = set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True, strict=False))
    return list(keys.missing_keys), list(keys.unexpected_keys)


def load_full_optimizer(model: Any, objective: Any, optimizer: Any, state: dict[str, Any]) -> None:
    """Load a full optimizer state keyed by FQN (every rank holds it), as `full_optimizer_state` wrote it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(_holder(model, objective), optimizer, state,
                             options=StateDictOptions(full_state_dict=True))
