"""Nonlinear diffusion: -div((1 + u²) ∇u) = f, u = 0 on the boundary, solved by Newton.

>>> from fenop.fem import FunctionSpace, unit_square
>>> problem = NonlinearDiffusion(FunctionSpace(unit_square(9), dirichlet="boundary"))
>>> sample = problem.sample(seed=0, index=0)
>>> bool(abs(sample["u"]).max() > 0.1)    # large enough for the nonlinearity to matter
True
"""

from __future__ import annotations

import numpy as np
import skfem
import torch
from skfem.helpers import dot, grad

from fenop.data.pdes.base import DirichletResidual, PDEFamily
from fenop.fem import FunctionSpace


@skfem.LinearForm
def _weak_residual(v, w):
    return (1 + w["u"] ** 2) * dot(grad(w["u"]), grad(v)) - w["f"] * v


@skfem.BilinearForm
def _jacobian(du, v, w):
    u = w["u"]
    return (1 + u**2) * dot(grad(du), grad(v)) + 2 * u * du * dot(grad(u), grad(v))


class NonlinearDiffusion(PDEFamily):
    """Quasilinear diffusion with a random source, Newton's method to a tolerance.

    Args:
        space: FE space with Dirichlet DOFs on the boundary.
        scale: the source is ``scale`` times a GRF draw (the default makes u of
            order one, where the nonlinearity matters).
        tol: Newton stops when the residual's norm at free DOFs is below ``tol``
            times the source's (its value at u = 0).
        max_iterations: Newton iterations before giving up with an error.
        grf: options of the Gaussian random field.
    """

    name = "nonlinear_diffusion"
    inputs = ("f",)

    def __init__(
        self,
        space: FunctionSpace,
        *,
        scale: float = 50.0,
        tol: float = 1e-10,
        max_iterations: int = 30,
        grf: dict | None = None,
    ):
        super().__init__(space, grf=grf)
        self.scale, self.tol, self.max_iterations = float(scale), float(tol), int(max_iterations)

    def parameters(self) -> dict:
        return {"scale": self.scale, "tol": self.tol, **super().parameters()}

    def sample_inputs(self, rng: np.random.Generator) -> dict[str, np.ndarray]:
        return {"f": self.scale * self.random_field(rng)}

    def solve(self, *, f: np.ndarray) -> dict[str, np.ndarray]:
        basis, free = self.space.basis, self.interior
        f_h = basis.interpolate(f)
        u = np.zeros(self.space.n_dofs)
        reference = None
        for _ in range(self.max_iterations + 1):
            u_h = basis.interpolate(u)
            r = _weak_residual.assemble(basis, u=u_h, f=f_h)
            norm = np.linalg.norm(r[free])
            reference = norm if reference is None else reference
            if norm <= self.tol * reference:
                return {"u": u}
            u = u - self.solve_linear(_jacobian.assemble(basis, u=u_h), r)
        raise RuntimeError(
            f"Newton did not reach a relative residual of {self.tol} in "
            f"{self.max_iterations} iterations (last {norm / reference:.2e})"
        )

    def residual(self) -> NonlinearDiffusionResidual:
        return NonlinearDiffusionResidual(self.space)


class NonlinearDiffusionResidual(DirichletResidual):
    """``R(u; f) = ∫ (1 + u²) ∇u·∇v - ∫ f v`` at free DOFs, ``u`` at Dirichlet DOFs.

    Shapes: ``u``, ``f``: ``(..., n_dofs)`` -> ``(..., n_dofs)``.
    """

    def weak_form(self, u: torch.Tensor, *, f: torch.Tensor) -> torch.Tensor:
        return self._weak(self.forms.values(u), self.forms.gradients(u), f)

    def _weak(self, values: torch.Tensor, gradients: torch.Tensor, f: torch.Tensor):
        """The weak form from ``u``'s values ``(B, E, Q)`` and gradients ``(B, d, E, Q)``
        at the quadrature points."""
        forms = self.forms
        flux = (1 + values**2).unsqueeze(-3) * gradients
        return forms.assemble_gradient(flux) - forms.assemble_values(forms.values(f))

    def linearised(self, pattern, u: torch.Tensor, *, f: torch.Tensor):
        """``R(u)`` and ``J(u)`` on the pattern: ``J_ij = ∫ (1 + u²) ∇φ_j·∇φ_i +
        ∫ 2 u φ_j ∇u·∇φ_i``, cell by cell (:class:`~fenop.fem.cell_jacobian.CellJacobian`),
        on the cells the forms see (``forms.on``: then exact at the rows all of whose
        cells those are). In general from its weights at the quadrature points:
        ``1 + u²`` on ``∇φ_i·∇φ_j`` and ``2 u ∂_k u`` on ``∂_k φ_i φ_j``; where the
        gradients are constant on each cell (P1 on simplices), by
        :meth:`_linearised_on_cells`."""
        forms = self.forms
        cells = self.cell_jacobian(pattern, u.device)
        index = forms.active.index.to(u.device)
        if cells.constant_gradients:
            r, entries = self._linearised_on_cells(cells, index, u, f)
            return r, self._with_dirichlet_rows(pattern, entries)
        values, gradients = forms.values(u), forms.gradients(u)  # (B, E, Q), (B, d, E, Q)
        r = torch.where(self.dirichlet, u, self._weak(values, gradients, f))
        weights = torch.cat([(1 + values**2)[:, None], 2 * values[:, None] * gradients], dim=1)
        entries = cells.weighted(weights, ("stiffness", "gradient_value"), index)
        return r, self._with_dirichlet_rows(pattern, entries)

    def _linearised_on_cells(self, cells, index, u: torch.Tensor, f: torch.Tensor):
        """``R(u)`` ``(B, n)`` and the weak form's Jacobian's entries ``(B, nnz)`` for
        gradients constant on each cell. On cell ``e`` of measure ``|e|``, with ``m``
        the mean of ``1 + u²`` over it, ``a_i = ∇u·∇φ_i`` and ``b_j = ∫_e 2 u φ_j``:
        ``R_i = |e| m a_i - ∫_e f φ_i`` and ``J_ij = m ∫_e ∇φ_i·∇φ_j + a_i b_j``, the
        cell's stiffness matrix scaled and a rank-one matrix. The same quadrature
        as the general weights, with maps of ``2 N² E`` entries instead of
        ``(1 + d) N² E Q`` (P1 triangles, Q = 3: two ninths): the global constraint's
        inference took a third less time (6.6e4 DOFs, batch 8; BENCHMARKS.md, "The
        nonlinear residual's linearisation on P1 cells"). Every array is
        ``(B, ·, E)``, cells last."""
        phi, dx, products = cells.constant_basis(index)  # (N, Q), (Q, E), (N, N, E)
        local = cells.local_values(u, index)  # (B, N, E)
        at_points = phi.T @ local  # u at the quadrature points, (B, Q, E)
        a = (products * local[:, None]).sum(2)  # ∇u·∇φ_i = Σ_j ∇φ_i·∇φ_j u_j, (B, N, E)
        volume = dx.sum(0)
        mean = 1 + (at_points * at_points * dx).sum(1) / volume  # (B, E)
        b = phi @ (2 * at_points * dx)  # (B, N, E)
        load = phi @ ((phi.T @ cells.local_values(f, index)) * dx)  # ∫_e f φ_i
        r = cells.assemble(volume * mean[:, None] * a - load, index)
        r = torch.where(self.dirichlet, u, r)
        entries = cells.weighted(mean[:, None, :, None], ("stiffness",), index)
        return r, entries + cells.rank_one(a, b, index)
