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

Its Galerkin matrix ``Pᵀ J P`` ``(m, m)`` is linear in ``J``'s entries on the FE
pattern (:class:`~fenop.fem.jacobian.JacobianPattern`): one sparse product with a
fixed map, built once, gives it (measured at 1.7e4 DOFs and ``G = 17``: 0.6 ms a
sample, a tenth of recovering it from ``J``'s products with ``P``'s columns; the
map holds about ``4^d`` entries per entry of ``J``). A product with ``P`` or
``Pᵀ`` is a sparse product (``2^d`` weights per DOF). Everything is
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

import math
from collections.abc import Sequence

import numpy as np
import scipy.sparse
import torch
from torch import nn

from fenop.fem.encoders import bounding_grid
from fenop.fem.jacobian import JacobianPattern, _CSRPattern
from fenop.fem.sparse import SparseMatrix
from fenop.operators.constraints.banded import BandedFactorisation, BandedLU, BandLayout
from fenop.operators.implicit import unit_scale

# The largest grid "auto" picks: 1089 hats (33 x 33 in 2D, 10 x 10 x 10 in 3D), the
# largest measured.
_AUTO_MAX_HATS = 1089


def auto_resolution(n_free: int, dim: int) -> int:
    """The grid points per axis ``G`` of ``coarse_grid="auto"`` for a mesh of
    ``n_free`` free DOFs in ``dim`` dimensions, ``N = n_free^(1/d)`` of them per axis
    (as on a square mesh): the grid's spacing the geometric mean of the mesh's and
    twice the domain's, ``G - 1 = √(2 (N + 1))`` cells a side, and at most a
    quarter of the DOFs per axis plus one, capped at 1089 hats; 0 (no grid) under
    3 points. A grid that grows with the square root of the mesh's cells per axis
    keeps the coarse space's share of the smooth error, which a network emitting
    on a fixed grid leaves, as the mesh is refined, at a coarse solve that stays
    small beside the mesh's work. Measured where each paid at equal training time
    (BENCHMARKS.md): 9 x 9 on a 33 x 33 mesh, 17 x 17 on a 129 x 129 mesh, 24 x 24
    on 257 x 257 and 33 x 33 on 513 x 513 (0.47x the 17 x 17 grid's L2 error there,
    at a step 8 % longer).

    >>> [auto_resolution(n * n, 2) for n in (31, 127, 255, 511, 3)]
    [9, 17, 24, 33, 0]
    """
    per_axis = n_free ** (1 / dim)
    cap = math.floor(_AUTO_MAX_HATS ** (1 / dim) + 1e-9)
    resolution = min(round(math.sqrt(2 * (per_axis + 1))) + 1, round(per_axis / 4) + 1, cap)
    return resolution if resolution >= 3 else 0


def grid_hats(
    space, free: torch.Tensor, resolution: int | Sequence[int], *, independent: bool = True
) -> tuple[scipy.sparse.csr_array, np.ndarray]:
    """``P`` ``(n, m)``: the hat functions of a ``resolution`` grid over the bounding box
    of ``space``'s mesh at its DOFs, zero where ``free`` ``(n,)`` is not, those that no
    free DOF sees dropped; and the grid points ``(m,)`` (flat, C order) of its columns.
    ``independent``: refuse more hats than free DOFs (:class:`CoarseSpace`'s
    arguments and checks)."""
    grid = bounding_grid(space, resolution)
    if min(grid.shape) < 3:
        raise ValueError(
            f"a coarse grid needs at least 3 points per axis (one interior hat), got {grid.shape}"
        )
    mask = free.cpu().numpy().astype(np.float64)
    p = scipy.sparse.csr_array(grid.interpolation_matrix(space.dof_points) * mask[:, None])
    p.eliminate_zeros()
    seen = np.flatnonzero(np.asarray(p.sum(axis=0)).ravel() > 0)
    p = scipy.sparse.csr_array(p[:, seen])
    p.sort_indices()
    if independent and p.shape[1] > int(mask.sum()):
        raise ValueError(
            f"a coarse grid of {grid.shape} points gives {p.shape[1]} hat functions for "
            f"the {int(mask.sum())} free DOFs: they are dependent; a coarse space takes "
            "a grid several times coarser than the mesh"
        )
    return p, seen


def _padded_rows(p: scipy.sparse.csr_array) -> tuple[np.ndarray, np.ndarray]:
    """``P``'s rows as ``(n, w)`` columns and weights, ``w`` its most entries in a row,
    padded with weight 0."""
    width = max(int(np.diff(p.indptr).max(initial=0)), 1)
    index = np.zeros((p.shape[0], width), dtype=np.int64)
    weight = np.zeros((p.shape[0], width))
    for slot in range(width):
        rows = np.flatnonzero(np.diff(p.indptr) > slot)
        index[rows, slot] = p.indices[p.indptr[rows] + slot]
        weight[rows, slot] = p.data[p.indptr[rows] + slot]
    return index, weight


