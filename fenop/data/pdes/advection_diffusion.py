"""Advection-diffusion of a scalar: u_t + b·∇u = κ Δu, u = 0 on the boundary.

A random initial state is carried by a given divergence-free flow ``b`` (a rigid
rotation about the centre of the mesh's bounding box, or a shear flow along x)
and slowly diffused: the advection-dominated transport neural operators are known
to find hard (the global Péclet number ``|b| L / κ`` is 50 with the defaults).
Implicit Euler in time, the standard Galerkin method in space::

    ∫ (u_{n+1} - u_n) v + Δt ∫ (b·∇u_{n+1}) v + Δt κ ∫ ∇u_{n+1}·∇v = 0

with ``b`` interpolated in the FE space (the solver and the residual alike). Without
stabilisation the cell Péclet number ``|b| h / 2κ`` should stay near one or
below, or the solution wiggles: with the defaults it is 1.6 at the 33 x 33 mesh's
fastest points. The data are trajectories of ``u``.

>>> from fenop.fem import FunctionSpace, unit_square
>>> problem = AdvectionDiffusion(FunctionSpace(unit_square(9), dirichlet="boundary"))
>>> problem.sample(seed=0, index=0)["u"].shape, problem.flow
((21, 81), 'rotation')
"""

from __future__ import annotations

import numpy as np
import scipy.sparse
import scipy.sparse.linalg
import skfem
import torch
from skfem.helpers import grad

from fenop.data.pdes.base import DirichletResidual, PDEFamily
from fenop.fem import FunctionSpace
from fenop.fem.mesh import bounding_box

FLOWS = ("rotation", "shear")


def velocity(points: np.ndarray, lower, upper, *, flow: str, speed: float) -> np.ndarray:
    """The flow at ``points`` ``(n, 2)``: ``(2, n)``, divergence-free.

    ``rotation``: a rigid rotation about the box's centre, counter-clockwise, of
    ``speed`` at the distance of the box's half-width; ``shear``: ``(speed (2 η - 1),
    0)`` with ``η`` the height in the box from 0 to 1, so the flow runs left at the
    bottom and right at the top.
    """
    centre, half = (np.asarray(lower) + upper) / 2, (np.asarray(upper) - lower) / 2
    x, y = points[:, 0] - centre[0], points[:, 1] - centre[1]
    if flow == "rotation":
        return speed * np.stack([-y, x]) / half[0]
    return np.stack([speed * y / half[1], np.zeros_like(x)])


class AdvectionDiffusion(PDEFamily):
    """A scalar transported by a given flow and diffused, from a random state.

    Args:
        space: FE space with Dirichlet DOFs on the boundary (2-D).
        kappa: the diffusivity ``κ``.
        flow: ``"rotation"`` or ``"shear"`` (:func:`velocity`).
        speed: the flow's speed scale.
        t_final: final time.
        n_steps: implicit Euler steps.
        trajectory: accepted for the command's ``--steps``; the data are always
            trajectories.
        grf: options of the Gaussian random field of the initial state.
    """

    name = "advection_diffusion"
    inputs = ()
    trajectories = ("u",)
    previous_state = "u_prev"

    def __init__(
        self,
        space: FunctionSpace,
        *,
        kappa: float = 0.01,
        flow: str = "rotation",
        speed: float = 1.0,
        t_final: float = 1.0,
        n_steps: int = 20,
        trajectory: bool = True,
        grf: dict | None = None,
    ):
        super().__init__(space, grf=grf)
        if space.dim != 2:
            raise ValueError(f"the flows are two-dimensional; got a {space.dim}-D mesh")
        if flow not in FLOWS:
            raise ValueError(f"`flow` must be one of {FLOWS}, got {flow!r}")
        if not (kappa > 0 and speed >= 0 and t_final > 0 and n_steps >= 1):
            raise ValueError(
                "`kappa` and `t_final` must be positive, `speed` non-negative and `n_steps` "
                f"at least 1, got {kappa}, {speed}, {t_final} and {n_steps}"
            )
        if trajectory is not True:
            raise ValueError(
                "advection_diffusion makes trajectories only: `trajectory` must be true"
            )
        self.kappa, self.flow, self.speed = float(kappa), flow, float(speed)
        self.t_final, self.n_steps = float(t_final), int(n_steps)
        self.dt = self.t_final / self.n_steps
        self.times = self.dt * np.arange(self.n_steps + 1)
        lower, upper = bounding_box(space.mesh)
        self.velocity = velocity(space.dof_points, lower, upper, flow=flow, speed=self.speed)
        basis = space.basis
        b = [basis.interpolate(c) for c in self.velocity]
        advection = _advection.assemble(basis, bx=b[0], by=b[1])
        system = space.mass_matrix + self.dt * (advection + self.kappa * space.stiffness_matrix)
        free = self.interior
        # One factorisation (of a non-symmetric matrix) serves every step of every sample.
        self._step = scipy.sparse.linalg.splu(scipy.sparse.csc_array(system)[free][:, free])

    def parameters(self) -> dict:
        return {
            "kappa": self.kappa,
            "flow": self.flow,
            "speed": self.speed,
            "t_final": self.t_final,
            "n_steps": self.n_steps,
            **super().parameters(),
        }

    def sample_inputs(self, rng: np.random.Generator) -> dict[str, np.ndarray]:
        return {"u0": self.random_state(rng)}

    def solve(self, *, u0: np.ndarray) -> dict[str, np.ndarray]:
        free = self.interior
        states = np.zeros((self.n_steps + 1, len(u0)))
        states[0] = u0
        for n in range(self.n_steps):
            states[n + 1, free] = self._step.solve((self.space.mass_matrix @ states[n])[free])
        return {"u": states}

    def residual(self) -> AdvectionDiffusionResidual:
        return AdvectionDiffusionResidual(
            self.space, velocity=self.velocity, kappa=self.kappa, dt=self.dt
        )


@skfem.BilinearForm
def _advection(u, v, w):
    return (w["bx"] * grad(u)[0] + w["by"] * grad(u)[1]) * v


class AdvectionDiffusionResidual(DirichletResidual):
    """One implicit Euler step: ``R(u; u_prev) = ∫ (u - u_prev) v + Δt ∫ (b·∇u) v +
    Δt κ ∫ ∇u·∇v`` at free DOFs, ``u`` at Dirichlet DOFs; ``b`` given at the DOFs
    ``(2, n_dofs)``. Affine, with a non-symmetric Jacobian.

    Shapes: ``u``, ``u_prev``: ``(..., n_dofs)`` -> ``(..., n_dofs)``.
    """

    affine = True
    time_step = True

    def __init__(self, space: FunctionSpace, *, velocity: np.ndarray, kappa: float, dt: float):
        super().__init__(space)
        self.kappa, self.dt = kappa, dt
        self.register_buffer("velocity", torch.as_tensor(velocity), persistent=False)

    def weak_form(self, u: torch.Tensor, *, u_prev: torch.Tensor) -> torch.Tensor:
        forms = self.forms
        b = forms.values(self.velocity.to(u.dtype))  # (2, E, Q)
        gradients = forms.gradients(u)  # (..., 2, E, Q)
        transport = (b * gradients).sum(dim=-3)
        local = forms.values(u - u_prev) + self.dt * transport
        diffusion = forms.assemble_gradient(gradients)
        return forms.assemble_values(local) + self.dt * self.kappa * diffusion
