"""Allen-Cahn: u_t = ε² Δu - (u³ - u), u = 0 on the boundary, u(0) a random field.

A stiff, nonlinear reaction-diffusion: from a small random initial state the
reaction drives ``u`` towards the phases ±1 over a few units of time (by t = 4 the
largest values reach 0.97 with the defaults), separated by interfaces of width
about ``ε``, which then move slowly. Implicit Euler in time,
Newton's method for each step::

    ∫ (u_{n+1} - u_n) v + Δt ε² ∫ ∇u_{n+1}·∇v + Δt ∫ (u_{n+1}³ - u_{n+1}) v = 0

uniquely solvable for Δt < 1 (the Jacobian ``(1 - Δt) M + Δt ε² K + 3 Δt M(u²)`` is
then positive definite), and started from ``u_n``. The data are trajectories: one
field ``u`` of every state at the times ``0, Δt, ..., t_final``.

>>> from fenop.fem import FunctionSpace, unit_square
>>> problem = AllenCahn(FunctionSpace(unit_square(9), dirichlet="boundary"), n_steps=4, t_final=1)
>>> problem.sample(seed=0, index=0)["u"].shape, problem.fields
((5, 81), ('u',))
"""

from __future__ import annotations

import numpy as np
import skfem
import torch
from skfem.helpers import dot, grad

from fenop.data.pdes.base import DirichletResidual, PDEFamily
from fenop.fem import FunctionSpace


class AllenCahn(PDEFamily):
    """Allen-Cahn phase separation from a random initial state, Newton per step.

    Args:
        space: FE space with Dirichlet DOFs on the boundary.
        epsilon: the interface width ``ε``; resolve it (the default is 1.6 cells of
            the default 33 x 33 mesh: use finer meshes for smaller ``ε``).
        t_final: final time.
        n_steps: implicit Euler steps (``Δt = t_final / n_steps`` below 1).
        trajectory: accepted for the command's ``--steps``; the data are always
            trajectories.
        tol: Newton stops when the step's residual at the free DOFs is below
            ``tol`` times its value at the previous state.
        max_iterations: Newton iterations per step before giving up with an error.
        grf: options of the Gaussian random field of the initial state.
    """

    name = "allen_cahn"
    inputs = ()
    trajectories = ("u",)
    previous_state = "u_prev"

    def __init__(
        self,
        space: FunctionSpace,
        *,
        epsilon: float = 0.05,
        t_final: float = 4.0,
        n_steps: int = 40,
        trajectory: bool = True,
        tol: float = 1e-10,
        max_iterations: int = 20,
        grf: dict | None = None,
    ):
        super().__init__(space, grf=grf)
        if not (epsilon > 0 and t_final > 0 and n_steps >= 1):
            raise ValueError(
                "`epsilon` and `t_final` must be positive and `n_steps` at least 1, "
                f"got {epsilon}, {t_final} and {n_steps}"
            )
        if t_final / n_steps >= 1:
            raise ValueError(
                f"the step t_final / n_steps = {t_final / n_steps:g} must be below 1, where "
                "each implicit Euler step has one solution"
            )
        if trajectory is not True:
            raise ValueError("allen_cahn makes trajectories only: `trajectory` must be true")
        self.epsilon, self.t_final, self.n_steps = float(epsilon), float(t_final), int(n_steps)
        self.tol, self.max_iterations = float(tol), int(max_iterations)
        self.dt = self.t_final / self.n_steps
        self.times = self.dt * np.arange(self.n_steps + 1)

    def parameters(self) -> dict:
        return {
            "epsilon": self.epsilon,
            "t_final": self.t_final,
            "n_steps": self.n_steps,
            "tol": self.tol,
            **super().parameters(),
        }

    def sample_inputs(self, rng: np.random.Generator) -> dict[str, np.ndarray]:
        return {"u0": self.random_state(rng)}

    def solve(self, *, u0: np.ndarray) -> dict[str, np.ndarray]:
        states = np.zeros((self.n_steps + 1, len(u0)))
        states[0] = u0
        for n in range(self.n_steps):
            states[n + 1] = self.step(states[n])
        return {"u": states}

    def step(self, previous: np.ndarray) -> np.ndarray:
        """One implicit Euler step from ``previous`` ``(n_dofs,)``, by Newton."""
        basis, free = self.space.basis, self.interior
        dt, eps2 = self.dt, self.epsilon**2
        p = basis.interpolate(previous)
        u, reference = previous.copy(), None
        for _ in range(self.max_iterations + 1):
            u_h = basis.interpolate(u)
            r = _weak_residual.assemble(basis, u=u_h, p=p, dt=dt, eps2=eps2)
            norm = np.linalg.norm(r[free])
            reference = norm if reference is None else reference
            if norm <= self.tol * reference or norm == 0:
                return u
            jacobian = _jacobian.assemble(basis, u=u_h, dt=dt, eps2=eps2)
            u = u - self.solve_linear(jacobian, r)
        raise RuntimeError(
            f"Newton did not reach a relative residual of {self.tol} in "
            f"{self.max_iterations} iterations (last {norm / reference:.2e})"
        )

    def residual(self) -> AllenCahnResidual:
        return AllenCahnResidual(self.space, epsilon=self.epsilon, dt=self.dt)


