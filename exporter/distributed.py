"""Training on several processes with torchrun: DistributedDataParallel, nothing home-made.

`torchrun --nproc_per_node N -m exporter.cli portfolio ...` starts N copies of the same run.
Every rank trains each model together (each takes its share of every batch; DDP averages the
gradients and hands rank 0's BN statistics to the others), so all ranks hold the same weights,
and every mask they derive is broadcast from rank 0 so it is identical by construction, not by
luck. Rank 0 alone writes: run-directory checkpoints, the portfolio, the log lines.
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist
import torch.nn as nn


def start_from_environment() -> None:
    """Join the process group torchrun describes in the environment (nothing to do outside torchrun)."""
    if dist.is_initialized() or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))  # so "auto" and "cuda" mean this rank's GPU
    dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def is_writer() -> bool:
    """Whether this process writes files and lines: the only one, or rank 0 of several."""
    return not dist.is_initialized() or dist.get_rank() == 0


def shard(batch: torch.Tensor) -> torch.Tensor:
    """This rank's share of a batch of sample indices (all ranks draw the same order from the same seed)."""
    return batch[dist.get_rank()::dist.get_world_size()] if dist.is_initialized() else batch


def parallel(model: nn.Module, device: torch.device) -> nn.Module:
    """`model` wrapped for gradient averaging across ranks; the model itself when there is one process."""
    if world_size() == 1:
        return model
    return nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def same_on_every_rank(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`tensors` as rank 0 holds them, on every rank (in place)."""
    if world_size() > 1:
        for name in sorted(tensors):  # the same order on every rank
            tensor = tensors[name]
            carrier = tensor.to(torch.uint8) if tensor.dtype == torch.bool else tensor  # not every backend takes bool
            dist.broadcast(carrier, src=0)
            if carrier is not tensor:
                tensor.copy_(carrier.bool())
    return tensors
