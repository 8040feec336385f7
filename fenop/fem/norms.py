"""FE-weighted norms and the relative-error losses built on them.

The norm of an FE function with coefficients ``u`` is ``sqrt(u^T M u)`` (``L2``)
or ``sqrt(u^T (M + K) u)`` (``H1``), with ``M`` and ``K`` the mass and stiffness
matrices: exact integrals of the FE function, hence consistent on non-uniform
meshes, unlike a mean over DOF values.

>>> import torch
>>> from fenop.fem import FunctionSpace, unit_square
>>> space = FunctionSpace(unit_square(9))
>>> u = space.interpolate(lambda x: x[0] + x[1])   # in the space: norms are exact
>>> round(l2_norm(u, space).item() ** 2, 12)         # ∫ (x + y)^2 = 7/6
1.166666666667
>>> loss = RelativeL2Loss(space)
>>> loss(1.1 * u[None, None], u[None, None])
tensor(0.1000, dtype=torch.float64)
"""

from __future__ import annotations

import torch
from torch import nn

from fenop._types import FETensor
from fenop.fem.space import FunctionSpace
from fenop.fem.sparse import SparseMatrix, apply

_REDUCTIONS = ("mean", "sum", "none")


def _quadratic_form(matrix: torch.Tensor | SparseMatrix, u: torch.Tensor) -> torch.Tensor:
    """``u^T A u`` over the last dimension: ``(..., n)`` -> ``(...)``."""
    product = matrix(u) if isinstance(matrix, SparseMatrix) else apply(matrix, u)
    return (u * product).sum(dim=-1)


def _safe_sqrt(q: torch.Tensor) -> torch.Tensor:
    # sqrt has an infinite derivative at 0; a zero error must give a zero (sub)gradient,
    # not NaN, and round-off can make a tiny quadratic form slightly negative. NaN stays
    # NaN (q * 0 carries it, with a zero gradient), so a diverged model never scores 0.
    positive = q > 0
    root = torch.sqrt(torch.where(positive, q, torch.ones_like(q)))
    return torch.where(positive, root, q * 0)


def l2_norm(u: FETensor, space: FunctionSpace) -> torch.Tensor:
    """``||u||_L2 = sqrt(u^T M u)`` of FE functions ``u`` ``(..., n_dofs)`` -> ``(...)``."""
    space.check_coefficients(u, "u")
    return _safe_sqrt(_quadratic_form(space.mass.to(u.device), u))


def h1_norm(u: FETensor, space: FunctionSpace, *, seminorm: bool = False) -> torch.Tensor:
    """``||u||_H1 = sqrt(u^T (M + K) u)`` (or ``sqrt(u^T K u)`` with ``seminorm``).

    Shapes: ``(..., n_dofs)`` -> ``(...)``.
    """
    space.check_coefficients(u, "u")
    q = _quadratic_form(space.stiffness.to(u.device), u)
    if not seminorm:
        q = q + _quadratic_form(space.mass.to(u.device), u)
    return _safe_sqrt(q)


class _RelativeLoss(nn.Module):
    """``||pred - target|| / ||target||`` per sample, channels taken together."""

    def __init__(self, space: FunctionSpace, *, reduction: str = "mean"):
        super().__init__()
        if not isinstance(space, FunctionSpace):
            raise TypeError(f"`space` must be a FunctionSpace, got {type(space).__name__}")
        if reduction not in _REDUCTIONS:
            raise ValueError(f"`reduction` must be one of {_REDUCTIONS}, got {reduction!r}")
        self.space = space
        self.reduction = reduction
        self.mass = SparseMatrix(space.mass_matrix)

    def _squared_norm(self, u: torch.Tensor) -> torch.Tensor:
        return _quadratic_form(self.mass, u)

    def forward(self, pred: FETensor, target: FETensor) -> torch.Tensor:
        """Relative error of ``pred`` against ``target``, both ``(B, C, n_dofs)``.

        Returns:
            ``(B,)`` with ``reduction="none"``, else a scalar (mean or sum over B).
        """
        self.space.check_coefficients(pred, "pred")
        self.space.check_coefficients(target, "target")
        if pred.shape != target.shape:
            raise ValueError(
                f"`pred` and `target` must have the same shape, got {tuple(pred.shape)} "
                f"and {tuple(target.shape)}"
            )
        if pred.ndim != 3:
            raise ValueError(
                f"`pred` must have shape (batch, channels, n_dofs), got {tuple(pred.shape)}"
            )
        error = self._squared_norm(pred - target).sum(dim=1)
        reference = self._squared_norm(target).sum(dim=1)
        relative = _safe_sqrt(error) / _safe_sqrt(reference)
        if self.reduction == "mean":
            return relative.mean()
        if self.reduction == "sum":
            return relative.sum()
        return relative


class RelativeL2Loss(_RelativeLoss):
    """Relative L2 error ``sqrt(e^T M e / u^T M u)`` per sample, ``e = pred - target``.

    Args:
        space: the FE space of ``pred`` and ``target``.
        reduction: ``"mean"`` or ``"sum"`` over the batch, or ``"none"``.

    Shapes:
        ``pred``, ``target``: ``(B, C, n_dofs)`` -> scalar, or ``(B,)`` for ``"none"``.
    """


class RelativeH1Loss(_RelativeLoss):
    """Relative H1 error ``sqrt(e^T (M + K) e / u^T (M + K) u)`` per sample.

    Args:
        space: the FE space of ``pred`` and ``target``.
        reduction: ``"mean"`` or ``"sum"`` over the batch, or ``"none"``.
        seminorm: use ``K`` alone (the H1 seminorm, gradients only).

    Shapes:
        ``pred``, ``target``: ``(B, C, n_dofs)`` -> scalar, or ``(B,)`` for ``"none"``.
    """

    def __init__(self, space: FunctionSpace, *, reduction: str = "mean", seminorm: bool = False):
        super().__init__(space, reduction=reduction)
        self.seminorm = seminorm
        self.stiffness = SparseMatrix(space.stiffness_matrix)

    def _squared_norm(self, u: torch.Tensor) -> torch.Tensor:
        q = _quadratic_form(self.stiffness, u)
        return q if self.seminorm else q + super()._squared_norm(u)
