"""Sparse Jacobians of FE residuals, recovered from a few linearisations by colouring.

An FE residual couples only DOFs that share a cell, so its Jacobian ``J`` has the
sparsity of the DOF graph. Columns that share no row (no DOF neighbours both) can
be probed together: ``J s_c``, with ``s_c`` the indicator of a group ``c`` of such
columns, holds each of their entries in its own row. A greedy colouring of the
columns (distance-2 in the DOF graph; Curtis, Powell & Reid 1974, the scheme
behind PETSc's ``MatFDColoring``) gives ``c`` groups, about 7-15 for 2D P1
meshes, so ``c`` linearisations of the residual recover all of ``J``, exactly,
where a dense product with ``N`` fields would take ``N`` of them. Products with the
recovered matrix are sparse: their cost is the DOFs', not the cells' times the
quadrature points'.

:class:`JacobianPattern` holds the pattern, the colouring and batched products
``J X`` that are differentiable in both ``J``'s values and ``X``.

>>> import torch
>>> from fenop.fem import FunctionSpace, unit_square
>>> space = FunctionSpace(unit_square(9))
>>> pattern = JacobianPattern(space)
>>> stiffness = space.stiffness.to_dense()                # a residual's Jacobian
>>> values = pattern.values((stiffness @ pattern.seeds.T).T[None])  # c products -> entries
>>> x = torch.randn(1, 3, space.n_dofs, dtype=torch.float64)
>>> bool(torch.allclose(pattern.matmul(values, x), x @ stiffness.T))
True
"""

from __future__ import annotations

import numpy as np
import scipy.sparse
import torch
from torch import nn

from fenop.fem.partition import _canonical_order, dof_graph
from fenop.fem.space import FunctionSpace
from fenop.fem.sparse import _quiet_csr


