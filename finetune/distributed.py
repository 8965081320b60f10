"""Which process this is under torchrun / accelerate launch, and sums across processes. One process
(no launcher) is rank 0 of 1, and every helper is then a no-op."""

from __future__ import annotations

import os

import torch


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_primary() -> bool:
    """The process that writes the run folder and prints."""
    return rank() == 0


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor` summed over every process (in place); itself without a process group."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        if torch.distributed.get_backend() == "nccl" and not tensor.is_cuda:  # NCCL reduces GPU tensors only
            on_gpu = tensor.cuda()
            torch.distributed.all_reduce(on_gpu, op=torch.distributed.ReduceOp.SUM)
            tensor.copy_(on_gpu.cpu())
        else:
            torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.SUM)
    return tensor
