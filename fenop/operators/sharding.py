"""Work split over the processes of a ``torch.distributed`` group, with gradients.

A computation whose inputs and outputs every process holds alike (replicated), but
whose middle part each process does only a share of (its experts), needs two
operators around that part, as in tensor-parallel training (Shoeybi et al.,
Megatron-LM, 2019):

- :func:`to_shards` at the entry: the identity forward; backward, the sum over the
  processes of the gradients, since each process's share used the input;
- :func:`from_shards` at the exit: the sum of the processes' parts forward;
  backward, the identity, since every process holds the same gradient of the
  (replicated) output.

The gradients of everything outside the shared part are then those of one process
doing all the work. Every process must call both in the same order with tensors
of the same shape: their programs differ in their shares' sizes, not their steps.
Without an initialised process group both are the identity.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
import torch.distributed as dist


@runtime_checkable
class Shardable(Protocol):
    """A module whose work a process group can share: after ``shard(rank, world)``
    process ``rank`` of ``world`` does its share, and every process gets the
    outputs and gradients one process would (:class:`~fenop.operators.MoEConstraint`
    shards its experts). What a trainer looks for to split such work."""

    def shard(self, rank: int, world: int) -> None: ...


def active() -> bool:
    """Whether a process group of more than one process is initialised."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class _ToShards(torch.autograd.Function):
    @staticmethod
    def forward(x):
        return x.view_as(x)

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        return grad


class _FromShards(torch.autograd.Function):
    @staticmethod
    def forward(x):
        total = x.contiguous().clone()
        dist.all_reduce(total)
        return total

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, grad):
        return grad


def to_shards(x: torch.Tensor) -> torch.Tensor:
    """``x`` (any shape), held alike by every process, entering work done in shares:
    the identity, whose backward sums the processes' gradients."""
    return _ToShards.apply(x) if active() else x


def from_shards(x: torch.Tensor) -> torch.Tensor:
    """Each process's part ``x`` (any shape, the same on every process) of a result
    that is their sum: the sum, whose backward is the identity."""
    return _FromShards.apply(x) if active() else x
