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

import numpy as np
import skfem
import torch
from skfem.helpers import dot, grad

from fenop.data.pdes.base import DirichletResidual, PDEFamily
from fenop.fem import FunctionSpace


@skfem.BilinearForm
def _diffusion(u, v, w):
    return w["a"] * dot(grad(u), grad(v))


class Darcy(PDEFamily):
    """Darcy flow with a thresholded-GRF permeability.

    Args:
        space: FE space with Dirichlet DOFs on the boundary.
        a_high, a_low: permeability where the GRF is >= 0 and < 0.
        source: the constant right-hand side f.
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
        source: float = 1.0,
        grf: dict | None = None,
    ):
        super().__init__(space, grf=grf)
        if not (a_high > 0 and a_low > 0):
            raise ValueError(f"permeabilities must be positive, got {a_high} and {a_low}")
        self.a_high, self.a_low, self.source = float(a_high), float(a_low), float(source)
        self._load = source * skfem.LinearForm(lambda v, _: v).assemble(space.basis)

    def parameters(self) -> dict:
        return {
            "a_high": self.a_high,
            "a_low": self.a_low,
            "source": self.source,
            **super().parameters(),
        }

    def sample_inputs(self, rng: np.random.Generator) -> dict[str, np.ndarray]:
        field = self.random_field(rng)
        return {"a": np.where(field >= 0.0, self.a_high, self.a_low)}

    def solve(self, *, a: np.ndarray) -> dict[str, np.ndarray]:
        basis = self.space.basis
        matrix = _diffusion.assemble(basis, a=basis.interpolate(a))
        return {"u": self.solve_linear(matrix, self._load)}

    def residual(self) -> DarcyResidual:
        return DarcyResidual(self.space, source=self.source)


class DarcyResidual(DirichletResidual):
    """``R(u; a) = ∫ a ∇u·∇v - ∫ f v`` at free DOFs, ``u`` at Dirichlet DOFs.

    Shapes: ``u``, ``a``: ``(..., n_dofs)`` -> ``(..., n_dofs)``.
    """

    def __init__(self, space: FunctionSpace, *, source: float = 1.0):
        super().__init__(space)
        ones = torch.ones(self.forms.dx.shape, dtype=torch.float64)
        self.register_buffer("load", source * self.forms.assemble_values(ones), persistent=False)

    def weak_form(self, u: torch.Tensor, *, a: torch.Tensor) -> torch.Tensor:
        flux = self.forms.values(a).unsqueeze(-3) * self.forms.gradients(u)
        return self.forms.assemble_gradient(flux) - self.load.to(u.dtype)
