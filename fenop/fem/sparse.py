"""SciPy sparse matrices built on the CPU, applied as torch sparse CSR tensors.

Modules hold their constant FE matrices as :class:`SparseMatrix`; :func:`apply`
multiplies by a bare torch CSR tensor (such as ``FunctionSpace.mass``).
"""

from __future__ import annotations

import contextlib
import warnings

import numpy as np
import scipy.sparse
import torch
from torch import nn


@contextlib.contextmanager
def _quiet_csr():
    """Silence two warnings of building CSR tensors that say nothing about fenop's.

    torch warns once per process that CSR support is beta; fenop uses only the
    matrix-times-dense product, which is stable on CPU and CUDA. torch 2.11 also
    warns that invariant checks are "implicitly" disabled even when, as here,
    ``check_invariants=False`` is explicit (pytorch/pytorch#178274): fenop's
    indices come from SciPy's canonical CSR, so they satisfy the invariants.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Sparse CSR tensor support is in beta state")
        warnings.filterwarnings("ignore", "Sparse invariant checks are implicitly disabled")
        yield


def to_torch_csr(matrix: scipy.sparse.sparray | scipy.sparse.spmatrix) -> torch.Tensor:
    """A float64 torch sparse CSR copy of a SciPy sparse ``(m, n)`` matrix."""
    csr = scipy.sparse.csr_array(matrix, dtype=np.float64)
    csr.sum_duplicates()
    with _quiet_csr():
        return torch.sparse_csr_tensor(
            torch.from_numpy(csr.indptr.astype(np.int64)),
            torch.from_numpy(csr.indices.astype(np.int64)),
            torch.from_numpy(csr.data),
            size=csr.shape,
            dtype=torch.float64,
            check_invariants=False,
        )


def _prepared(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``x`` ready for a product with an FE matrix on ``device``, or a clear error."""
    if x.device != device:
        raise ValueError(
            f"input is on {x.device} but the FE matrix is on {device}; "
            "move the module with .to(device)"
        )
    if x.dtype in (torch.float16, torch.bfloat16):
        # Sparse kernels lack half precision on the CPU, and FE stencils lose too many
        # digits in it: the product is done in float32 (also under autocast).
        x = x.float()
    return x


def _csr_like(csr: torch.Tensor, dtype: torch.dtype, *, narrow: bool = False) -> torch.Tensor:
    """``csr`` with its values in ``dtype``, sharing its index tensors (``narrow``:
    with int32 copies of them where they fit)."""
    crow, col = csr.crow_indices(), csr.col_indices()
    if narrow and max(csr._nnz(), *csr.shape) < 2**31:
        crow, col = crow.int(), col.int()
    with _quiet_csr():
        return torch.sparse_csr_tensor(
            crow, col, csr.values().to(dtype), size=csr.shape, check_invariants=False
        )


class _Pair:
    """A CSR matrix and its transpose, handed to :class:`_Product` as one opaque
    argument: torch.func's transforms cannot take sparse tensors as inputs."""

    __slots__ = ("matrix", "transpose")

    def __init__(self, matrix: torch.Tensor, transpose: torch.Tensor):
        self.matrix, self.transpose = matrix, transpose

    def swapped(self) -> _Pair:
        """The transpose and its transpose."""
        return _Pair(self.transpose, self.matrix)


