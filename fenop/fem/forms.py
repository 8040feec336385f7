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

import numpy as np
import torch
from torch import nn

from fenop.fem.space import FunctionSpace


def quadrature_data(space: FunctionSpace) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Local basis values ``(N, E, Q)``, their gradients ``(N, d, E, Q)`` and the
    quadrature weights ``(E, Q)`` of every cell, from the space's scikit-fem basis."""
    basis = space.basis
    # basis.basis[i][0] is the i-th local basis function on every cell, as a
    # scikit-fem DiscreteField: value (E, Q), grad (d, E, Q).
    phi = np.stack([np.asarray(b[0]) for b in basis.basis])
    dphi = np.stack([np.asarray(b[0].grad) for b in basis.basis])
    return phi, dphi, np.asarray(basis.dx)


class FEForms(nn.Module):
    """Quadrature data of a space, as torch buffers, and batched assembly with it.

    Args:
        space: the FE space; its scikit-fem basis fixes the quadrature rule.

    Shapes (``...`` are any leading batch/channel dims; E cells, Q quadrature points
    per cell, d the dimension):
        coefficients ``(..., n_dofs)``; values at quadrature points ``(..., E, Q)``;
        gradients and fluxes ``(..., d, E, Q)``.
    """

    def __init__(self, space: FunctionSpace):
        super().__init__()
        if not isinstance(space, FunctionSpace):
            raise TypeError(f"`space` must be a FunctionSpace, got {type(space).__name__}")
        self.space = space
        phi, dphi, dx = quadrature_data(space)
        self.register_buffer("phi", torch.from_numpy(phi), persistent=False)
        self.register_buffer("dphi", torch.from_numpy(dphi), persistent=False)
        self.register_buffer("dx", torch.from_numpy(dx), persistent=False)
        dofs = torch.from_numpy(space.basis.element_dofs.astype(np.int64))  # (N, E)
        self.register_buffer("element_dofs", dofs, persistent=False)

    def _local(self, coeffs: torch.Tensor) -> torch.Tensor:
        """``(..., n_dofs)`` -> cell-local coefficients ``(..., N, E)``."""
        self.space.check_coefficients(coeffs)
        return coeffs[..., self.element_dofs]

    def values(self, coeffs: torch.Tensor) -> torch.Tensor:
        """FE functions at the quadrature points: ``(..., n_dofs)`` -> ``(..., E, Q)``."""
        return torch.einsum("...ne,neq->...eq", self._local(coeffs), self.phi.to(coeffs.dtype))

    def gradients(self, coeffs: torch.Tensor) -> torch.Tensor:
        """Their gradients: ``(..., n_dofs)`` -> ``(..., d, E, Q)``."""
        return torch.einsum("...ne,ndeq->...deq", self._local(coeffs), self.dphi.to(coeffs.dtype))

    def _scatter(self, local: torch.Tensor) -> torch.Tensor:
        """Sum cell contributions ``(..., N, E)`` into global DOFs ``(..., n_dofs)``."""
        lead = local.shape[:-2]
        out = local.new_zeros(*lead, self.space.n_dofs)
        index = self.element_dofs.reshape(-1)
        return out.index_add_(-1, index, local.reshape(*lead, -1))

    def assemble_values(self, s: torch.Tensor) -> torch.Tensor:
        """``∫ s v`` for every basis function ``v``: ``(..., E, Q)`` -> ``(..., n_dofs)``."""
        dx = self.dx.to(s.dtype)
        return self._scatter(torch.einsum("...eq,neq,eq->...ne", s, self.phi.to(s.dtype), dx))

    def assemble_gradient(self, flux: torch.Tensor) -> torch.Tensor:
        """``∫ flux · ∇v`` for every basis function v: ``(..., d, E, Q)`` -> ``(..., n_dofs)``."""
        dx = self.dx.to(flux.dtype)
        local = torch.einsum("...deq,ndeq,eq->...ne", flux, self.dphi.to(flux.dtype), dx)
        return self._scatter(local)
