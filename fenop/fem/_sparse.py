"""SciPy sparse matrices built on the CPU, applied as torch sparse CSR tensors."""

from __future__ import annotations

import warnings

import numpy as np
import scipy.sparse
import torch


def to_torch_csr(matrix: scipy.sparse.sparray | scipy.sparse.spmatrix) -> torch.Tensor:
    """A float64 torch sparse CSR copy of a SciPy sparse ``(m, n)`` matrix."""
    csr = scipy.sparse.csr_array(matrix, dtype=np.float64)
    csr.sum_duplicates()
    with warnings.catch_warnings():
        # torch warns once per process that CSR support is beta; fenop uses only
        # the matrix-times-dense product, which is stable on CPU and CUDA.
        warnings.filterwarnings("ignore", "Sparse CSR tensor support is in beta state")
        return torch.sparse_csr_tensor(
            torch.from_numpy(csr.indptr.astype(np.int64)),
            torch.from_numpy(csr.indices.astype(np.int64)),
            torch.from_numpy(csr.data),
            size=csr.shape,
            dtype=torch.float64,
            check_invariants=False,
        )


def _operands(matrix: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``matrix`` and ``x`` in one dtype for a sparse product, or a clear error."""
    if matrix.device != x.device:
        raise ValueError(
            f"input is on {x.device} but the FE matrix is on {matrix.device}; "
            "move the module with .to(device)"
        )
    if x.dtype in (torch.float16, torch.bfloat16):
        # Sparse kernels lack half precision on the CPU, and FE stencils lose too many
        # digits in it: the product is done in float32 (also under autocast).
        x = x.float()
    if matrix.dtype != x.dtype:
        matrix = matrix.to(x.dtype)
    return matrix, x


def apply(matrix: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``matrix @ x`` along the last dimension of ``x``.

    Args:
        matrix: sparse ``(m, n)``; converted to ``x``'s dtype if it differs.
        x: ``(..., n)``.

    Returns:
        ``(..., m)`` in ``x``'s dtype (float32 for half-precision ``x``),
        differentiable in ``x``.
    """
    flat = x.reshape(-1, x.shape[-1])
    return apply_rows(matrix, flat.T).T.reshape(*x.shape[:-1], matrix.shape[0])


def apply_rows(matrix: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``matrix @ x`` along the first dimension of ``x``: no transposes, no copies.

    For node-major layouts ``(n, ...)``, as inside :class:`~fenop.operators.FEMultigrid`.

    Args:
        matrix: sparse ``(m, n)``; converted to ``x``'s dtype if it differs.
        x: ``(n, ...)``.

    Returns:
        ``(m, ...)`` in ``x``'s dtype (float32 for half-precision ``x``),
        differentiable in ``x``.
    """
    matrix, x = _operands(matrix, x)
    with torch.autocast(x.device.type, enabled=False):
        return (matrix @ x.reshape(x.shape[0], -1)).reshape(matrix.shape[0], *x.shape[1:])
