"""Heat equation: u_t = div(k ∇u), u = 0 on the boundary, u(0) = u0 a random field.

Implicit Euler in time, ``(M + Δt K) u_{n+1} = M u_n`` with ``Δt = t_final /
n_steps``; the output is the state at ``t_final``. The data also keep the state one
step earlier (``u_prev``), with which the last step's residual can be checked:
the discrete evolution as a whole has no residual in terms of ``u0`` and ``u``
alone.

>>> from fenop.fem import FunctionSpace, unit_square
>>> heat = Heat(FunctionSpace(unit_square(9), dirichlet="boundary"))
>>> sorted(heat.sample(seed=0, index=0)), heat.fields
(['u', 'u0', 'u_prev'], ('u0', 'u', 'u_prev'))
"""

from __future__ import annotations

import numpy as np
import scipy.sparse
import scipy.sparse.linalg
import torch

from fenop.data.pdes.base import DirichletResidual, PDEFamily
from fenop.fem import FunctionSpace


class Heat(PDEFamily):
    """Linear heat flow from a random initial state.

    Args:
        space: FE space with Dirichlet DOFs on the boundary.
        diffusivity: the constant k.
        t_final: final time.
        n_steps: implicit Euler steps.
        grf: options of the Gaussian random field of the initial state.
    """

    name = "heat"
    inputs = ("u0",)
    auxiliary = ("u_prev",)

    def __init__(
        self,
        space: FunctionSpace,
        *,
        diffusivity: float = 0.1,
        t_final: float = 0.1,
        n_steps: int = 10,
        grf: dict | None = None,
    ):
        super().__init__(space, grf=grf)
        if diffusivity <= 0 or t_final <= 0 or n_steps < 1:
            raise ValueError(
                "`diffusivity` and `t_final` must be positive and `n_steps` at least 1, "
                f"got {diffusivity}, {t_final} and {n_steps}"
            )
        self.diffusivity, self.t_final, self.n_steps = (
            float(diffusivity),
            float(t_final),
            int(n_steps),
        )
        self.dt = self.t_final / self.n_steps
        free = self.interior
        step = self.dt * self.diffusivity * space.stiffness_matrix + space.mass_matrix
        step = scipy.sparse.csc_array(step)
        # One factorisation serves every step of every sample.
        self._step = scipy.sparse.linalg.splu(step[free][:, free], permc_spec="MMD_AT_PLUS_A")

    def parameters(self) -> dict:
        return {
            "diffusivity": self.diffusivity,
            "t_final": self.t_final,
            "n_steps": self.n_steps,
            **super().parameters(),
        }

    def sample_inputs(self, rng: np.random.Generator) -> dict[str, np.ndarray]:
        u0 = self.random_field(rng)
        u0[self.space.boundary_dofs] = 0.0  # consistent with the boundary condition
        return {"u0": u0}

    def solve(self, *, u0: np.ndarray) -> dict[str, np.ndarray]:
        free = self.interior
        u, previous = u0.copy(), u0.copy()
        for _ in range(self.n_steps):
            previous = u.copy()
            u = np.zeros_like(u0)
            u[free] = self._step.solve((self.space.mass_matrix @ previous)[free])
        return {"u": u, "u_prev": previous}

    def residual(self) -> HeatResidual:
        return HeatResidual(self.space, diffusivity=self.diffusivity, dt=self.dt)


class HeatResidual(DirichletResidual):
    """Last implicit Euler step: ``R(u; u_prev) = ∫ (u - u_prev) v + Δt ∫ k ∇u·∇v``.

    Shapes: ``u``, ``u_prev``: ``(..., n_dofs)`` -> ``(..., n_dofs)``.
    """

    affine = True
    symmetric = True

    def __init__(self, space: FunctionSpace, *, diffusivity: float, dt: float):
        super().__init__(space)
        self.diffusivity, self.dt = diffusivity, dt

    def weak_jacobian(self, pattern, *, u_prev: torch.Tensor) -> torch.Tensor:
        """``M + Δt k K`` on the pattern, the same for every sample."""
        space = self.forms.space
        matrix = space.mass_matrix + self.dt * self.diffusivity * space.stiffness_matrix
        return pattern.entries(matrix).to(u_prev).expand(u_prev.shape[0], -1)

    def weak_form(self, u: torch.Tensor, *, u_prev: torch.Tensor) -> torch.Tensor:
        forms = self.forms
        change = forms.assemble_values(forms.values(u - u_prev))
        return change + self.dt * self.diffusivity * forms.assemble_gradient(forms.gradients(u))
