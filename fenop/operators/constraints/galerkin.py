"""The global Galerkin solve of an affine residual, with its backward pass written out."""

from __future__ import annotations

import torch

from fenop.fem.jacobian import JacobianPattern
from fenop.operators.constraints.coarse import CoarseSpace
from fenop.operators.constraints.factorisation import DenseSystems, Factorisation


def _galerkin_solve(g, phi, r0, values, pattern: JacobianPattern, systems: DenseSystems):
    """:class:`_GalerkinSolve`: its matrix ``Φ J Φᵀ`` factorised outside the graph (its
    backward pass is written out), then solved."""
    with torch.no_grad():
        factors = systems.factorise(phi @ pattern.matmul(values, phi).transpose(-1, -2))
    return _GalerkinSolve.apply(g, phi, r0, values, pattern, factors)


def _grid_galerkin_solve(g, r, coefficients, grid: CoarseSpace, entries, systems: DenseSystems):
    """The solve of :func:`_galerkin_solve` for basis fields ``Φ = C Pᵀ`` given by
    their coefficients ``C`` ``(B, N, m)`` in the hats ``P`` ``(n, m)`` of ``grid``
    (the fields a network emits on that grid, interpolated as its decoder does):
    ``Φ J Φᵀ = C (Pᵀ J P) Cᵀ`` and ``Φ R(g) = C Pᵀ R(g)``, with ``r = R(g)`` ``(B, n)``
    and ``Pᵀ J P``'s entries ``entries`` ``(B, s)`` on the grid's pattern. The same
    output, but nothing of size ``N n`` is formed: the fields' products, the
    solve's and its gradient's are on the grid's ``m`` hats, and the mesh sees one
    residual, one restriction and one prolongation (and ``Pᵀ J P``, one sparse
    product whatever ``N``).
    Autograd differentiates it. Returns the output ``(B, n)``, whether each solve
    succeeded ``(B,)`` and the condition numbers ``(B, 1)``."""
    matrix = coefficients @ grid.apply(entries, coefficients).transpose(-1, -2)
    factors = systems.factorise(matrix)
    w, ok = factors.solve(-(coefficients @ grid.restrict(r)[..., None])[..., 0])
    out = g + grid.prolong((w[:, None] @ coefficients)[:, 0])
    return out, ok, factors.condition()[:, None]


class _GalerkinSolve(torch.autograd.Function):
    """The global Galerkin solve of an affine residual ``R(u) = J u + R(0)``:
    ``out = g + Φᵀ w`` with ``(Φ J Φᵀ) w = -Φ R(g)``, from ``g`` ``(B, n)``, ``Φ``
    ``(B, N, n)``, ``R(0)`` ``(B, n)``, ``J``'s entries ``(B, nnz)`` on ``pattern``
    and the factors of ``M = Φ J Φᵀ``; also whether each solve succeeded ``(B,)``
    and the condition numbers ``(B, 1)``.

    The backward pass is written out. With ``λ = -M⁻ᵀ Φ ḡ`` (``M = Φ J Φᵀ``),
    ``z = Φᵀ λ`` and ``a = ḡ + Jᵀ z``, the gradients are ``ḡ_g = a``, ``ḡ_R(0) = z``,
    ``ḡ_J = z outᵀ`` on the pattern and ``ḡ_Φ = w aᵀ + λ R(out)ᵀ``: one rank-2
    product and two sparse products with one field each, where autograd through
    the forward pass forms four ``(B, N, n)`` outer products and sums them, and
    multiplies ``Jᵀ`` by ``N`` fields. The scaling and ridge of the solve
    (:class:`~fenop.operators.constraints.factorisation.Factorisation`) are taken
    as constants: their part of the gradient is of the ridge's size. ``M̄ = λ wᵀ``
    is not made symmetric, which changes nothing along perturbations that keep a
    symmetric system symmetric.
    Once differentiable."""

    @staticmethod
    def forward(ctx, g, phi, r0, values, pattern: JacobianPattern, factors: Factorisation):
        r = pattern.matmul(values, g[:, None])[:, 0] + r0
        condition = factors.condition()
        w, ok = factors.solve(-(phi @ r[..., None])[..., 0])
        out = g + (w[:, None] @ phi)[:, 0]
        ctx.pattern, ctx.factors = pattern, factors
        ctx.save_for_backward(phi, r0, values, w, out)
        condition = condition[:, None]
        ctx.mark_non_differentiable(ok, condition)
        return out, ok, condition

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad, _ok, _condition):
        phi, r0, values, w, out = ctx.saved_tensors
        pattern = ctx.pattern
        lam = -ctx.factors.solve((phi @ grad[..., None])[..., 0], adjoint=True)[0]
        z = (lam[:, None] @ phi)[:, 0]
        a = grad + pattern.matmul(values, z[:, None], transpose=True)[:, 0]
        grad_phi = grad_values = None
        if ctx.needs_input_grad[1]:
            r_out = pattern.matmul(values, out[:, None])[:, 0] + r0
            grad_phi = torch.stack([w, lam], dim=-1) @ torch.stack([a, r_out], dim=1)
        if ctx.needs_input_grad[3]:
            grad_values = pattern.outer(z, out)
        return a, grad_phi, z, grad_values, None, None
