"""The global Galerkin solve of an affine residual, with its backward pass written out."""

from __future__ import annotations

import torch


class _GalerkinSolve(torch.autograd.Function):
    """The global Galerkin solve of an affine residual ``R(u) = J u + R(0)``:
    ``out = g + Φᵀ w`` with ``(Φ J Φᵀ) w = -Φ R(g)``, from ``g`` ``(B, n)``, ``Φ``
    ``(B, N, n)``, ``R(0)`` ``(B, n)``, ``J``'s entries ``(B, nnz)`` and the layer
    (its pattern and solves); also whether each solve succeeded ``(B,)`` and the
    condition numbers ``(B, 1)``.

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
    def forward(ctx, g, phi, r0, values, layer):
        pattern = layer.pattern
        applied = pattern.matmul(values, phi)  # J φ_j, (B, N, n)
        r = layer._residual_from(g, (r0, values), {})
        matrix = phi @ applied.transpose(-1, -2)
        factors = layer._factorise(matrix)
        condition = factors.condition()
        w, ok = factors.solve(-(phi @ r[..., None])[..., 0])
        out = g + (w[:, None] @ phi)[:, 0]
        ctx.layer, ctx.factors = layer, factors
        ctx.save_for_backward(phi, r0, values, w, out)
        condition = condition[:, None]
        ctx.mark_non_differentiable(ok, condition)
        return out, ok, condition

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad, _ok, _condition):
        phi, r0, values, w, out = ctx.saved_tensors
        layer, pattern = ctx.layer, ctx.layer.pattern
        lam = -ctx.factors.solve((phi @ grad[..., None])[..., 0], adjoint=True)[0]
        z = (lam[:, None] @ phi)[:, 0]
        a = grad + pattern.matmul(values, z[:, None], transpose=True)[:, 0]
        grad_phi = grad_values = None
        if ctx.needs_input_grad[1]:
            r_out = layer._residual_from(out, (r0, values), {})
            grad_phi = torch.stack([w, lam], dim=-1) @ torch.stack([a, r_out], dim=1)
        if ctx.needs_input_grad[3]:
            grad_values = pattern.outer(z, out)
        return a, grad_phi, z, grad_values, None
