"""A residual's Jacobian assembled cell by cell on a :class:`~fenop.fem.jacobian.JacobianPattern`.

Where a residual knows its weak form's linearisation, its Jacobian's entries come in
one pass over the cells, instead of one linearisation per colour of the pattern:
from weights at the quadrature points on fixed local tensors (:meth:`CellJacobian.weighted`)
and, for local matrices of rank one, from the two local vectors
(:meth:`CellJacobian.rank_one`).

>>> import torch
>>> from fenop.fem import FunctionSpace, unit_square
>>> from fenop.fem.jacobian import JacobianPattern
>>> space = FunctionSpace(unit_square(5))
>>> pattern = JacobianPattern(space)
>>> cells = CellJacobian(pattern, torch.device("cpu"))
>>> ones = torch.ones(1, 1, cells.n_cells, 3, dtype=torch.float64)  # (B, K, E, Q)
>>> stiffness = pattern.dense(cells.weighted(ones, ("stiffness",), cells.every))[0]
>>> bool(torch.allclose(stiffness, space.stiffness.to_dense()))
True
"""

from __future__ import annotations

import numpy as np
import scipy.sparse
import torch
from torch.autograd.function import once_differentiable

from fenop.fem.forms import quadrature_data
from fenop.fem.jacobian import take_columns
from fenop.fem.sparse import SparseMatrix


