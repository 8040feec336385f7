"""Darcy flow: -div(a ∇u) = f in the domain, u = 0 on its boundary.

The permeability is two-valued, ``a = a_high`` where a Gaussian random field is
non-negative and ``a_low`` elsewhere (the recipe behind the FNO, LSM and MgNO Darcy
benchmarks: GRF with α = 2, τ = 3; a = 12 / 3; f = 1). ``a`` is stored, and solved
with, as its FE interpolant (DOF values), so a stored sample defines its discrete
problem completely.

>>> from fenop.fem import FunctionSpace, unit_square
>>> darcy = Darcy(FunctionSpace(unit_square(9), dirichlet="boundary"))
>>> sample = darcy.sample(seed=0, index=0)
>>> sorted(sample), sample["u"].shape
(['a', 'u'], (81,))
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import skfem
import torch

from fenop.data.pdes.base import DirichletResidual, PDEFamily
from fenop.fem import FunctionSpace
from fenop.fem.weighted_stiffness import WeightedStiffness


class Darcy(PDEFamily):
    """Darcy flow with a thresholded-GRF permeability.

    Args:
        space: FE space with Dirichlet DOFs on the boundary.
        a_high, a_low: permeability where the GRF is >= 0 and < 0.
        source: the right-hand side f: a constant, or a callable of the coordinates
            ``x`` ``(dim, ...)`` (integrated exactly as the quadrature allows).
        grf: options of the underlying Gaussian random field.
    """

    name = "darcy"
    inputs = ("a",)

    def __init__(
        self,
        space: FunctionSpace,
        *,
        a_high: float = 12.0,
        a_low: float = 3.0,
        source: float | Callable[[np.ndarray], np.ndarray] = 1.0,
        grf: dict | None = None,
    ):
        super().__init__(space, grf=grf)
        if not (a_high > 0 and a_low > 0):
            raise ValueError(f"permeabilities must be positive, got {a_high} and {a_low}")
        self.a_high, self.a_low = float(a_high), float(a_low)
        self.source = source if callable(source) else float(source)
        f = source if callable(source) else (lambda x: self.source + 0.0 * x[0])
        self._load = skfem.LinearForm(lambda v, w: f(w.x) * v).assemble(space.basis)
        self._stiffness = WeightedStiffness(space)

    def parameters(self) -> dict:
        # A callable source cannot be recorded; data sets made by `generate` use numbers.
        source = "callable" if callable(self.source) else self.source
        return {
            "a_high": self.a_high,
            "a_low": self.a_low,
            "source": source,
            **super().parameters(),
        }

    def sample_inputs(self, rng: np.random.Generator) -> dict[str, np.ndarray]:
        field = self.random_field(rng)
        return {"a": np.where(field >= 0.0, self.a_high, self.a_low)}

    def solve(self, *, a: np.ndarray) -> dict[str, np.ndarray]:
        return {"u": self.solve_linear(self._stiffness(a), self._load)}

    def residual(self) -> DarcyResidual:
        return DarcyResidual(self.space, load=torch.from_numpy(self._load))


class DarcyResidual(DirichletResidual):
    """``R(u; a) = ∫ a ∇u·∇v - ∫ f v`` at free DOFs, ``u`` at Dirichlet DOFs.

    Shapes: ``u``, ``a``: ``(..., n_dofs)`` -> ``(..., n_dofs)``.

    Args:
        space: the FE space.
        load: the assembled right-hand side ``∫ f v`` ``(n_dofs,)``.
    """

    affine = True
    symmetric = True

    def __init__(self, space: FunctionSpace, *, load: torch.Tensor):
        super().__init__(space)
        self.register_buffer("load", load.to(torch.float64), persistent=False)
        self._cells = None  # the cell tensors of K(a), made on the first weak_jacobian

    def weak_jacobian(self, pattern, *, a: torch.Tensor) -> torch.Tensor:
        """``K(a)`` on the pattern, assembled cell by cell: linear in ``a``, so one
        contraction with ``∫_e φ_m ∇φ_i · ∇φ_j`` (WeightedStiffness's cell tensors)."""
        if self._cells is None or self._cells[0].device != a.device:
            stiffness = WeightedStiffness(self.forms.space)
            tensor = torch.from_numpy(stiffness.cell_tensors).to(a.device)  # (m, i, j, E)
            slots = torch.from_numpy(pattern.local_slots()).to(a.device)  # (i, j, E)
            dofs = torch.from_numpy(stiffness.element_dofs.astype(np.int64)).to(a.device)
            self._cells = (tensor, slots, dofs)
        tensor, slots, dofs = self._cells
        local = a[..., dofs]  # (B, m, E)
        cell = sum(local[:, m, None, None, :] * tensor[m].to(a.dtype) for m in range(len(tensor)))
        out = a.new_zeros(a.shape[0], pattern.nnz)
        return out.index_add_(-1, slots.reshape(-1), cell.reshape(a.shape[0], -1))

    def weak_form(self, u: torch.Tensor, *, a: torch.Tensor) -> torch.Tensor:
        flux = self.forms.values(a).unsqueeze(-3) * self.forms.gradients(u)
        return self.forms.assemble_gradient(flux) - self.load.to(u.dtype)
