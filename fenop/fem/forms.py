"""Differentiable FE assembly in torch: the building blocks of discrete PDE residuals.

:class:`FEForms` holds, for every cell and quadrature point of a space, the basis
function values and gradients and the quadrature weights (taken from scikit-fem's
basis, so torch and scikit-fem integrate with the same rule). With them a weak form
is assembled for a whole batch of coefficient vectors at once, differentiably:

    ∫ a ∇u · ∇v  ->  forms.assemble_gradient(forms.values(a) * forms.gradients(u))
    ∫ f v        ->  forms.assemble_values(forms.values(f))

>>> import torch
>>> from fenop.fem import FunctionSpace, unit_square
>>> space = FunctionSpace(unit_square(5))
>>> forms = FEForms(space)
>>> u = space.interpolate(lambda x: x[0] ** 2)
>>> ku = forms.assemble_gradient(forms.gradients(u))            # K u, shape (n_dofs,)
>>> torch.allclose(ku, space.stiffness @ u)
True
"""

from __future__ import annotations

import contextlib

import numpy as np
import scipy.sparse
import torch
from torch import nn

from fenop.fem.space import FunctionSpace
from fenop.fem.sparse import SparseMatrix


def quadrature_data(space: FunctionSpace) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Local basis values ``(N, E, Q)``, their gradients ``(N, d, E, Q)`` and the
    quadrature weights ``(E, Q)`` of every cell, from the space's scikit-fem basis."""
    basis = space.basis
    # basis.basis[i][0] is the i-th local basis function on every cell, as a
    # scikit-fem DiscreteField: value (E, Q), grad (d, E, Q).
    phi = np.stack([np.asarray(b[0]) for b in basis.basis])
    dphi = np.stack([np.asarray(b[0].grad) for b in basis.basis])
    return phi, dphi, np.asarray(basis.dx)


def _interpolation(
    local: np.ndarray, element_dofs: np.ndarray, n_dofs: int
) -> scipy.sparse.csr_array:
    """The sparse ``(prod(shape), n_dofs)`` map from DOF values to values at quadrature
    points, from the local basis data ``local`` ``(N, *shape)`` (``shape`` ending in
    ``(E, Q)``) and the cells' DOFs ``(N, E)``."""
    n_local, shape = local.shape[0], local.shape[1:]
    rows = np.broadcast_to(np.arange(np.prod(shape)).reshape(shape), local.shape)
    dofs = element_dofs.reshape((n_local,) + (1,) * (len(shape) - 2) + (shape[-2], 1))
    cols = np.broadcast_to(dofs, local.shape)
    matrix = scipy.sparse.csr_array(
        (local.ravel(), (rows.ravel(), cols.ravel())), shape=(int(np.prod(shape)), n_dofs)
    )
    matrix.sum_duplicates()
    return matrix


class Cells(nn.Module):
    """The quadrature maps of a set of a space's cells (all of them, or a subset):
    sparse ``(E Q, n)`` and ``(d E Q, n)`` operators from DOF values to values and
    gradients at their quadrature points, and the weights ``(E, Q)``.

    Args:
        space: the FE space.
        cells: indices of the cells, or ``None`` for all.

    Attributes:
        index: ``(E,)`` the indices of its cells in the space's.
    """

    def __init__(self, space: FunctionSpace, cells: np.ndarray | None = None):
        super().__init__()
        phi, dphi, dx = quadrature_data(space)
        dofs = space.basis.element_dofs
        if cells is not None:
            cells = np.asarray(cells, dtype=np.int64)
            phi, dphi, dx, dofs = phi[:, cells], dphi[:, :, cells], dx[cells], dofs[:, cells]
        self.n_cells = dx.shape[0]
        index = np.arange(self.n_cells) if cells is None else cells
        self.register_buffer("index", torch.from_numpy(index), persistent=False)
        self.value_shape, self.gradient_shape = phi.shape[1:], dphi.shape[1:]
        self.to_values = SparseMatrix(_interpolation(phi, dofs, space.n_dofs))
        self.to_gradients = SparseMatrix(_interpolation(dphi, dofs, space.n_dofs))
        self.register_buffer("dx", torch.from_numpy(dx), persistent=False)


