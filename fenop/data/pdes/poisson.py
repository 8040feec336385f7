"""Poisson: -Δu = f in the domain, u = 0 on its boundary, f a Gaussian random field.

>>> from fenop.fem import FunctionSpace, l_shape
>>> poisson = Poisson(FunctionSpace(l_shape(5), dirichlet="boundary"))
>>> sorted(poisson.sample(seed=1, index=2))
['f', 'u']
"""

from __future__ import annotations

import numpy as np
import torch

from fenop.data.pdes.base import DirichletResidual, PDEFamily
from fenop.fem import FunctionSpace


class Poisson(PDEFamily):
    """Poisson's equation with a random source.

    Args:
        space: FE space with Dirichlet DOFs on the boundary.
        scale: the source is ``scale`` times a GRF draw.
        grf: options of the Gaussian random field.
    """

    name = "poisson"
    inputs = ("f",)

    def __init__(self, space: FunctionSpace, *, scale: float = 1.0, grf: dict | None = None):
        super().__init__(space, grf=grf)
        self.scale = float(scale)

    def parameters(self) -> dict:
        return {"scale": self.scale, **super().parameters()}

    def sample_inputs(self, rng: np.random.Generator) -> dict[str, np.ndarray]:
        return {"f": self.scale * self.random_field(rng)}

    def solve(self, *, f: np.ndarray) -> dict[str, np.ndarray]:
        space = self.space
        return {"u": self.solve_linear(space.stiffness_matrix, space.mass_matrix @ f)}

    def residual(self) -> PoissonResidual:
        return PoissonResidual(self.space)


class PoissonResidual(DirichletResidual):
    """``R(u; f) = ∫ ∇u·∇v - ∫ f v`` at free DOFs, ``u`` at Dirichlet DOFs.

    Shapes: ``u``, ``f``: ``(..., n_dofs)`` -> ``(..., n_dofs)``.
    """

    affine = True
    symmetric = True

    def weak_jacobian(self, pattern, *, f: torch.Tensor) -> torch.Tensor:
        """The stiffness matrix on the pattern, the same for every sample."""
        entries = pattern.entries(self.forms.space.stiffness_matrix).to(f)
        return entries.expand(f.shape[0], -1)

    def weak_form(self, u: torch.Tensor, *, f: torch.Tensor) -> torch.Tensor:
        forms = self.forms
        return forms.assemble_gradient(forms.gradients(u)) - forms.assemble_values(forms.values(f))
