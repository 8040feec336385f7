"""What a hard constraint needs of a residual: two small protocols.

A residual is a module ``R(u, **inputs)`` on FE coefficients ``(..., n_dofs)``, zero
at the discrete solution. :class:`fenop.data.pdes.DirichletResidual` has every
member below; a residual written from scratch needs those of :class:`Residual`,
and may add those of :class:`AssembledJacobian` to be linearised in one pass.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch


@runtime_checkable
class Residual(Protocol):
    """The members a constraint layer reads.

    Attributes:
        forms: the FE forms the residual is assembled with; ``forms.space`` is its
            :class:`~fenop.fem.FunctionSpace` (and ``forms.on(cells)`` restricts it
            to some cells, for the experts' own evaluations).
        dirichlet: ``(n_dofs,)`` bool, the DOFs whose values are prescribed (the
            residual is ``u`` there; the constraint leaves them alone).
        affine: whether ``R`` is affine in ``u`` (one linear solve is then exact;
            else Newton's method).
        symmetric: whether ``R``'s Jacobian is symmetric on the free DOFs
            (Cholesky instead of LU for Galerkin's systems).

    Optional: ``conserved`` (default false), whether the sum of ``R`` over the
    free DOFs is a conservation law's discrete balance (a no-flux problem's
    mass), which the layers then impose exactly (their ``conserve`` option);
    ``time_step`` (default false), whether ``R`` is one step of a time-dependent
    PDE, which for a residual that is not affine makes the layers' global solve
    Newton's method by default (their ``global_solve = "auto"``).
    """

    forms: object
    dirichlet: torch.Tensor
    affine: bool
    symmetric: bool

    def __call__(self, u: torch.Tensor, **inputs: torch.Tensor) -> torch.Tensor: ...


@runtime_checkable
class AssembledJacobian(Protocol):
    """A residual that assembles its Jacobian on the FE pattern itself, instead of
    the layer's one linearisation per colour of the pattern. Each returns ``None``
    where the residual does not (the layer then linearises).

    - ``linearised(pattern, u, **inputs)``: ``R(u)`` ``(B, n)`` and ``J(u)``'s entries
      ``(B, nnz)``, for a residual that is not affine;
    - ``jacobian_entries(pattern, **inputs)``: ``J``'s entries, for an affine one;
    - ``offset(**inputs)``: ``R(0)`` ``(B, n)``, for an affine one.

    Optional: ``jacobian_map(pattern)``, for an affine residual whose weak form's
    Jacobian is linear in one input (Darcy's in ``a``): that input's name and the
    :class:`~fenop.fem.SparseMatrix` ``(nnz, n)`` from it to the entries; the
    coarse grid then takes its matrix from the input in one product with the two
    maps composed, without the entries.
    """

    def linearised(self, pattern, u: torch.Tensor, **inputs: torch.Tensor): ...

    def jacobian_entries(self, pattern, **inputs: torch.Tensor): ...

    def offset(self, **inputs: torch.Tensor): ...


def missing_members(residual: object) -> list[str]:
    """The members of :class:`Residual` that ``residual`` lacks."""
    wanted = ["forms", "dirichlet", "affine", "symmetric"]
    missing = [name for name in wanted if not hasattr(residual, name)]
    if not callable(residual):
        missing.append("__call__")
    if "forms" not in missing and not hasattr(residual.forms, "space"):
        missing.append("forms.space")
    return missing
