"""A fixed coarse space for the constraint's solve: the hat functions of a coarse grid.

A network's basis on a 64 x 64 grid cannot carry what a Galerkin solve most needs on
a large mesh: the smooth part of the network's own error, which holds nearly all
of its L2 error (BENCHMARKS.md, "Where the trained network's error is"). A coarse
space does not have to be learned. :class:`CoarseSpace` is the span of the
multilinear hat functions of a ``G^d`` grid over the mesh's bounding box,
interpolated at the DOFs and zero on the Dirichlet DOFs: ``P`` ``(n, m)``, with
``m`` at most ``G^d`` (the grid's boundary hats are kept, cut off at the Dirichlet
DOFs; hat functions that no free DOF sees, e.g. in a hole, are dropped). It works
on any mesh, nested or not.

Its Galerkin matrix ``Pᵀ J P`` ``(m, m)`` is recovered from ``J``'s entries on the
FE pattern as :class:`~fenop.fem.jacobian.JacobianPattern` recovers ``J``: ``J``
times ``P``'s columns summed by colour (hat functions no row of ``Pᵀ J P`` sees
together share a colour: 9 on a 2-D grid finer than the mesh's cells are wide),
restricted by ``Pᵀ``, each entry read from its column's colour. A product with
``P`` or ``Pᵀ`` is a gather or a scatter of ``2^d`` weights per DOF. Everything is
differentiable (autograd).

>>> import torch
>>> from fenop.fem import FunctionSpace, unit_square
>>> from fenop.fem.jacobian import JacobianPattern
>>> space = FunctionSpace(unit_square(9), dirichlet="boundary")
>>> free = torch.ones(space.n_dofs, dtype=torch.bool)
>>> free[space.boundary_dofs] = False
>>> coarse = CoarseSpace(JacobianPattern(space), free, 3)
>>> coarse.size  # each of the 3 x 3 grid's hats sees a free DOF
9
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import scipy.sparse
import torch
from torch import nn

from fenop.fem.colouring import colour_graph
from fenop.fem.encoders import bounding_grid
from fenop.fem.jacobian import JacobianPattern


class CoarseSpace(nn.Module):
    """The hat functions of a ``resolution`` grid over the mesh's bounding box at the
    free DOFs of ``pattern``'s space, ``P`` ``(n, m)``.

    Args:
        pattern: the FE pattern of ``J`` (its space gives the DOFs and the mesh).
        free: ``(n,)`` bool, the DOFs that are not Dirichlet DOFs.
        resolution: grid points per axis (an int for every axis), at least 3.

    Attributes:
        size: ``m``, the coarse space's dimension.

    Shapes:
        :meth:`prolong`: ``(B, m)`` -> ``(B, n)``; :meth:`restrict`: ``(B, n)`` ->
        ``(B, m)``; :meth:`matrix`: ``J``'s entries ``(B, nnz)`` -> ``(B, m, m)``.
    """

    def __init__(
        self, pattern: JacobianPattern, free: torch.Tensor, resolution: int | Sequence[int]
    ):
        super().__init__()
        space = pattern.space
        grid = bounding_grid(space, resolution)
        if min(grid.shape) < 3:
            raise ValueError(
                f"a coarse grid needs at least 3 points per axis (one interior hat), got "
                f"{grid.shape}"
            )
        mask = free.cpu().numpy().astype(np.float64)
        p = scipy.sparse.csr_array(grid.interpolation_matrix(space.dof_points) * mask[:, None])
        p.eliminate_zeros()
        seen = np.flatnonzero(np.asarray(p.sum(axis=0)).ravel() > 0)
        p = scipy.sparse.csr_array(p[:, seen])
        p.sort_indices()
        self.pattern, self.size = pattern, p.shape[1]
        # P row by row as (n, 2^d) columns and weights, padded with weight 0
        width = max(int(np.diff(p.indptr).max(initial=0)), 1)
        index = np.zeros((p.shape[0], width), dtype=np.int64)
        weight = np.zeros((p.shape[0], width))
        for slot in range(width):
            rows = np.flatnonzero(np.diff(p.indptr) > slot)
            index[rows, slot] = p.indices[p.indptr[rows] + slot]
            weight[rows, slot] = p.data[p.indptr[rows] + slot]
        self.register_buffer("index", torch.from_numpy(index), persistent=False)
        self.register_buffer("weight", torch.from_numpy(weight), persistent=False)
        # Pᵀ J P's pattern, and a colouring of its columns in which no row sees two
        # columns of one colour (a colouring of the pattern's square)
        graph = scipy.sparse.csr_array(_dof_graph(pattern))
        coarse = scipy.sparse.csr_array(abs(p.T) @ graph @ abs(p))
        coarse.eliminate_zeros()
        colour = colour_graph(scipy.sparse.csr_array(coarse @ coarse))
        seeds = np.zeros((int(colour.max()) + 1, self.size))
        seeds[colour, np.arange(self.size)] = 1.0
        coarse = coarse.tocoo()
        self.register_buffer(
            "seeds", torch.from_numpy(p @ seeds.T).T.contiguous(), persistent=False
        )
        self.register_buffer(
            "rows", torch.from_numpy(coarse.row.astype(np.int64)), persistent=False
        )
        self.register_buffer(
            "cols", torch.from_numpy(coarse.col.astype(np.int64)), persistent=False
        )
        self.register_buffer(
            "colour", torch.from_numpy(colour[coarse.col].astype(np.int64)), persistent=False
        )

    @property
    def n_colours(self) -> int:
        return self.seeds.shape[0]

    def prolong(self, c: torch.Tensor) -> torch.Tensor:
        """``P c``: coefficients ``(B, m)`` -> the field ``(B, n)``."""
        return (c[:, self.index] * self.weight.to(c.dtype)).sum(dim=-1)

    def restrict(self, r: torch.Tensor) -> torch.Tensor:
        """``Pᵀ r``: ``(B, n)`` -> ``(B, m)`` (``(B, k, n)`` -> ``(B, k, m)`` too)."""
        weighted = r[..., None] * self.weight.to(r.dtype)
        out = r.new_zeros((*r.shape[:-1], self.size))
        return out.index_add(-1, self.index.ravel(), weighted.flatten(-2))

    def matrix(self, values: torch.Tensor) -> torch.Tensor:
        """``Pᵀ J P`` ``(B, m, m)`` from ``J``'s entries ``(B, nnz)`` on the pattern."""
        seeds = self.seeds.to(values.dtype).expand(len(values), -1, -1)
        products = self.restrict(self.pattern.matmul(values, seeds))  # (B, colours, m)
        out = values.new_zeros((len(values), self.size, self.size))
        out[:, self.rows, self.cols] = products[:, self.colour, self.rows]
        return out


def _dof_graph(pattern: JacobianPattern) -> scipy.sparse.csr_array:
    """``(n, n)``: the FE pattern as a matrix of ones."""
    p = pattern.pattern
    n = pattern.space.n_dofs
    crow, col = p.crow.cpu().numpy(), p.col.cpu().numpy()
    return scipy.sparse.csr_array((np.ones(len(col)), col, crow), shape=(n, n))
