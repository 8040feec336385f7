"""Heat equation: u_t = div(k ∇u), u = 0 on the boundary, u(0) = u0 a random field.

Implicit Euler in time, ``(M + Δt k K) u_{n+1} = M u_n`` with ``Δt = t_final /
n_steps`` (M, K the P1/P2 mass and stiffness matrices; first order in time,
unconditionally stable, and the scheme the per-step residual is written for).

Two kinds of data. By default the map from the initial state to the state at
``t_final``: fields ``u0`` and ``u``, and the state one step earlier (``u_prev``),
with which the last step's residual can be checked (the discrete evolution as a
whole has no residual in terms of ``u0`` and ``u`` alone). With ``trajectory=True``,
one field ``u`` of every state ``u_0, ..., u_{n_steps}`` at the times
``0, Δt, ..., t_final`` (:attr:`times`), ``(n_steps + 1, n_dofs)`` per sample, for
models that advance a state step by step.

>>> from fenop.fem import FunctionSpace, unit_square
>>> space = FunctionSpace(unit_square(9), dirichlet="boundary")
>>> heat = Heat(space)
>>> sorted(heat.sample(seed=0, index=0)), heat.fields
(['u', 'u0', 'u_prev'], ('u0', 'u', 'u_prev'))
>>> steps = Heat(space, t_final=0.05, n_steps=5, trajectory=True)
>>> steps.sample(seed=0, index=0)["u"].shape, steps.times.tolist()
((6, 81), [0.0, 0.01, 0.02, 0.03, 0.04, 0.05])
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
        trajectory: keep every state (one ``(n_steps + 1, n_dofs)`` field ``u``)
            rather than the initial and final ones.
        grf: options of the Gaussian random field of the initial state.
    """

    name = "heat"
    inputs = ("u0",)
    auxiliary = ("u_prev",)
    previous_state = "u_prev"

    def __init__(
        self,
        space: FunctionSpace,
        *,
        diffusivity: float = 0.1,
        t_final: float = 0.1,
        n_steps: int = 10,
        trajectory: bool = False,
        grf: dict | None = None,
    ):
        super().__init__(space, grf=grf)
        if not isinstance(trajectory, bool):
            raise ValueError(f"`trajectory` must be true or false, got {trajectory!r}")
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
        self.trajectory = trajectory
        if trajectory:
            self.inputs, self.auxiliary, self.trajectories = (), (), ("u",)
            self.times = self.dt * np.arange(self.n_steps + 1)
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
            # only where set, so that stores of the final-time map made before the
            # option existed still resume
            **({"trajectory": True} if self.trajectory else {}),
            **super().parameters(),
        }

    def sample_inputs(self, rng: np.random.Generator) -> dict[str, np.ndarray]:
        u0 = self.random_field(rng)
        u0[self.space.boundary_dofs] = 0.0  # consistent with the boundary condition
        return {"u0": u0}

    def solve(self, *, u0: np.ndarray) -> dict[str, np.ndarray]:
        states = self.states(u0)
        if self.trajectory:
            return {"u": states}
        return {"u": states[-1], "u_prev": states[-2]}

    def states(self, u0: np.ndarray) -> np.ndarray:
        """Every state from ``u0`` ``(n_dofs,)``: ``(n_steps + 1, n_dofs)``."""
        free = self.interior
        states = np.zeros((self.n_steps + 1, len(u0)))
        states[0] = u0
        for n in range(self.n_steps):
            states[n + 1, free] = self._step.solve((self.space.mass_matrix @ states[n])[free])
        return states

    def residual(self) -> HeatResidual:
        return HeatResidual(self.space, diffusivity=self.diffusivity, dt=self.dt)


class HeatResidual(DirichletResidual):
    """One implicit Euler step: ``R(u; u_prev) = ∫ (u - u_prev) v + Δt ∫ k ∇u·∇v``.

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