class CoarseSpace(nn.Module):
    """The hat functions of a ``resolution`` grid over the mesh's bounding box at the
    free DOFs of ``pattern``'s space, ``P`` ``(n, m)``.

    Args:
        pattern: the FE pattern of ``J`` (its space gives the DOFs and the mesh).
        free: ``(n,)`` bool, the DOFs that are not Dirichlet DOFs.
        resolution: grid points per axis (an int for every axis), at least 3, with
            no more hats than free DOFs (more are dependent, and their Galerkin
            matrix singular): a grid several times coarser than the mesh.
        independent: ``False`` allows more hats than free DOFs: for a space that is
            never solved in, only combined (the grid a network's basis fields are
            emitted on, :class:`~fenop.operators.HardConstraint`).

    Attributes:
        size: ``m``, the coarse space's dimension.
        grid_shape: the grid's points per axis.

    Shapes:
        :meth:`prolong`: ``(B, m)`` -> ``(B, n)``; :meth:`restrict`: ``(B, n)`` ->
        ``(B, m)``; :meth:`matrix`: ``J``'s entries ``(B, nnz)`` -> ``(B, m, m)``;
        :meth:`matrix_from`: a field ``(B, n)`` -> ``(B, m, m)``; :meth:`entries` and
        :meth:`entries_from` the same to the ``s`` entries of its pattern ``(B, s)``;
        :meth:`apply`: entries ``(B, s)``, fields ``(B, M, m)`` -> ``(B, M, m)``;
        :meth:`from_grid`: grid values ``(B, M, *grid)`` -> ``(B, M, m)``.
    """

    def __init__(
        self,
        pattern: JacobianPattern,
        free: torch.Tensor,
        resolution: int | Sequence[int],
        *,
        independent: bool = True,
    ):
        super().__init__()
        p, points = grid_hats(pattern.space, free, resolution, independent=independent)
        self.size = p.shape[1]
        self.grid_shape = bounding_grid(pattern.space, resolution).shape
        # the grid point of each hat, to pick the hats' values from a grid tensor
        self.register_buffer("points", torch.from_numpy(points.astype(np.int64)), persistent=False)
        # P and Pᵀ as sparse products (2^d entries a row): a gather and a scatter-add
        # of (B, n, 2^d) took 5-6x as long, forward and backward (6.6e4 DOFs, batch 8)
        self.hats = SparseMatrix(p)
        index, weight = _padded_rows(p)
        # Pᵀ J P's entries are linear in J's: entry (i, j) of J adds P[i, k] P[j, l]
        # J[i, j] to entry (k, l). That map, a fixed sparse matrix (about 2^(2d) entries
        # per entry of J), takes J's entries to the coarse matrix's in one product.
        rows, cols = pattern.entry_rows.cpu().numpy(), pattern.pattern.col.cpu().numpy()
        coarse_rows = index[rows][:, :, None] * self.size + index[cols][:, None, :]
        weights = weight[rows][:, :, None] * weight[cols][:, None, :]
        entries = np.broadcast_to(np.arange(len(rows))[:, None, None], weights.shape)
        kept = weights != 0
        galerkin = scipy.sparse.csr_array(
            (weights[kept], (coarse_rows[kept], entries[kept])),
            shape=(self.size * self.size, len(rows)),
        )
        galerkin.sum_duplicates()
        seen = np.flatnonzero(np.diff(galerkin.indptr))  # the coarse matrix's pattern
        galerkin = scipy.sparse.csr_array(galerkin[seen])
        rows, cols = np.divmod(seen, self.size)
        on_diagonal = np.flatnonzero(rows == cols)  # every hat sees a free DOF: all there
        # in the grid's order the matrix is banded: block tridiagonal (banded.py)
        self.band = BandLayout(rows, cols, self.size)
        # the same pattern for products with the coarse matrices (the slots are in
        # row-major order, as a CSR matrix's entries)
        slots = np.arange(len(seen), dtype=np.float64)
        self.pattern = _CSRPattern(
            scipy.sparse.csr_array((slots, (rows, cols)), shape=(self.size, self.size))
        )
        for name, array in {"slots": seen, "slot_rows": rows, "slot_cols": cols}.items():
            self.register_buffer(name, torch.from_numpy(array.astype(np.int64)), persistent=False)
        self.register_buffer(
            "diagonal_slots", torch.from_numpy(on_diagonal.astype(np.int64)), persistent=False
        )
        # with its transpose stored: autograd's backward of a CSR product transposes
        # (a sort of its 1.4e6 entries at 1.7e4 DOFs) on every call
        self.galerkin = SparseMatrix(galerkin)
        self._composed: tuple[SparseMatrix, SparseMatrix] | None = None

    def prolong(self, c: torch.Tensor) -> torch.Tensor:
        """``P c``: coefficients ``(B, m)`` -> the field ``(B, n)``."""
        return self.hats(c)

    def restrict(self, r: torch.Tensor) -> torch.Tensor:
        """``Pᵀ r``: ``(B, n)`` -> ``(B, m)`` (``(B, k, n)`` -> ``(B, k, m)`` too)."""
        return self.hats.transposed(r)

    def from_grid(self, values: torch.Tensor) -> torch.Tensor:
        """The hats' coefficients ``(B, M, m)`` of the fields whose values on the grid are
        ``values`` ``(B, M, *grid)``: ``P`` times them is the fields' multilinear
        interpolant at the DOFs (:class:`~fenop.fem.FEDecoder`'s), zero at the
        Dirichlet DOFs."""
        if values.ndim != 2 + len(self.grid_shape) or tuple(values.shape[2:]) != self.grid_shape:
            raise ValueError(
                f"grid values must have shape (batch, fields, "
                f"{', '.join(map(str, self.grid_shape))}), got {tuple(values.shape)}"
            )
        return values.flatten(2).index_select(2, self.points.to(values.device))

    def apply(self, entries: torch.Tensor, fields: torch.Tensor) -> torch.Tensor:
        """``(Pᵀ J P) c`` ``(B, M, m)`` for each of the coefficients ``fields``
        ``(B, M, m)``, from the coarse matrices' :meth:`entries` ``(B, s)``: a sparse
        product; differentiable in both."""
        return self.pattern.rows(entries, fields.transpose(1, 2)).transpose(1, 2)

    def matrix(self, values: torch.Tensor) -> torch.Tensor:
        """``Pᵀ J P`` ``(B, m, m)`` from ``J``'s entries ``(B, nnz)`` on the pattern."""
        return self._unpacked(self.entries(values))

    def matrix_from(self, to_entries: SparseMatrix, field: torch.Tensor) -> torch.Tensor:
        """``Pᵀ J P`` ``(B, m, m)`` for ``J``'s entries ``to_entries @ field`` (a
        residual's ``jacobian_map``, ``field`` ``(B, n)``)."""
        return self._unpacked(self.entries_from(to_entries, field))

    def entries(self, values: torch.Tensor) -> torch.Tensor:
        """``Pᵀ J P``'s entries on the coarse pattern ``(B, s)`` (``s`` the pattern's
        entries, a dozen or so a row) from ``J``'s entries ``(B, nnz)``."""
        return self.galerkin(values)

    def entries_from(self, to_entries: SparseMatrix, field: torch.Tensor) -> torch.Tensor:
        """:meth:`entries` for ``J``'s entries ``to_entries @ field`` (a residual's
        ``jacobian_map``, ``field`` ``(B, n)``), by one product with the two maps
        composed, made on the first call with ``to_entries``: without ``J``'s
        entries, whose product with :meth:`entries`' map wants them entry-major
        (a transposition of ``(B, nnz)``), and with fewer entries (Darcy at 6.6e4
        DOFs: 1.1e6 against 6.5e6). Differentiable in ``field``."""
        if self._composed is None or self._composed[0] is not to_entries:
            self._composed = (to_entries, SparseMatrix(self.galerkin.scipy() @ to_entries.scipy()))
        return self._composed[1].to(field.device)(field)

    def factorised(self, entries: torch.Tensor, *, ridge: float, symmetric: bool):
        """The factors of the coarse matrices whose :meth:`entries` are ``entries``
        ``(B, s)``, scaled and ridged as every system of the constraints
        (:func:`~fenop.operators.implicit.scaled_system`), the scaling and the check
        for finite values done on the entries, block by block in their band:
        symmetric matrices (a symmetric residual's) by Cholesky
        (:class:`~fenop.operators.constraints.banded.BandedFactorisation`), others by
        block LU (:class:`~fenop.operators.constraints.banded.BandedLU`). Either has
        ``solve(rhs)`` -> ``(w, ok)``; differentiable in ``entries``."""
        scale, live = unit_scale(entries[:, self.diagonal_slots])
        scaled = entries * scale[:, self.slot_rows] * scale[:, self.slot_cols]
        with torch.no_grad():
            finite = torch.isfinite(scaled).all(dim=1)
        added = ridge + (~live).to(scaled.dtype)
        kind = BandedFactorisation if symmetric else BandedLU
        return kind(self.band, scaled, added, scale, finite=finite)

    def _unpacked(self, entries: torch.Tensor) -> torch.Tensor:
        """The coarse matrices ``(B, m, m)`` from their entries on the coarse pattern
        ``(B, s)``."""
        flat = entries.new_zeros((len(entries), self.size * self.size))
        flat[:, self.slots] = entries
        return flat.reshape(len(entries), self.size, self.size)
