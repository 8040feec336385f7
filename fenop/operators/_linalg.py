"""Batched dense LU on the CPU that does not hang.

PyTorch's batched CPU LU (``torch.linalg.lu_factor_ex``, and ``solve_ex`` through
it) runs MKL's ``getrf`` on its own worker threads, where MKL's threading ignores
``torch.set_num_threads``. After that call (``fenop train --threads``), a batch of
200 x 200 systems or larger hung in MKL, which printed "Parameter 6 was incorrect on
entry to DLASWP" (pytorch/pytorch#141358, #142815; measured with torch 2.13 and a
batch of two). Factorised one at a time, each system runs on the calling thread;
above 64 x 64 a factorisation's N³/3 operations outweigh a step of the loop.
"""

from __future__ import annotations

import torch

# Above this size a batch of CPU systems is factorised one system at a time.
_LARGE = 64


def _one_at_a_time(matrix: torch.Tensor) -> bool:
    """Whether ``matrix`` ``(..., N, N)`` is a batch of CPU systems large enough to hang."""
    return matrix.device.type == "cpu" and matrix.shape[-1] > _LARGE and matrix.ndim > 2


def lu_factor_ex(matrix: torch.Tensor):
    """``torch.linalg.lu_factor_ex(matrix)`` for ``matrix`` ``(..., N, N)``: the
    factors ``(..., N, N)``, the pivots ``(..., N)`` and ``info`` ``(...)``;
    differentiable."""
    if not _one_at_a_time(matrix):
        return torch.linalg.lu_factor_ex(matrix)
    batch = matrix.shape[:-2]
    systems = matrix.reshape(-1, *matrix.shape[-2:])
    parts = zip(*(torch.linalg.lu_factor_ex(system) for system in systems), strict=True)
    factor, pivots, info = (torch.stack(part) for part in parts)
    return factor.reshape(matrix.shape), pivots.reshape(*batch, -1), info.reshape(batch)


def solve_ex(matrix: torch.Tensor, rhs: torch.Tensor):
    """``torch.linalg.solve_ex(matrix, rhs)`` for ``matrix`` ``(..., N, N)`` and
    ``rhs`` ``(..., N, M)``: the solution ``(..., N, M)`` and ``info`` ``(...)``."""
    if not _one_at_a_time(matrix):
        return torch.linalg.solve_ex(matrix, rhs)
    factor, pivots, info = lu_factor_ex(matrix)
    return torch.linalg.lu_solve(factor, pivots, rhs), info
