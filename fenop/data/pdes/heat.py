"""Heat equation: u_t = div(k ∇u), u = 0 on the boundary (or no flux through it),
u(0) = u0 a random field.

Implicit Euler in time, ``(M + Δt k K) u_{n+1} = M u_n`` with ``Δt = t_final /
n_steps`` (M, K the P1/P2 mass and stiffness matrices; first order in time, and
L-stable: the fine scales of a rough initial state are damped at once). With
``scheme="crank_nicolson"``, ``(M + Δt/2 k K) u_{n+1} = (M - Δt/2 k K) u_n``:
second order, but it damps the finest scales only slowly (A- and not L-stable).
The residual of one step (:class:`HeatResidual`, which a stepper's hard
constraint uses) is written for the same scheme: a constraint per step is exact
only for the scheme of its data (BENCHMARKS.md, "The constraint per time step").

With ``boundary="no_flux"`` (``∇u·n = 0``, on a space without Dirichlet DOFs)
heat is conserved: every step keeps ``∫ u`` exactly, the sum of the step's
residual over all DOFs (its test against the constant field) is the discrete
balance ``∫ u_{n+1} - ∫ u_n``, and :class:`HeatResidual` says so (``conserved``),
so that a hard constraint imposes it exactly.

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
        space: FE space with Dirichlet DOFs on the boundary (with ``boundary =
            "no_flux"``, without Dirichlet DOFs).
        diffusivity: the constant k.
        t_final: final time.
        n_steps: implicit Euler steps.
        trajectory: keep every state (one ``(n_steps + 1, n_dofs)`` field ``u``)
            rather than the initial and final ones.
        scheme: ``"implicit_euler"`` or ``"crank_nicolson"``.
        boundary: ``"dirichlet"`` (``u = 0``) or ``"no_flux"`` (``∇u·n = 0``: the
            initial state is not set to zero on the boundary, and heat is conserved).
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
        scheme: str = "implicit_euler",
        boundary: str = "dirichlet",
        grf: dict | None = None,
    ):
        if boundary not in BOUNDARIES:
            raise ValueError(f"`boundary` must be one of {BOUNDARIES}, got {boundary!r}")
        super().__init__(space, grf=grf, dirichlet=boundary == "dirichlet")
        self.boundary = boundary
        if not isinstance(trajectory, bool):
            raise ValueError(f"`trajectory` must be true or false, got {trajectory!r}")
        if scheme not in THETA:
            raise ValueError(f"`scheme` must be one of {sorted(THETA)}, got {scheme!r}")
        self.scheme = scheme
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
        free, theta = self.interior, THETA[scheme]
        stiffness = self.dt * self.diffusivity * space.stiffness_matrix
        step = scipy.sparse.csc_array(space.mass_matrix + theta * stiffness)
        # One factorisation serves every step of every sample.
        self._step = scipy.sparse.linalg.splu(step[free][:, free], permc_spec="MMD_AT_PLUS_A")
        self._load = scipy.sparse.csr_array(space.mass_matrix - (1 - theta) * stiffness)

    def parameters(self) -> dict:
        return {
            "diffusivity": self.diffusivity,
            "t_final": self.t_final,
            "n_steps": self.n_steps,
            # only where set, so that stores made before the options existed still
            # resume
            **({"trajectory": True} if self.trajectory else {}),
            **({"scheme": self.scheme} if self.scheme != "implicit_euler" else {}),
            **({"boundary": self.boundary} if self.boundary != "dirichlet" else {}),
            **super().parameters(),
        }

    @classmethod
    def dirichlet_for(cls, options: dict) -> str | None:
        return None if options.get("boundary") == "no_flux" else "boundary"

    def sample_inputs(self, rng: np.random.Generator) -> dict[str, np.ndarray]:
        return {"u0": self.random_state(rng)}

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
            states[n + 1, free] = self._step.solve((self._load @ states[n])[free])
        return states

    def residual(self) -> HeatResidual:
        return HeatResidual(
            self.space, diffusivity=self.diffusivity, dt=self.dt, scheme=self.scheme
        )


# The weight of the new state in the diffusion term of each scheme (the θ-method).
THETA = {"implicit_euler": 1.0, "crank_nicolson": 0.5}
BOUNDARIES = ("dirichlet", "no_flux")


class HeatResidual(DirichletResidual):
    """One step of the θ-method, ``R(u; u_prev) = ∫ (u - u_prev) v + Δt ∫ k ∇(θ u +
    (1 - θ) u_prev)·∇v``: θ = 1 for implicit Euler, 1/2 for Crank-Nicolson.

    On a space without Dirichlet DOFs (no-flux boundaries) the step conserves
    ``∫ u``: the sum of ``R`` over the DOFs is ``∫ u - ∫ u_prev`` (``∇1 = 0``), and
    ``conserved`` is true.

    Shapes: ``u``, ``u_prev``: ``(..., n_dofs)`` -> ``(..., n_dofs)``.
    """

    affine = True
    symmetric = True
    time_step = True

    def __init__(
        self,
        space: FunctionSpace,
        *,
        diffusivity: float,
        dt: float,
        scheme: str = "implicit_euler",
    ):
        super().__init__(space)
        self.diffusivity, self.dt, self.theta = diffusivity, dt, THETA[scheme]
        self.conserved = len(space.boundary_dofs) == 0

    def weak_jacobian(self, pattern, *, u_prev: torch.Tensor) -> torch.Tensor:
        """``M + θ Δt k K`` on the pattern, the same for every sample."""
        space = self.forms.space
        matrix = (
            space.mass_matrix + self.theta * self.dt * self.diffusivity * space.stiffness_matrix
        )
        return pattern.entries(matrix).to(u_prev).expand(u_prev.shape[0], -1)

    def weak_form(self, u: torch.Tensor, *, u_prev: torch.Tensor) -> torch.Tensor:
        forms = self.forms
        change = forms.assemble_values(forms.values(u - u_prev))
        middle = u if self.theta == 1 else self.theta * u + (1 - self.theta) * u_prev
        return change + self.dt * self.diffusivity * forms.assemble_gradient(
            forms.gradients(middle)
        )