class JacobianPattern(nn.Module):
    """The DOF-graph sparsity of a residual's Jacobian and a colouring of its columns.

    Args:
        space: the FE space of the residual.

    Attributes:
        n_colours: ``c``, the groups of columns probed together.
        seeds: ``(c, n_dofs)`` float64, the indicator of each group.
        nnz: entries of the pattern (row-major, columns sorted in each row).

    Shapes:
        :meth:`values`: products ``(B, c, n)`` -> entries ``(B, nnz)``;
        :meth:`matmul`: entries ``(B, nnz)``, fields ``(B, M, n)`` -> ``(B, M, n)``.
    """

    def __init__(self, space: FunctionSpace):
        super().__init__()
        graph = dof_graph(space)
        graph.sort_indices()
        colour = _distance2_colouring(graph, _canonical_order(space))
        n, c = space.n_dofs, int(colour.max()) + 1
        self.space, self.n_colours, self.nnz = space, c, graph.nnz
        rows = np.repeat(np.arange(n), np.diff(graph.indptr))
        cols = graph.indices.astype(np.int64)
        seeds = np.zeros((c, n))
        seeds[colour, np.arange(n)] = 1.0
        # Entry (i, j) is row i of the product of j's colour: its place in (c, n).
        probe = colour[cols] * n + rows
        transposed = scipy.sparse.csr_array(
            (np.arange(graph.nnz, dtype=np.float64), (cols, rows)), shape=(n, n)
        )
        transposed.sort_indices()
        buffers = {
            "seeds": torch.from_numpy(seeds),
            "probe": torch.from_numpy(probe),
            "crow": torch.from_numpy(graph.indptr.astype(np.int64)),
            "col": torch.from_numpy(cols),
            "crow_t": torch.from_numpy(transposed.indptr.astype(np.int64)),
            "col_t": torch.from_numpy(transposed.indices.astype(np.int64)),
            # entry s of the transpose is entry transpose_order[s] of the matrix
            "transpose_order": torch.from_numpy(transposed.data.astype(np.int64)),
        }
        for name, tensor in buffers.items():
            self.register_buffer(name, tensor, persistent=False)

    def values(self, products: torch.Tensor) -> torch.Tensor:
        """The entries ``(B, nnz)`` of ``J`` from its products with the seeds,
        ``products[:, c] = J seeds[c]`` ``(B, c, n)``."""
        if products.ndim != 3 or products.shape[1:] != self.seeds.shape:
            raise ValueError(
                f"`products` must have shape (batch, {self.n_colours}, {self.space.n_dofs}), "
                f"got {tuple(products.shape)}"
            )
        return products.reshape(products.shape[0], -1)[:, self.probe]

    def matmul(self, values: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``J_b X_b`` for each batch element: entries ``(B, nnz)``, ``x`` ``(B, M, n)``
        -> ``(B, M, n)``; differentiable in both."""
        if values.ndim != 2 or values.shape[1] != self.nnz:
            raise ValueError(f"`values` must have shape (batch, {self.nnz}), got {values.shape}")
        if x.ndim != 3 or x.shape[0] != values.shape[0] or x.shape[2] != self.space.n_dofs:
            raise ValueError(
                f"`x` must have shape ({values.shape[0]}, M, {self.space.n_dofs}), "
                f"got {tuple(x.shape)}"
            )
        return _PatternProduct.apply(values, x.to(values.dtype), self)

    def dense(self, values: torch.Tensor) -> torch.Tensor:
        """``(B, n, n)`` dense copies of the matrices (for tests and small problems)."""
        n = self.space.n_dofs
        rows = torch.repeat_interleave(torch.arange(n, device=values.device), self.crow.diff())
        out = values.new_zeros(values.shape[0], n, n)
        out[:, rows, self.col] = values
        return out


def _block_csr(crow, col, values: torch.Tensor, n: int) -> torch.Tensor:
    """The block-diagonal ``(B n, B n)`` CSR matrix of B matrices on one pattern
    (one sparse product then serves the whole batch)."""
    batch, nnz = values.shape
    offsets = torch.arange(batch, device=values.device)
    crow_b = torch.cat([(crow[:-1] + offsets[:, None] * nnz).reshape(-1), crow[-1:] * batch])
    col_b = (col + offsets[:, None] * n).reshape(-1)
    with _quiet_csr():
        return torch.sparse_csr_tensor(
            crow_b, col_b, values.reshape(-1), size=(batch * n, batch * n), check_invariants=False
        )


class _PatternProduct(torch.autograd.Function):
    """``J X`` on a fixed pattern. Backward: ``Jᵀ G`` through the stored transposed
    pattern, and ``∂/∂J_ij = Σ_m G_im X_jm`` sampled on the pattern (SDDMM), so
    that nothing of size (entries x fields) is ever held."""

    @staticmethod
    def forward(values, x, pattern):
        batch, fields, n = x.shape
        matrix = _block_csr(pattern.crow, pattern.col, values, n)
        columns = x.transpose(1, 2).reshape(batch * n, fields)
        return (matrix @ columns).reshape(batch, n, fields).transpose(1, 2)

    @staticmethod
    def setup_context(ctx, inputs, output):
        values, x, pattern = inputs
        ctx.pattern = pattern
        ctx.save_for_backward(values, x)

    @staticmethod
    def backward(ctx, grad):
        values, x = ctx.saved_tensors
        p = ctx.pattern
        batch, fields, n = x.shape
        grad_columns = grad.transpose(1, 2).reshape(batch * n, fields)
        grad_values = grad_x = None
        if ctx.needs_input_grad[1]:
            transposed = _block_csr(p.crow_t, p.col_t, values[:, p.transpose_order], n)
            grad_x = (transposed @ grad_columns).reshape(batch, n, fields).transpose(1, 2)
        if ctx.needs_input_grad[0]:
            pattern = _block_csr(p.crow, p.col, torch.zeros_like(values), n)
            columns = x.transpose(1, 2).reshape(batch * n, fields)
            sampled = torch.sparse.sampled_addmm(pattern, grad_columns, columns.T, beta=0.0)
            grad_values = sampled.values().reshape(batch, -1)
        return grad_values, grad_x, None


def _distance2_colouring(graph: scipy.sparse.csr_array, order: np.ndarray) -> np.ndarray:
    """``(n,)`` colours such that two DOFs of one colour have no neighbour in common
    (greedy, in ``order``: the coordinate order, so independent of the numbering)."""
    square = scipy.sparse.csr_array(graph @ graph)
    indptr, indices = square.indptr, square.indices
    colour = np.full(graph.shape[0], -1, dtype=np.int64)
    for dof in order:
        taken = colour[indices[indptr[dof] : indptr[dof + 1]]]
        free = np.ones(len(taken) + 1, dtype=bool)
        free[taken[(taken >= 0) & (taken < len(free))]] = False
        colour[dof] = int(np.argmax(free))
    return colour