def csr_product(matrix: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``matrix @ x`` for a CSR ``matrix`` ``(m, n)`` and a dense ``x`` ``(n,)`` or
    ``(n, M)``, into an output made here: for a matrix ``x`` PyTorch's ``@``
    zero-fills a result and copies the sparse kernel's into it, which took as long
    as the product itself (6.6e4 DOFs, batch 8, M = 8: 22 ms against 12). Where
    ``x`` needs a gradient (a backward pass run with ``create_graph``), ``@``, which
    autograd records."""
    if x.ndim == 1:
        return torch.mv(matrix, x)
    if x.requires_grad and torch.is_grad_enabled():
        return matrix @ x
    out = x.new_empty(matrix.shape[0], x.shape[1])
    return torch.addmm(out, matrix, x, beta=0.0, out=out)


class _Product(torch.autograd.Function):
    """``matrix @ x`` whose backward multiplies by a transpose stored in advance.

    Autograd's own backward of a CSR product forms ``matrix.t()``, a CSC tensor,
    and converts it back to CSR (a sort) on every call. Forward mode
    (``torch.autograd.forward_ad``, which the hard constraints linearise residuals
    with, and ``torch.func.jvp``) is the same product.
    """

    @staticmethod
    def forward(x: torch.Tensor, pair: _Pair) -> torch.Tensor:
        return csr_product(pair.matrix, x)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.pair = inputs[1]  # constants: nothing to save for autograd

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        # Differentiable in `grad`, so double backward works too.
        return csr_product(ctx.pair.transpose, grad), None

    @staticmethod
    def jvp(ctx, x_tangent, pair_tangent):
        # the product again, through apply: under torch.func the tangent is wrapped
        return _Product.apply(x_tangent, ctx.pair)


class _EachProduct(torch.autograd.Function):
    """``matrix @ x_b`` for each row ``x_b`` of ``x`` ``(B, n)``, into the rows of a
    ``(B, m)`` result; backward, the same with the stored transpose."""

    @staticmethod
    def forward(x: torch.Tensor, pair: _Pair) -> torch.Tensor:
        return _each(pair.matrix, x)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.pair = inputs[1]

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        if torch.is_grad_enabled():  # create_graph: a recorded product
            return _Product.apply(grad.T, ctx.pair.swapped()).T, None
        return _each(ctx.pair.transpose, grad), None

    @staticmethod
    def jvp(ctx, x_tangent, pair_tangent):
        return _EachProduct.apply(x_tangent, ctx.pair)


def _each(matrix: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``matrix @ x_b`` for each row of ``x`` ``(B, n)``, one ``torch.mv`` each."""
    out = x.new_empty(x.shape[0], matrix.shape[0])
    for row, result in zip(x, out, strict=True):
        torch.mv(matrix, row, out=result)
    return out


class SparseMatrix(nn.Module):
    """A constant sparse ``(m, n)`` matrix that moves with its module.

    It keeps CSR copies of the matrix and of its transpose in float64, and in each
    other precision it is used in from the first such product on (values only; the
    index tensors are shared): a product converts nothing, and its backward pass
    uses the stored transpose. ``.to(device)`` moves the copies; ``.to(dtype)``
    (``.float()``, ``.double()``) leaves them, so a model sent to float32 and back to
    float64 still has its float64 FE matrix.

    The copies are not buffers: they are built from the mesh, so they stay out of
    state dicts (checkpoints) and out of what distributed training broadcasts.

    Args:
        matrix: a SciPy sparse ``(m, n)`` matrix.

    Shapes:
        ``(..., n)`` -> ``(..., m)`` (call), ``(n, ...)`` -> ``(m, ...)`` (:meth:`rows`).
    """

    def __init__(self, matrix: scipy.sparse.sparray | scipy.sparse.spmatrix):
        super().__init__()
        self._set((to_torch_csr(matrix), to_torch_csr(matrix.T)))
        self.shape = tuple(self._copies[torch.float64][0].shape)

    def _set(self, pair: tuple[torch.Tensor, torch.Tensor]) -> None:
        """Keep the float64 ``(matrix, transpose)``; other precisions follow on use."""
        self.device = pair[0].device
        self._copies = {torch.float64: pair}

    def _apply(self, fn, recurse=True):
        # nn.Module.to/.cuda/.double/... all come here with a per-tensor function;
        # following it on an empty tensor tells where it sends them. Only the device
        # is taken over: the copies keep their precisions.
        device = fn(torch.empty(0, dtype=torch.float64, device=self.device)).device
        if device != self.device:
            self._set(tuple(m.to(device) for m in self._copies[torch.float64]))
        return super()._apply(fn, recurse)

    def extra_repr(self) -> str:
        return f"shape={self.shape}, device={self.device}"

    def scipy(self) -> scipy.sparse.csr_array:
        """The float64 matrix as a SciPy CSR array (on the CPU), to compose with others."""
        matrix = self._copies[torch.float64][0]
        crow, col, values = (
            t.cpu().numpy() for t in (matrix.crow_indices(), matrix.col_indices(), matrix.values())
        )
        return scipy.sparse.csr_array((values, col, crow), shape=tuple(matrix.shape))

    def _pair(self, dtype: torch.dtype, *, narrow: bool = False) -> tuple[torch.Tensor, ...]:
        """The ``(matrix, transpose)`` CSR tensors in ``dtype``; ``narrow``: with int32
        indices where they fit, for :meth:`each`."""
        key = (dtype, narrow) if narrow else dtype
        pair = self._copies.get(key)
        if pair is None:  # another precision or index type: converted once, then kept
            pair = tuple(_csr_like(m, dtype, narrow=narrow) for m in self._copies[torch.float64])
            self._copies[key] = pair
        return pair

    def csr(self, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """The matrix as a torch sparse CSR tensor in ``dtype`` (the copy products use)."""
        return self._pair(dtype)[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``matrix @ x`` along the last dimension: ``(..., n)`` -> ``(..., m)``."""
        flat = x.reshape(-1, x.shape[-1])
        return self.rows(flat.T).T.reshape(*x.shape[:-1], self.shape[0])

    def each(self, x: torch.Tensor, *, transpose: bool = False) -> torch.Tensor:
        """``matrix @ x_b`` (``transpose``: ``matrixᵀ @ x_b``) for each ``x_b`` of ``x``
        ``(B, n)`` -> ``(B, m)`` (``(B, m)`` -> ``(B, n)``), by one matrix-vector
        product each, into the rows of the result: for a tall matrix and a few
        rows, where :meth:`forward`'s product writes ``(m, B)`` and its
        transposition copies that (Darcy's map to its Jacobian's entries at 6.6e4
        DOFs, batch 8: the product, its transposition and a masked copy took
        28-38 ms, this product and the Dirichlet rows 5-7 ms). Differentiable."""
        width = self.shape[0] if transpose else self.shape[1]
        if x.ndim != 2 or x.shape[1] != width:
            raise ValueError(f"`x` must have shape (B, {width}), got {tuple(x.shape)}")
        x = _prepared(x, self.device)
        # int32 indices: the kernels convert int64 ones on every call (8-10 % of the
        # constraint layer at 6.6e4 DOFs). Only here: a product of many columns with
        # int32 indices rounds them differently with their number (FEMultigrid's
        # weights trained on 2 processes then differed from one process's,
        # tests/train/test_distributed.py); one vector a product does not.
        with torch.autocast(x.device.type, enabled=False):
            pair = _Pair(*self._pair(x.dtype, narrow=True))
            return _EachProduct.apply(x.contiguous(), pair.swapped() if transpose else pair)

    def transposed(self, x: torch.Tensor) -> torch.Tensor:
        """``matrixᵀ @ x`` along the last dimension: ``(..., m)`` -> ``(..., n)``, with
        the stored transpose (its backward with the matrix)."""
        flat = x.reshape(-1, x.shape[-1])
        return self.rows(flat.T, transpose=True).T.reshape(*x.shape[:-1], self.shape[1])

    def rows(self, x: torch.Tensor, *, transpose: bool = False) -> torch.Tensor:
        """``matrix @ x`` along the first dimension, for node-major layouts.

        Args:
            x: ``(n, ...)`` (``(m, ...)`` with ``transpose``).
            transpose: multiply by ``matrixᵀ`` instead.

        Returns:
            ``(m, ...)`` (``(n, ...)`` with ``transpose``) in ``x``'s dtype (float32
            for half-precision ``x``, also under autocast: FE stencils lose too many
            digits in half precision), differentiable in ``x``.
        """
        x = _prepared(x, self.device)
        pair = self._pair(x.dtype)
        matrix, transposed = pair[::-1] if transpose else pair
        with torch.autocast(x.device.type, enabled=False):
            out = _Product.apply(x.reshape(x.shape[0], -1), _Pair(matrix, transposed))
        return out.reshape(matrix.shape[0], *x.shape[1:])


def apply(matrix: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``matrix @ x`` along the last dimension of ``x``, for a bare torch CSR ``matrix``.

    Args:
        matrix: sparse ``(m, n)``; converted to ``x``'s dtype if it differs.
        x: ``(..., n)``.

    Returns:
        ``(..., m)`` in ``x``'s dtype (float32 for half-precision ``x``),
        differentiable in ``x``.
    """
    x = _prepared(x, matrix.device)
    if matrix.dtype != x.dtype:
        matrix = matrix.to(x.dtype)
    flat = x.reshape(-1, x.shape[-1])
    with torch.autocast(x.device.type, enabled=False):
        return (matrix @ flat.T).T.reshape(*x.shape[:-1], matrix.shape[0])
