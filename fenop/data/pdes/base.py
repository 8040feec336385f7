"""What every PDE family provides, and the pieces they share.

A family (Darcy, Poisson, ...) is bound to a :class:`~fenop.fem.FunctionSpace`
with Dirichlet DOFs on the whole boundary and zero boundary values (the heat
family may take no-flux boundaries instead, on a space without them). It gives:

* ``sample(seed, index)``: the input fields of one sample, drawn from its own
  random stream, and the FE solution computed with scikit-fem;
* ``residual()``: a torch module ``R(u, **inputs)`` of the discrete system, zero
  exactly at the FE solution (used by tests, physics losses and hard constraints).

Fields are float64 arrays of DOF values ``(n_dofs,)``; residuals are batched
torch tensors ``(..., n_dofs)``.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import scipy.sparse
import scipy.sparse.linalg
import torch
from scipy.sparse.csgraph import reverse_cuthill_mckee
from torch import nn

from fenop.data.grf import GaussianRandomField, sample_rng
from fenop.fem import FEForms, FunctionSpace
from fenop.fem.cell_jacobian import CellJacobian
from fenop.fem.mesh import bounding_box


class PDEFamily:
    """Base class of the PDE families in :mod:`fenop.data.pdes`.

    Args:
        space: the FE space of every field; it must have Dirichlet DOFs (with
            ``dirichlet = False``, none).
        grf: options of the :class:`~fenop.data.grf.GaussianRandomField` the
            random inputs are drawn from (``alpha``, ``tau``, ``sigma``, ``n_modes``).
        dirichlet: whether the family's boundary condition is ``u = 0`` on the
            whole boundary (subclasses with a no-flux option pass ``False`` for it).
    """

    name: ClassVar[str]
    # Field names; class attributes, which a family's mode may change per instance.
    inputs: tuple[str, ...]
    outputs: tuple[str, ...] = ("u",)
    # Further stored fields that are neither model input nor output (e.g. the state
    # before the last time step, which a residual check needs).
    auxiliary: tuple[str, ...] = ()
    # Time-dependent families that keep whole trajectories: the fields that hold a
    # state per time (n_times, n_dofs), and those times (n_times,).
    trajectories: tuple[str, ...] = ()
    times: np.ndarray | None = None
    # Families whose residual is that of one time step: its name for the state one
    # step earlier, which a stepper's constraint takes from its history.
    previous_state: ClassVar[str | None] = None

    def __init__(self, space: FunctionSpace, *, grf: dict | None = None, dirichlet: bool = True):
        if not isinstance(space, FunctionSpace):
            raise TypeError(f"`space` must be a FunctionSpace, got {type(space).__name__}")
        if dirichlet and len(space.boundary_dofs) == 0:
            raise ValueError(
                f"{type(self).__name__} needs a space with Dirichlet DOFs "
                '(FunctionSpace(mesh, dirichlet="boundary")), got one with none'
            )
        if not dirichlet and len(space.boundary_dofs):
            raise ValueError(
                f"{type(self).__name__} with no-flux boundaries needs a space without "
                f"Dirichlet DOFs (FunctionSpace(mesh)), got one with {len(space.boundary_dofs)}"
            )
        if len(space.boundary_dofs) == space.n_dofs:
            raise ValueError(
                f"{type(self).__name__} needs DOFs to solve for, but all {space.n_dofs} "
                "DOFs of this space lie on the Dirichlet boundary; use a finer mesh"
            )
        self.space = space
        lower, upper = bounding_box(space.mesh)
        self.grf = GaussianRandomField(lower, upper, **(grf or {}))
        self._grf_at_dofs = self.grf.at(space.dof_points)
        self.interior = np.setdiff1d(np.arange(space.n_dofs), space.boundary_dofs)
        self._ordering: np.ndarray | None = None  # of the free DOFs, see solve_linear

    @classmethod
    def dirichlet_for(cls, options: dict) -> str | None:
        """The Dirichlet DOFs of the space this family takes with ``options`` (its
        keyword arguments): ``"boundary"``, or ``None`` for no-flux boundaries;
        :func:`fenop.data.generate` makes the space with it."""
        return "boundary"

    @property
    def fields(self) -> tuple[str, ...]:
        return self.inputs + self.outputs + self.auxiliary

    def parameters(self) -> dict:
        """The family's parameters, JSON-ready; stored with every data set."""
        return {"grf": self.grf.parameters()}

    def random_field(self, rng: np.random.Generator) -> np.ndarray:
        """A GRF draw at the DOF points, ``(n_dofs,)``."""
        return self._grf_at_dofs(self.grf.coefficients(rng))

    def random_state(self, rng: np.random.Generator) -> np.ndarray:
        """A GRF draw set to zero on the Dirichlet DOFs ``(n_dofs,)``: an initial state
        consistent with the boundary condition (the time-dependent families')."""
        u0 = self.random_field(rng)
        u0[self.space.boundary_dofs] = 0.0
        return u0

    def sample_inputs(self, rng: np.random.Generator) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def solve(self, **inputs: np.ndarray) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def residual(self) -> nn.Module:
        raise NotImplementedError

    def sample(self, seed: int, index: int) -> dict[str, np.ndarray]:
        """The fields of sample ``index`` of the data set seeded ``seed``: its inputs
        and the FE solution (of a trajectory family, the states drawn and solved)."""
        inputs = self.sample_inputs(sample_rng(seed, index))
        return {k: v for k, v in {**inputs, **self.solve(**inputs)}.items() if k in self.fields}

    def solve_linear(self, matrix: scipy.sparse.sparray, load: np.ndarray) -> np.ndarray:
        """Solve ``matrix u = load`` with u = 0 on the Dirichlet DOFs (direct solver)."""
        if self._ordering is None:
            # The sparsity pattern is the space's, whatever the coefficients: order
            # once. SuperLU's minimum degree (MMD on A^T + A) fills in less than its
            # default COLAMD on these symmetric systems, but depends on the DOF
            # numbering: on a refined mesh's numbering it ran 100x slower. A reverse
            # Cuthill-McKee renumbering first makes it robust (BENCHMARKS.md).
            pattern = scipy.sparse.csr_array(matrix)[self.interior][:, self.interior]
            self._ordering = self.interior[reverse_cuthill_mckee(pattern, symmetric_mode=True)]
        free = self._ordering
        u = np.zeros(self.space.n_dofs)
        reduced = scipy.sparse.csc_array(matrix)[free][:, free]
        u[free] = scipy.sparse.linalg.spsolve(reduced, load[free], permc_spec="MMD_AT_PLUS_A")
        return u


