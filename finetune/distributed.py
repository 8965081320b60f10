"""Which process this is under torchrun / accelerate launch, and sums across processes. One process
(no launcher) is rank 0 of 1, and every helper is then a no-op."""

from __future__ import annotations

import os

import torch


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


# Set by the user to train under FSDP2 with torchrun (on the CPU: accelerate ignores an FSDP config there),
# and by `own_fsdp` once the stages have taken over accelerate's FSDP launch.
FSDP_ENV = "FINETUNE_FSDP"


def _flag(name: str) -> bool:
    return os.environ.get(name, "false").lower() in ("1", "true", "yes")


def fsdp_launch() -> bool:
    """Launched for FSDP2: `accelerate launch` with an FSDP config (accelerate exports ACCELERATE_USE_FSDP)
    or FINETUNE_FSDP=1 (torchrun, on GPUs or CPU processes)."""
    return _flag("ACCELERATE_USE_FSDP") or _flag(FSDP_ENV)


def own_fsdp() -> None:
    """The stages shard the model themselves (`finetune.model.fsdp.shard`) and hand the Trainer a model
    it must neither wrap in DDP nor shard again: accelerate is told no FSDP (its FSDP2 path would wrap the
    PEFT model a second time), and FINETUNE_FSDP keeps `fsdp_launch()` true for the later stages."""
    if fsdp_launch():
        os.environ[FSDP_ENV] = "1"
        os.environ.pop("ACCELERATE_USE_FSDP", None)


def is_primary() -> bool:
    """The process that writes the run folder and prints."""
    return rank() == 0


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor` summed over every process (in place); itself without a process group."""
    return _all_reduce(tensor, "SUM")


def all_reduce_max(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor`'s elementwise maximum over every process (in place)."""
    return _all_reduce(tensor, "MAX")


def _all_reduce(tensor: torch.Tensor, op: str) -> torch.Tensor:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        reduce = getattr(torch.distributed.ReduceOp, op)
        if torch.distributed.get_backend() == "nccl" and not tensor.is_cuda:  # NCCL reduces GPU tensors only
            on_gpu = tensor.cuda()
            torch.distributed.all_reduce(on_gpu, op=reduce)
            tensor.copy_(on_gpu.cpu())
        else:
            torch.distributed.all_reduce(tensor, op=reduce)
    return tensor


def initialized() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def shard(items: list) -> list:
    """This process's share of `items` (every N-th, from its rank)."""
    return items[rank() :: world_size()] if initialized() else items


def unshard(local: list, total: int) -> list:
    """The inverse of `shard`: every process's results, in the original order, on every process."""
    if not initialized():
        return local
    parts: list = [None] * world_size()
    torch.distributed.all_gather_object(parts, local)
    out: list = [None] * total
    for r, part in enumerate(parts):
        out[r :: world_size()] = part
    return out


def barrier() -> None:
    """Wait for every process (rank 0 finishing its writes before the others read them)."""
    if initialized():
        torch.distributed.barrier()


def is_sharded(model: torch.nn.Module) -> bool:
    """Whether FSDP2's `fully_shard` was applied to a module of `model` (`finetune.model.fsdp.shard`)."""
    from torch.distributed.fsdp import FSDPModule  # torch.distributed: loaded only when asked

    return any(isinstance(m, FSDPModule) for m in model.modules())