@skfem.LinearForm
def _weak_residual(v, w):
    u, dt = w["u"], w["dt"]
    return (u - w["p"]) * v + dt * w["eps2"] * dot(grad(u), grad(v)) + dt * (u**3 - u) * v


@skfem.BilinearForm
def _jacobian(du, v, w):
    u, dt = w["u"], w["dt"]
    return (1 + dt * (3 * u**2 - 1)) * du * v + dt * w["eps2"] * dot(grad(du), grad(v))


class AllenCahnResidual(DirichletResidual):
    """One implicit Euler step: ``R(u; u_prev) = ∫ (u - u_prev) v + Δt ε² ∫ ∇u·∇v +
    Δt ∫ (u³ - u) v`` at free DOFs, ``u`` at Dirichlet DOFs.

    Shapes: ``u``, ``u_prev``: ``(..., n_dofs)`` -> ``(..., n_dofs)``.
    """

    time_step = True

    def __init__(self, space: FunctionSpace, *, epsilon: float, dt: float):
        super().__init__(space)
        self.epsilon, self.dt = epsilon, dt
        # J = M (1 + Δt (3u² - 1)) + Δt ε² K: symmetric, and positive definite for
        # Δt < 1 whatever u (the reaction weight is at least 1 - Δt), so that the
        # layers' Galerkin systems take Cholesky
        self.symmetric = dt < 1

    def weak_form(self, u: torch.Tensor, *, u_prev: torch.Tensor) -> torch.Tensor:
        return self._weak(u, self.forms.values(u), u_prev)

    def _weak(self, u: torch.Tensor, values: torch.Tensor, u_prev: torch.Tensor):
        """The weak form from ``u`` and its values ``(B, E, Q)`` at the quadrature points."""
        forms = self.forms
        local = values - forms.values(u_prev) + self.dt * (values**3 - values)
        diffusion = forms.assemble_gradient(forms.gradients(u))
        return forms.assemble_values(local) + self.dt * self.epsilon**2 * diffusion

    def linearised(self, pattern, u: torch.Tensor, *, u_prev: torch.Tensor):
        """``R(u)`` and ``J(u)`` on the pattern: ``J_ij = ∫ (1 + Δt (3u² - 1)) φ_j φ_i +
        Δt ε² ∫ ∇φ_j·∇φ_i``, cell by cell from its weights at the quadrature points
        (:class:`~fenop.fem.cell_jacobian.CellJacobian`); on the cells the forms see
        (``forms.on``)."""
        forms = self.forms
        cells = self.cell_jacobian(pattern, u.device)
        values = forms.values(u)  # (B, E, Q)
        r = torch.where(self.dirichlet, u, self._weak(u, values, u_prev))
        reaction = 1 + self.dt * (3 * values**2 - 1)
        diffusion = torch.full_like(reaction, self.dt * self.epsilon**2)
        index = forms.active.index.to(u.device)
        weights = torch.stack([reaction, diffusion], dim=1)
        entries = cells.weighted(weights, ("mass", "stiffness"), index)
        return r, self._with_dirichlet_rows(pattern, entries)
