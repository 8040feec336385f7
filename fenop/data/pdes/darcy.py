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
import scipy.sparse
import skfem
import torch

from fenop.data.pdes.base import DirichletResidual, PDEFamily
from fenop.fem import FunctionSpace
from fenop.fem.sparse import SparseMatrix
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
        # a -> K(a)'s entries on a pattern, and the same map less the Dirichlet rows,
        # made on the first jacobian_map
        self._to_entries: tuple[object, SparseMatrix, SparseMatrix] | None = None

    def jacobian_map(self, pattern) -> tuple[str, SparseMatrix]:
        """``K(a)`` on the pattern is linear in ``a``: the input's name and the map
        ``(nnz, n)`` from its DOF values to the entries, whose entries are
        WeightedStiffness's cell tensors ``∫_e φ_m ∇φ_i · ∇φ_j`` summed where cells
        share a pattern entry. Made once per pattern; a constraint's coarse grid
        composes its own map with it."""
        return "a", self._maps(pattern)[0]

    def _maps(self, pattern) -> tuple[SparseMatrix, SparseMatrix]:
        """:meth:`jacobian_map`'s map, and the same with the Dirichlet rows' entries
        zero."""
        if self._to_entries is None or self._to_entries[0] is not pattern:
            whole = _entries_map(self.forms.space, pattern)
            free = ~self.dirichlet.cpu().numpy()[pattern.entry_rows.cpu().numpy()]
            cut = scipy.sparse.csr_array(whole * free[:, None].astype(np.float64))
            cut.eliminate_zeros()
            self._to_entries = (pattern, SparseMatrix(whole), SparseMatrix(cut))
        return self._to_entries[1:]

    def weak_jacobian(self, pattern, *, a: torch.Tensor) -> torch.Tensor:
        """``K(a)`` on the pattern: a sparse product with :meth:`jacobian_map` (10x
        faster than contracting the cell tensors and adding them up per call: 13
        against 128 ms at 5e4 DOFs, batch 4)."""
        return self._maps(pattern)[0].to(a.device).each(a)

    def jacobian_entries(self, pattern, *, a: torch.Tensor) -> torch.Tensor:
        """``K(a)`` with the Dirichlet rows identity rows: the product with the map
        less those rows, and their diagonal's ones, with no masked copy."""
        entries = self._maps(pattern)[1].to(a.device).each(a)
        dirichlet = self.dirichlet.to(a.device)
        return entries.index_fill_(-1, pattern.diagonal.to(a.device)[dirichlet], 1.0)

    def weak_offset(self, *, a: torch.Tensor) -> torch.Tensor:
        """The weak form at ``u = 0``: ``-∫ f v``, whatever ``a``."""
        return -self.load.to(a).expand(a.shape[0], -1)

    def weak_form(self, u: torch.Tensor, *, a: torch.Tensor) -> torch.Tensor:
        flux = self.forms.values(a).unsqueeze(-3) * self.forms.gradients(u)
        return self.forms.assemble_gradient(flux) - self.load.to(u.dtype)


def _entries_map(space: FunctionSpace, pattern) -> scipy.sparse.csr_array:
    """The ``(nnz, n_dofs)`` matrix taking ``a``'s DOF values to ``K(a)``'s entries on
    ``pattern`` (a :class:`~fenop.fem.jacobian.JacobianPattern` of ``space``)."""
    stiffness = WeightedStiffness(space)
    tensor = stiffness.cell_tensors  # (m, i, j, E)
    slots = np.broadcast_to(pattern.local_slots()[None], tensor.shape)
    dofs = np.broadcast_to(stiffness.element_dofs[:, None, None, :], tensor.shape)
    matrix = scipy.sparse.csr_array(
        (tensor.ravel(), (slots.ravel(), dofs.ravel())), shape=(pattern.nnz, space.n_dofs)
    )
    matrix.sum_duplicates()
    return matrix