class DirichletResidual(nn.Module):
    """Base of the residual modules: rows of Dirichlet DOFs hold ``u - 0``.

    Subclasses implement ``weak_form(u, **inputs)``, the assembled weak residual
    ``(..., n_dofs)``; its Dirichlet rows are replaced by ``u`` itself, so the
    residual vanishes exactly when ``u`` solves the condensed FE system.

    Four attributes tell a hard constraint how to solve with it: ``affine``,
    whether ``R`` is affine in ``u`` (then one linear solve is exact),
    ``symmetric``, whether its Jacobian is symmetric on the free DOFs (then a
    Cholesky factorisation serves), ``conserved``, whether the sum of ``R`` over
    the free DOFs is a conservation law's discrete balance (its test against the
    constant field, with no Dirichlet DOFs: a no-flux problem's mass), which a
    constraint then imposes exactly, and ``time_step``, whether ``R`` is one step
    of a time-dependent PDE (a rollout then feeds each step's leftover error into
    the next, and a constraint solves a nonlinear one by Newton's method).
    """

    affine: ClassVar[bool] = False
    symmetric: ClassVar[bool] = False
    conserved: bool = False
    time_step: ClassVar[bool] = False

    def __init__(self, space: FunctionSpace):
        super().__init__()
        self.forms = FEForms(space)
        mask = torch.zeros(space.n_dofs, dtype=torch.bool)
        mask[torch.from_numpy(space.boundary_dofs)] = True
        self.register_buffer("dirichlet", mask, persistent=False)
        self._cell_jacobian: CellJacobian | None = None  # made by cell_jacobian

    def weak_form(self, u: torch.Tensor, **inputs: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, u: torch.Tensor, **inputs: torch.Tensor) -> torch.Tensor:
        """``R(u; inputs)``: ``u`` and each input ``(..., n_dofs)`` -> ``(..., n_dofs)``."""
        return torch.where(self.dirichlet, u, self.weak_form(u, **inputs))

    def weak_jacobian(self, pattern, **inputs: torch.Tensor) -> torch.Tensor | None:
        """The weak form's Jacobian (affine residuals: it does not depend on ``u``) as
        entries ``(B, nnz)`` on a :class:`~fenop.fem.jacobian.JacobianPattern`, for
        inputs ``(B, n_dofs)``; ``None`` where a subclass does not assemble it (the
        hard constraints then recover it from linearisations)."""
        return None

    def linearised(
        self, pattern, u: torch.Tensor, **inputs: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """For a residual not affine in ``u``: ``R(u)`` ``(B, n_dofs)`` and its Jacobian
        at ``u`` as entries ``(B, nnz)`` on ``pattern``, assembled cell by cell (one
        pass, where recovering it takes one linearisation per colour of the pattern),
        differentiable in ``u`` and the inputs; ``None`` where a subclass does not
        assemble it. On the cells the forms see (``forms.on``), like an evaluation."""
        return None

    def cell_jacobian(self, pattern, device: torch.device) -> CellJacobian:
        """The cell data for assembling this residual's Jacobian on ``pattern``
        (:class:`~fenop.fem.cell_jacobian.CellJacobian`), made on the first call for a
        pattern and device, for :meth:`linearised`."""
        cached = self._cell_jacobian
        if cached is None or cached.pattern is not pattern or cached.device != device:
            self._cell_jacobian = cached = CellJacobian(pattern, device)
        return cached

    def _with_dirichlet_rows(self, pattern, weak: torch.Tensor) -> torch.Tensor:
        """Entries ``(B, nnz)`` of a weak form's Jacobian with the Dirichlet rows made
        identity rows."""
        dirichlet = self.dirichlet.to(weak.device)
        entries = weak.masked_fill(dirichlet[pattern.entry_rows], 0.0)
        return entries.index_fill_(-1, pattern.diagonal[dirichlet], 1.0)  # our own copy

    def weak_offset(self, **inputs: torch.Tensor) -> torch.Tensor | None:
        """For an affine residual, the weak form at ``u = 0`` ``(B, n_dofs)`` for inputs
        ``(B, n_dofs)``, where a subclass has it cheaper than an evaluation; ``None``
        otherwise (the hard constraints then evaluate ``R(0)``)."""
        return None

    def offset(self, **inputs: torch.Tensor) -> torch.Tensor | None:
        """``R(0)`` ``(B, n_dofs)``: :meth:`weak_offset` with the Dirichlet rows zero;
        ``None`` where it is not provided."""
        weak = self.weak_offset(**inputs)
        return None if weak is None else torch.where(self.dirichlet.to(weak.device), 0.0, weak)

    def jacobian_entries(self, pattern, **inputs: torch.Tensor) -> torch.Tensor | None:
        """``R``'s Jacobian on ``pattern`` ``(B, nnz)``: :meth:`weak_jacobian` with the
        Dirichlet rows made identity rows; ``None`` where it is not assembled."""
        weak = self.weak_jacobian(pattern, **inputs)
        return None if weak is None else self._with_dirichlet_rows(pattern, weak)
