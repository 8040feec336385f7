"""Implicit differentiation of root problems: gradients through a solver's answer.

Given a solution ``w*`` of ``F(w*, θ) = 0`` computed by any solver (Newton, with no
graph recorded), :func:`implicit_root` returns ``w*`` as a function of the
parameters ``θ``: by the implicit function theorem ``dw*/dθ = -F_w⁻¹ F_θ``, so the
backward pass solves the adjoint system ``F_wᵀ λ = w̄`` with the *exact* Jacobian
``F_w`` at ``w*`` (autograd of ``F``), scaled and ridged as the solver's own
systems (:func:`scaled_system`), and returns ``-λᵀ F_θ``. Memory does not depend
on the solver's iterations, and a Gauss-Newton approximation of ``F_w`` (biased
where the residual is not zero) is never used. In the manner of JAXopt's
``custom_root``; written for fenop's batched block-diagonal problems.

Problems come in blocks: ``w`` is ``(B, K, N)``, and block ``k`` of ``F`` depends
only on block ``k`` of ``w`` (K independent experts, or K = 1), so ``F_w`` is K
dense ``N x N`` blocks per batch element, found with N backward passes.

>>> import torch
>>> def f(w, a):                      # w³ = a, elementwise, one block of one unknown
...     return w**3 - a
>>> a = torch.tensor([[[8.0]]], dtype=torch.float64, requires_grad=True)
>>> w = implicit_root(f, torch.tensor([[[2.0]]], dtype=torch.float64), a)
>>> w.backward(); a.grad                # d(a^(1/3))/da = 1 / (3 a^(2/3)) = 1/12
tensor([[[0.0833]]], dtype=torch.float64)
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from fenop.operators._linalg import solve_ex


def block_jacobian(f_value: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``(B, K, N, N)``: ``J[b, k, i, j] = ∂F[b, k, i] / ∂w[b, k, j]`` for block-diagonal
    ``F``; ``f_value`` must have been computed from ``w`` with a graph."""
    rows = []
    for i in range(f_value.shape[-1]):
        (row,) = torch.autograd.grad(f_value[..., i].sum(), w, retain_graph=True)
        rows.append(row)
    return torch.stack(rows, dim=-2)


def scaled_system(matrix: torch.Tensor, ridge: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``matrix`` ``(..., N, N)`` scaled symmetrically to a unit diagonal and ridged,
    ``S A S + ridge I``, and the scale ``S`` ``(..., N)``: the system every solve of
    the hard constraints factorises, forward and adjoint alike. An unknown whose
    diagonal vanishes (a basis field that is zero where its problem lives, every
    unknown of a problem that is all padding) gets a unit row and column and a zero
    scale: a zero coefficient, and a zero adjoint."""
    scale, live = unit_scale(torch.diagonal(matrix, dim1=-2, dim2=-1))
    # one pass over the systems, the diagonal's terms added in place: each pass over
    # a batch of 8 coarse grids' 289 x 289 systems took 1.5-2 ms (five of them did)
    scaled = matrix * (scale[..., :, None] * scale[..., None, :])
    scaled.diagonal(dim1=-2, dim2=-1).add_(ridge + (~live).to(matrix.dtype))
    return scaled, scale


def unit_scale(diagonal: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The scale ``S`` ``(..., N)`` that gives systems of diagonal ``diagonal``
    ``(..., N)`` a unit diagonal (:func:`scaled_system`), and which unknowns are live
    ``(..., N)``: those whose diagonal is not negligible against the largest (the
    others get a zero scale)."""
    diagonal = diagonal.abs()
    largest = diagonal.amax(dim=-1, keepdim=True).clamp_min(torch.finfo(diagonal.dtype).tiny)
    live = diagonal > 1e-14 * largest
    scale = torch.where(live, diagonal.clamp_min(1e-300).rsqrt(), torch.zeros_like(diagonal))
    return scale, live


class _ImplicitRoot(torch.autograd.Function):
    @staticmethod
    def forward(fn, jacobian, ridge, solution, *params):
        return solution.clone()

    @staticmethod
    def setup_context(ctx, inputs, output):
        fn, jacobian, ridge, _, *params = inputs
        ctx.fn, ctx.jacobian, ctx.ridge = fn, jacobian, ridge
        ctx.save_for_backward(output, *params)

    @staticmethod
    def backward(ctx, grad):
        w, *params = ctx.saved_tensors
        with torch.enable_grad():
            w = w.detach().requires_grad_(ctx.jacobian is None)
            # Every parameter that carries a gradient is an explicit input: detached
            # copies to differentiate F by, whose gradients are the inputs'.
            params = [p.detach().requires_grad_(p.requires_grad) for p in params]
            f_value = ctx.fn(w, *params)
            jacobian = block_jacobian(f_value, w) if ctx.jacobian is None else ctx.jacobian
            adjoint = _adjoint(jacobian, grad, ctx.ridge)
            wanted = [p for p in params if p.requires_grad]
            grads = iter(
                torch.autograd.grad(f_value, wanted, grad_outputs=-adjoint, allow_unused=True)
                if wanted
                else ()
            )
        return (
            None,
            None,
            None,
            None,
            *(next(grads) if p.requires_grad else None for p in params),
        )


def _adjoint(jacobian: torch.Tensor, grad: torch.Tensor, ridge: float) -> torch.Tensor:
    """``λ`` ``(..., N)`` of ``Jᵀ λ = grad`` for ``J`` ``(..., N, N)``, solved as the
    forward solves were: scaled and ridged (:func:`scaled_system`). So a system that
    is singular (basis fields dependent where the problem lives, which the forward
    reports) still has a finite adjoint, that of the ridged system; an unknown whose
    row and column vanish has a zero one. A solve that fails all the same (not
    finite) gives a zero adjoint for that problem, not an error mid-training."""
    scaled, scale = scaled_system(jacobian, ridge)
    # Jᵀ λ = g with J = S⁻¹ Â S⁻¹ on the live unknowns: Âᵀ (S⁻¹ λ) = S g
    y, info = solve_ex(scaled.transpose(-1, -2), (scale * grad)[..., None])
    adjoint = scale * y[..., 0]
    good = (info == 0)[..., None] & torch.isfinite(adjoint).all(dim=-1, keepdim=True)
    return torch.where(good, adjoint, 0.0)


def implicit_root(
    fn: Callable[..., torch.Tensor],
    solution: torch.Tensor,
    *params: torch.Tensor,
    jacobian: torch.Tensor | None = None,
    ridge: float = 0.0,
) -> torch.Tensor:
    """``solution`` of ``fn(w, *params) = 0``, differentiable in ``params``.

    Args:
        fn: ``F(w, *params)``, ``w`` and the result ``(B, K, N)``, block ``k`` of the
            result depending only on block ``k`` of ``w``.
        solution: ``(B, K, N)``, a root found by any means (its graph is ignored).
        params: the tensors ``F`` depends on that gradients should reach.
        jacobian: ``(B, K, N, N)``, ``∂F/∂w`` at ``solution`` where the solver has it
            exactly (else autograd finds it, N backward passes through ``F``).
        ridge: added to the unit diagonal of the scaled adjoint system, as the
            solver added it to its own (:func:`scaled_system`).

    Returns:
        ``solution``, whose backward pass is the implicit function theorem's.
    """
    if jacobian is not None:
        jacobian = jacobian.detach()
    return _ImplicitRoot.apply(fn, jacobian, float(ridge), solution.detach(), *params)
