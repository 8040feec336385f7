"""Training on several processes: ``torchrun`` and PyTorch's DistributedDataParallel.

Launched by ``torchrun --nproc_per_node=P ...`` (which sets ``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK`` and the rendezvous), a :class:`~fenop.train.Trainer` joins the
process group (gloo on the CPU, NCCL on CUDA), wraps its model in
``DistributedDataParallel``, and splits every batch of the one seeded permutation
between the ranks, each rank's loss weighted by its share: the gradient is the
one-process gradient of the same batch, so P processes train the weights one
process would (to rounding). Rank 0 alone writes checkpoints and metrics.

>>> batch_share([4, 9, 2, 7, 5], rank=1, world=2)
([7, 5], 0.8)
>>> batch_share([4], rank=1, world=2)     # nothing left for rank 1: a sample at weight 0
([4], 0.0)
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def launched() -> bool:
    """Whether this process was started by ``torchrun`` with more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def setup(device: torch.device) -> tuple[int, int, torch.device]:
    """Join the process group ``torchrun`` set up (once), and return this process's
    rank, the number of processes and its device (CUDA: the ``LOCAL_RANK``-th GPU)."""
    if not launched():
        return 0, 1, device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size(), device


def share(items, *, rank: int, world: int):
    """This rank's contiguous part of ``items`` (a sequence): parts in rank order,
    their sizes within one of each other, possibly empty."""
    size, extra = divmod(len(items), world)
    start = rank * size + min(rank, extra)
    return items[start : start + size + (rank < extra)]


def batch_share(batch: list[int], *, rank: int, world: int) -> tuple[list[int], float]:
    """This rank's samples of a global ``batch`` (its :func:`share`) and the weight
    ``world * len(part) / len(batch)`` of its mean loss, so that the ranks' averaged
    gradients are the batch's. A rank left without a sample takes the batch's first
    at weight 0 (every rank must join each step)."""
    part = share(batch, rank=rank, world=world)
    if not part:
        return batch[:1], 0.0
    return part, world * len(part) / len(batch)


def sum_over_ranks(value: torch.Tensor) -> torch.Tensor:
    """``value`` (any shape) summed over the ranks (itself with one process)."""
    if not dist.is_initialized():
        return value
    value = value.clone()
    dist.all_reduce(value)
    return value


def broadcast_parameters(model: torch.nn.Module) -> None:
    """Every rank's parameters set to rank 0's (complex ones as their real views)."""
    with torch.no_grad():
        for parameter in model.parameters():
            data = parameter.data
            dist.broadcast(torch.view_as_real(data) if data.is_complex() else data, src=0)
