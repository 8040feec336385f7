"""The small dense systems of the hard constraints, factorised once.

Every solve of a constraint (the global one, an expert's, a Newton step) is a batch
of ``N x N`` float64 systems, scaled to a unit diagonal and ridged
(:func:`~fenop.operators.implicit.scaled_system`), then factorised: Cholesky where
the system is symmetric, LU otherwise. A :class:`Factorisation` holds the factors
of one batch, solves with them (and with their transpose, for an adjoint), and
says how well conditioned each system is; :class:`DenseSystems` is what a layer
decides once for all its systems (the ridge, whether they are symmetric).

>>> import torch
>>> matrix = torch.tensor([[4.0, 1.0], [1.0, 3.0]], dtype=torch.float64)[None]
>>> factors = Factorisation(matrix, ridge=0.0, symmetric=True)
>>> w, ok = factors.solve(torch.tensor([[1.0, 2.0]], dtype=torch.float64))
>>> torch.allclose(matrix[0] @ w[0], torch.tensor([1.0, 2.0], dtype=torch.float64)), ok.tolist()
(True, [True])
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from fenop.operators._linalg import lu_factor_ex
from fenop.operators.implicit import scaled_system


class Factorisation:
    """The factors of ``matrix`` ``(..., N, N)``, scaled and ridged.

    Args:
        matrix: the systems (differentiable: solves carry gradients to it).
        ridge: added to the unit diagonal of each scaled system.
        symmetric: Cholesky (an identity where it fails, so that its solves give no
            NaN; reported in :attr:`ok`) instead of LU. A system that is not finite
            is not factorised (an identity stands in) and reported in :attr:`ok`.

    Attributes:
        ok: ``(...)`` whether each system factorised and is finite.
    """

    def __init__(self, matrix: torch.Tensor, *, ridge: float, symmetric: bool):
        self.scaled, self.scale = scaled_system(matrix, ridge)
        self.symmetric, self.pivots = symmetric, None
        eye = torch.eye(matrix.shape[-1], dtype=matrix.dtype, device=matrix.device)
        with torch.no_grad():
            finite = torch.isfinite(self.scaled).all(dim=(-1, -2))
        # LAPACK never sees NaN or Inf: MKL's LU did not return from one (measured)
        scaled = _where(finite, self.scaled, eye)
        if symmetric:
            factor, info = torch.linalg.cholesky_ex(scaled)
            ok = info == 0
            self.factor = _where(ok, factor, eye)
        else:
            self.factor, self.pivots, info = lu_factor_ex(scaled)
            ok = info == 0
        self.ok = ok & finite

    def solve(self, rhs: torch.Tensor, *, adjoint: bool = False):
        """``w`` ``(..., N)`` solving the systems for ``rhs`` ``(..., N)`` (``adjoint``:
        their transposes), and whether each solve succeeded ``(...)``."""
        b = (self.scale * rhs)[..., None]
        if self.symmetric:
            y = torch.cholesky_solve(b, self.factor)
        else:
            y = torch.linalg.lu_solve(self.factor, self.pivots, b, adjoint=adjoint)
        w = self.scale * y[..., 0]
        with torch.no_grad():
            ok = self.ok & torch.isfinite(w).all(dim=-1)
        return w, ok

    def condition(self) -> torch.Tensor:
        """``(...)``: each scaled system's 2-norm condition number (:func:`condition_number`)."""
        return condition_number(self.scaled, symmetric=self.symmetric)


def _where(condition: torch.Tensor, matrices: torch.Tensor, eye: torch.Tensor) -> torch.Tensor:
    """``matrices`` ``(..., N, N)`` with the identity where ``condition`` ``(...)`` does
    not hold. On the CPU, where asking whether all hold costs no synchronisation,
    ``matrices`` themselves when they do: a pass over the batch saved (for the
    17 x 17 coarse grid's systems, batch 8: 1.5 ms, against 3.7 ms for their
    Cholesky factorisation)."""
    if matrices.device.type == "cpu" and bool(condition.all()):
        return matrices
    return torch.where(condition[..., None, None], matrices, eye)


@dataclass(frozen=True)
class DenseSystems:
    """How a layer's systems are solved: their ridge, and whether they are symmetric."""

    ridge: float
    symmetric: bool

    def factorise(self, matrix: torch.Tensor) -> Factorisation:
        """``matrix`` ``(..., N, N)`` scaled, ridged and factorised."""
        return Factorisation(matrix, ridge=self.ridge, symmetric=self.symmetric)

    def condition(self, matrix: torch.Tensor) -> torch.Tensor:
        """``(...)``: the condition numbers of the scaled systems of ``matrix``
        ``(..., N, N)``, without factorising them."""
        scaled = scaled_system(matrix.detach(), self.ridge)[0]
        return condition_number(scaled, symmetric=self.symmetric)


def condition_number(scaled: torch.Tensor, *, symmetric: bool) -> torch.Tensor:
    """``(...)``: the 2-norm condition numbers of scaled systems ``(..., N, N)``
    (infinite where not finite). Above ``1e10`` a system is numerically singular
    (basis fields dependent where it lives), and the ridge picks its coefficients.
    Asked once per matrix, not per solve: an SVD costs more than the solve
    (measured: a tenth of a nonlinear expert sweep's forward pass)."""
    with torch.no_grad():
        scaled = scaled.detach()
        finite = torch.isfinite(scaled).all(dim=(-1, -2))
        result = torch.full_like(scaled[..., 0, 0], math.inf)
        good = scaled[finite]
        if symmetric:  # |λ|max / |λ|min, the SVD's ratio, from eigvalsh
            magnitudes = torch.linalg.eigvalsh(good).abs()
            result[finite] = magnitudes.amax(dim=-1) / magnitudes.amin(dim=-1)
        else:
            result[finite] = torch.linalg.cond(good)
    return result