class CellJacobian:
    """A residual's Jacobian assembled cell by cell on a :class:`JacobianPattern
    <fenop.fem.jacobian.JacobianPattern>`, from weights at the quadrature points:
    the entries of

        ``J_ij = Σ_k Σ_e Σ_q w_{k,e,q} A^k_{ij,e,q}``

    for fixed local tensors ``A^k`` of the cells (below), on all cells or on those
    the residual's forms see (``FEForms.on``). The entries are linear in the weights
    ``w`` ``(B, K, E, Q)``: a fixed sparse map, made once per set of tensors, takes
    them to the entries in one sparse product, and its stored transpose gives the
    backward pass. One pass, where recovering the Jacobian takes one linearisation
    per colour of the pattern; and 2x faster, forward and backward, than contracting
    the local tensors with the weights and scattering the local matrices into the
    entries (nonlinear diffusion at 1.7e4 DOFs, batch 8: 33 + 32 against 55 + 79 ms),
    at the map's memory (``K N² E Q`` entries: 2.7e6 for that residual's three).
    Weights constant on each cell (``Q = 1``) take a map with the tensors summed
    over the quadrature points, ``Q`` times smaller.

    The tensors, ``N`` local basis functions, ``E`` cells, ``Q`` quadrature points,
    ``d`` dimensions, ``dx`` the quadrature weights: ``"mass"`` ``φ_i φ_j dx``,
    ``"stiffness"`` ``∇φ_i·∇φ_j dx`` and ``"gradient_value"`` ``∂_k φ_i φ_j dx``,
    ``d`` tensors, one per axis ``k``. Made once per residual and device.

    Attributes:
        constant_gradients: whether the basis functions' gradients are constant on
            each cell (P1 on simplices), so that a residual may build its local
            matrices from one gradient a cell (:meth:`rank_one`).
    """

    TENSORS = ("mass", "stiffness", "gradient_value")

    def __init__(self, pattern, device: torch.device):
        self.pattern, self.device = pattern, torch.device(device)
        element_dofs = pattern.space.basis.element_dofs
        self.n_cells = element_dofs.shape[1]
        self.every = torch.arange(self.n_cells, device=self.device)  # every cell, in order
        self.dofs = torch.from_numpy(element_dofs.astype(np.int64)).to(self.device)  # (N, E)
        phi, dphi, dx = quadrature_data(pattern.space)
        self.constant_gradients = bool(np.allclose(dphi, dphi[..., :1], rtol=1e-12, atol=0))
        if self.constant_gradients:  # affine cells: every cell's φ_j(x_q) is the reference's
            gradients = dphi[..., 0]  # (N, d, E)
            self._constant = tuple(
                torch.from_numpy(np.ascontiguousarray(x)).to(self.device)
                for x in (phi[:, 0], dx.T, np.einsum("ide,jde->ije", gradients, gradients))
            )
        self._maps: dict[tuple, tuple[SparseMatrix, int]] = {}
        self._scatters: dict[str, tuple] = {}  # 0/1 maps of local entries (_scatter)

    def constant_basis(self, index: torch.Tensor):
        """Where the gradients are constant on each cell: the local basis functions'
        values at the quadrature points ``(N, Q)`` (the same on every cell), the
        quadrature weights ``(Q, E')`` and the products ``∇φ_i·∇φ_j`` ``(N, N, E')``
        of the cells ``index`` ``(E',)``: cells last, the layout of
        :meth:`local_values`."""
        if not self.constant_gradients:
            raise ValueError("the basis functions' gradients are not constant on the cells")
        phi, dx, products = self._constant
        if self._every_cell(index):
            return phi, dx, products
        return phi, dx[:, index], products[..., index]

    def local_values(self, u: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """The coefficients ``u`` ``(B, n)`` at the local DOFs of the cells ``index``:
        ``(B, N, E')``, cells last (contiguous along them, for cell-wise arithmetic).
        Differentiable."""
        dofs = self.dofs if self._every_cell(index) else self.dofs[:, index]
        return take_columns(u, dofs.reshape(-1)).view(u.shape[0], *dofs.shape)

    def assemble(self, local: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """``Σ_e`` of local vectors ``(B, N, E')`` of the cells ``index`` into the DOFs:
        ``(B, n)``. Differentiable."""
        return self._scatter("vector")[0].each(self._on_every_cell(local, index).flatten(1))

    def _scatter(self, kind: str) -> tuple[SparseMatrix, torch.Tensor]:
        """The 0/1 map that adds local entries into global ones, and each local entry's
        global one, made on the first call: ``"vector"``, local vectors' ``(N, E)``
        into the DOFs, ``(n, N E)``; ``"matrix"``, local matrices' ``(N, N, E)`` into
        the pattern's, ``(nnz, N² E)``."""
        if kind not in self._scatters:
            space = self.pattern.space
            if kind == "vector":
                rows, n_rows = space.basis.element_dofs.ravel(), space.n_dofs
            else:
                rows, n_rows = self.pattern.local_slots().ravel(), self.pattern.nnz
            ones = np.ones(len(rows))
            matrix = scipy.sparse.csr_array(
                (ones, (rows, np.arange(len(rows)))), shape=(n_rows, len(rows))
            )
            rows = torch.from_numpy(rows.astype(np.int64)).to(self.device)
            self._scatters[kind] = (SparseMatrix(matrix).to(self.device), rows)
        return self._scatters[kind]

    def _map(self, names: tuple[str, ...], constant: bool) -> tuple[SparseMatrix, int]:
        """The map ``(nnz, K E Q)`` (``constant``: ``(nnz, K E)``, the tensors summed
        over the quadrature points) from the weights of the tensors ``names`` to the
        entries, and ``K``; made on the first call for ``names``."""
        key = (names, constant)
        if key not in self._maps:
            unknown = [name for name in names if name not in self.TENSORS]
            if unknown or not names:
                raise ValueError(f"cell tensors are {self.TENSORS}, got {names}")
            phi, dphi, dx = quadrature_data(self.pattern.space)
            tensors = {  # (K, N, N, E, Q) each
                "mass": lambda: np.einsum("ieq,jeq,eq->ijeq", phi, phi, dx)[None],
                "stiffness": lambda: np.einsum("ideq,jdeq,eq->ijeq", dphi, dphi, dx)[None],
                "gradient_value": lambda: np.einsum("ideq,jeq,eq->dijeq", dphi, phi, dx),
            }
            local = np.concatenate([tensors[name]() for name in names])
            if constant:
                local = local.sum(axis=-1, keepdims=True)
            k, _, _, e, q = local.shape
            rows = np.broadcast_to(self.pattern.local_slots()[None, ..., None], local.shape)
            columns = np.arange(k * e * q).reshape(k, 1, 1, e, q)
            matrix = scipy.sparse.csr_array(
                (local.ravel(), (rows.ravel(), np.broadcast_to(columns, local.shape).ravel())),
                shape=(self.pattern.nnz, k * e * q),
            )
            matrix.sum_duplicates()
            self._maps[key] = (SparseMatrix(matrix).to(self.device), k)
        return self._maps[key]

    def _every_cell(self, index: torch.Tensor) -> bool:
        """Whether ``index`` is every cell in order."""
        return index.shape == self.every.shape and bool(torch.equal(index, self.every))

    def _on_every_cell(self, x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """``x`` ``(B, K, E', ...)`` on the cells ``index`` as ``(B, K, E, ...)`` on all
        of them, zero on the others."""
        if self._every_cell(index):
            return x
        full = x.new_zeros(*x.shape[:2], self.n_cells, *x.shape[3:])
        return full.index_copy(2, index, x)

    def weighted(
        self, weights: torch.Tensor, names: tuple[str, ...], index: torch.Tensor
    ) -> torch.Tensor:
        """The entries ``(B, nnz)`` of ``Σ_k Σ_q w_{k,e,q} A^k_{ij,e,q}`` summed over the
        cells ``index`` ``(E',)``, for weights ``(B, K, E', Q)`` (``K``: one
        for each of ``names``, ``d`` for ``"gradient_value"``; ``Q = 1``: each the
        same at every quadrature point of its cell) and the tensors ``A^k`` of
        ``names`` in order; differentiable in the weights."""
        constant = weights.ndim == 4 and weights.shape[3] == 1
        matrix, k = self._map(tuple(names), constant)
        if weights.ndim != 4 or weights.shape[1:3] != (k, len(index)):
            raise ValueError(
                f"`weights` must have shape (batch, {k}, {len(index)}, Q or 1) "
                f"for {names} on {len(index)} cells, got {tuple(weights.shape)}"
            )
        weights = self._on_every_cell(weights, index)
        if constant:  # one weight a cell: one product a sample with the smaller map
            return matrix.each(weights.flatten(1))
        # contiguous: later gathers from a strided (B, nnz) array run 3x slower
        return matrix(weights.flatten(1)).contiguous()

    def rank_one(self, left: torch.Tensor, right: torch.Tensor, index: torch.Tensor):
        """The entries ``(B, nnz)`` of ``Σ_e l_e r_eᵀ``, the local matrices of the cells
        ``index`` ``(E',)`` each the outer product of two local vectors: ``left`` and
        ``right`` ``(B, N, E')``, entry ``i`` of cell ``e``'s the value at its
        ``i``-th local DOF. Differentiable in both (once)."""
        n_local = self.pattern.space.basis.element_dofs.shape[0]
        shape = (left.shape[0], n_local, len(index))
        if left.shape != shape or right.shape != shape:
            raise ValueError(
                f"`left` and `right` must have shape {shape}, got {tuple(left.shape)} "
                f"and {tuple(right.shape)}"
            )
        # contiguous: a strided operand made the outer products 5x slower
        left, right = (self._on_every_cell(x, index).contiguous() for x in (left, right))
        return _RankOne.apply(left, right, *self._scatter("matrix"))


class _RankOne(torch.autograd.Function):
    """The entries ``(B, nnz)`` of ``Σ_e l_e r_eᵀ`` from ``l``, ``r`` ``(B, N, E)``: the
    local outer products ``(B, N, N, E)`` and a 0/1 map's product to the entries.
    Backward: the entries' gradient ``ḡ`` taken to the local matrices by a gather
    (the map's transpose has one entry a row; 19 against 30 ms for its products,
    6.6e4 DOFs, batch 8), then ``l̄_i = Σ_j ḡ_ij r_j`` and ``r̄_j = Σ_i ḡ_ij l_i`` by ``N²``
    fused multiply-adds on ``(B, E)`` slices each: autograd's backward of the
    broadcast product writes two ``(B, N, N, E)`` products and reduces them, 3x
    slower (P1 at 6.6e4 DOFs, batch 8)."""

    @staticmethod
    def forward(ctx, left, right, scatter: SparseMatrix, slots: torch.Tensor):
        ctx.save_for_backward(left, right, slots)
        outer = left[:, :, None] * right[:, None]
        return scatter.each(outer.flatten(1))

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        left, right, slots = ctx.saved_tensors
        n_local = left.shape[1]
        local = take_columns(grad, slots).view(left.shape[0], n_local, n_local, -1)
        grad_left = grad_right = None
        if ctx.needs_input_grad[0]:
            grad_left = torch.zeros_like(left)
            for i in range(n_local):
                for j in range(n_local):
                    grad_left[:, i].addcmul_(local[:, i, j], right[:, j])
        if ctx.needs_input_grad[1]:
            grad_right = torch.zeros_like(right)
            for i in range(n_local):
                for j in range(n_local):
                    grad_right[:, j].addcmul_(local[:, i, j], left[:, i])
        return grad_left, grad_right, None, None