class FEForms(nn.Module):
    """Quadrature data of a space, and batched assembly with it.

    Values and gradients at the quadrature points are sparse products with the
    space's interpolation operators (``E Q x n`` and ``d E Q x n``), and assembly is
    the product with their transposes, kept beside them
    (:class:`~fenop.fem.SparseMatrix`): the work is the operators' nonzeros, and
    none of it a loop over cells.

    Within ``with forms.on(forms.subset(cells)):`` the same calls see only those
    cells: values at their quadrature points, and assembly of their contributions
    alone (exact at the DOFs all of whose cells are in the subset). A residual
    written with these calls is then evaluated at the cost of those cells: how a
    hard constraint's experts linearise a residual on their own subdomains.

    Args:
        space: the FE space; its scikit-fem basis fixes the quadrature rule.

    Shapes:
        coefficients ``(..., n_dofs)``; values at quadrature points ``(..., E, Q)``;
        gradients and fluxes ``(..., d, E, Q)``: ``...`` any leading batch and
        channel dimensions, ``E`` cells, ``Q`` quadrature points per cell, ``d`` the
        dimension.
    """

    def __init__(self, space: FunctionSpace):
        super().__init__()
        if not isinstance(space, FunctionSpace):
            raise TypeError(f"`space` must be a FunctionSpace, got {type(space).__name__}")
        self.space = space
        self.cells = Cells(space)
        # the cells the calls see; a plain dict so that the subset is not a submodule
        self._state: dict[str, Cells | None] = {"active": None}

    def subset(self, cells: np.ndarray) -> Cells:
        """The quadrature maps of ``cells`` (indices), to use with :meth:`on`; a
        module of its own, which the caller keeps (and moves to its device)."""
        return Cells(self.space, cells)

    @contextlib.contextmanager
    def on(self, cells: Cells):
        """Within this context the calls below see only ``cells``."""
        previous, self._state["active"] = self._state["active"], cells
        try:
            yield self
        finally:
            self._state["active"] = previous

    @property
    def active(self) -> Cells:
        """The cells the calls see now: all of them, or those of :meth:`on`."""
        return self._state["active"] or self.cells

    def values(self, coeffs: torch.Tensor) -> torch.Tensor:
        """FE functions at the quadrature points: ``(..., n_dofs)`` -> ``(..., E, Q)``."""
        self.space.check_coefficients(coeffs)
        cells = self.active
        return cells.to_values(coeffs).reshape(*coeffs.shape[:-1], *cells.value_shape)

    def gradients(self, coeffs: torch.Tensor) -> torch.Tensor:
        """Their gradients: ``(..., n_dofs)`` -> ``(..., d, E, Q)``."""
        self.space.check_coefficients(coeffs)
        cells = self.active
        return cells.to_gradients(coeffs).reshape(*coeffs.shape[:-1], *cells.gradient_shape)

    def assemble_values(self, s: torch.Tensor) -> torch.Tensor:
        """``∫ s v`` for every basis function ``v``: ``(..., E, Q)`` -> ``(..., n_dofs)``."""
        cells = self.active
        weighted = s * cells.dx.to(s.dtype)
        return cells.to_values.transposed(weighted.reshape(*s.shape[:-2], -1))

    def assemble_gradient(self, flux: torch.Tensor) -> torch.Tensor:
        """``∫ flux · ∇v`` for every basis function v: ``(..., d, E, Q)`` -> ``(..., n_dofs)``."""
        cells = self.active
        weighted = flux * cells.dx.to(flux.dtype)
        return cells.to_gradients.transposed(weighted.reshape(*flux.shape[:-3], -1))
