"""Fields moved between the whole mesh and the experts' own DOF sets, and the
contractions of basis fields with coefficients and residuals that the solves are
made of."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torch.autograd import forward_ad


def _combined(w: torch.Tensor, fields: torch.Tensor) -> torch.Tensor:
    """``Σ_j w_j fields_j``: ``(B, k, N)``, ``(B, k, N, m)`` -> ``(B, k, m)``."""
    return _Contraction.apply(w, fields, False)


def _tested(test: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """``test_j · r`` for each field: ``(B, k, N, m)``, ``(B, k, m)`` -> ``(B, k, N)``."""
    return _Contraction.apply(r, test, True)


class _Contraction(torch.autograd.Function):
    """``fields`` ``(..., N, m)`` contracted with a vector ``x``: along ``N`` (``x``
    ``(..., N)``, giving ``(..., m)``) or, ``tested``, along ``m`` (``x`` ``(..., m)``,
    giving ``(..., N)``). Both ways a batched matrix product, 2-3x faster than an
    elementwise product and a sum on the CPU; but the gradient with respect to
    ``fields`` is an outer product, which a batched product forms 2.5x slower than
    an elementwise one (measured at 5e4 DOFs), so the backward is written out."""

    @staticmethod
    def forward(x, fields, tested):
        if tested:
            return (fields @ x[..., None])[..., 0]
        return (x[..., None, :] @ fields)[..., 0, :]

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, fields, ctx.tested = inputs
        ctx.save_for_backward(x, fields)
        ctx.inputs = (x, fields)  # for forward mode

    @staticmethod
    def backward(ctx, grad):
        x, fields = ctx.saved_tensors
        grad_x = grad_fields = None
        if ctx.tested:  # out_j = fields_j · x
            if ctx.needs_input_grad[0]:
                grad_x = _Contraction.apply(grad, fields, False)
            if ctx.needs_input_grad[1]:
                grad_fields = grad[..., :, None] * x[..., None, :]
        else:  # out = Σ_j x_j fields_j
            if ctx.needs_input_grad[0]:
                grad_x = _Contraction.apply(grad, fields, True)
            if ctx.needs_input_grad[1]:
                grad_fields = x[..., :, None] * grad[..., None, :]
        return grad_x, grad_fields, None

    @staticmethod
    def jvp(ctx, x_tangent, fields_tangent, _):
        x, fields = ctx.inputs
        out = 0.0
        if x_tangent is not None:
            out = out + _Contraction.apply(x_tangent, fields, ctx.tested)
        if fields_tangent is not None:
            out = out + _Contraction.apply(x, fields_tangent, ctx.tested)
        return out


def _basis_in_float64(basis: torch.Tensor, fixed: torch.Tensor, *, node_major: bool):
    """``basis`` ``(B, N, n)`` in float64, zero at the DOFs ``fixed`` (indices, the
    Dirichlet DOFs); with ``node_major`` stored as ``(B, n, N)`` (returned as its
    transposed view)."""
    return _Float64Basis.apply(basis, fixed, node_major)


class _Float64Basis(torch.autograd.Function):
    """:func:`_basis_in_float64`, with a backward pass that casts the gradient back in
    its own layout and zeroes it in the basis' precision: autograd's, through a
    node-major cast and a mask, masked the float64 gradient across its strides
    (14 ms of a 290 ms training step at 6.6e4 DOFs, batch 8, N = 8, against 3).
    Both passes zero the Dirichlet DOFs alone (``index_fill_``), where a mask of
    every DOF reads and writes the whole ``(B, N, n)`` array (6 ms each way at
    6.6e4 DOFs, batch 8, N = 16)."""

    @staticmethod
    def forward(ctx, basis, fixed, node_major):
        ctx.save_for_backward(fixed)
        ctx.dtype = basis.dtype
        if not node_major:
            return basis.to(torch.float64, copy=True).index_fill_(2, fixed, 0.0)
        phi = basis.transpose(1, 2).to(
            torch.float64, memory_format=torch.contiguous_format, copy=True
        )
        return phi.index_fill_(1, fixed, 0.0).transpose(1, 2)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        (fixed,) = ctx.saved_tensors
        grad = grad.to(ctx.dtype, memory_format=torch.contiguous_format, copy=True)
        return grad.index_fill_(2, fixed, 0.0), None, None


def _jvp(fn, primal: torch.Tensor, tangent: torch.Tensor) -> torch.Tensor:
    """``J_fn(primal) tangent`` by forward mode (``torch.autograd.forward_ad``),
    ``primal`` broadcast against ``tangent``; differentiable by reverse mode (the
    layer's gradients go through it)."""
    with forward_ad.dual_level():
        # forward mode writes into its dual tensors: no expanded (aliased) ones
        dual = forward_ad.make_dual(primal.expand_as(tangent).contiguous(), tangent.contiguous())
        return forward_ad.unpack_dual(fn(dual)).tangent


class _IndexSets(nn.Module):
    """The DOF sets of ``k`` experts, padded to one length ``m``, and the moves between
    global fields and the experts' own: ``(B, ..., n) -> (B, k, ..., m)`` and back.
    ``sets=None`` is one set of every DOF (the global solve), moved without copies;
    ``keep`` ``(k,)`` bool, where given, makes the sets it marks False all padding.

    Attributes:
        index: ``(k, m)`` DOF indices (padding points at DOF 0).
        valid: ``(k, m)`` bool, False on padding.
    """

    def __init__(self, sets: list[np.ndarray] | None, n_dofs: int, *, keep=None):
        super().__init__()
        self.n_dofs, self.everything = n_dofs, sets is None
        if self.everything:
            return
        m = max(len(s) for s in sets)
        index = np.zeros((len(sets), m), dtype=np.int64)
        valid = np.zeros((len(sets), m), dtype=bool)
        for k, dofs in enumerate(sets):
            index[k, : len(dofs)], valid[k, : len(dofs)] = dofs, True
        if keep is not None:  # sets not kept are all padding
            valid &= np.asarray(keep, dtype=bool)[:, None]
        self.register_buffer("index", torch.from_numpy(index), persistent=False)
        self.register_buffer("valid", torch.from_numpy(valid), persistent=False)

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, ..., n)`` -> ``(B, k, ..., m)``, zero on padding."""
        if self.everything:
            return x[:, None]
        return _IndexSets.gather_all([self], x)[0]

    @staticmethod
    def gather_all(sets: list[_IndexSets], x: torch.Tensor) -> list[torch.Tensor]:
        """``[s.gather(x) for s in sets]`` in one indexing of ``x``, whose backward
        fills one zero array of ``x``'s size, not one per set. At 5e4 DOFs such an
        array of a basis is tens of MB, memory new to the process each time, whose
        page faults cost more than the zeroing (the profiler's largest item in the
        experts' backward pass)."""
        if any(s.everything for s in sets):
            return [s.gather(x) for s in sets]
        picked = x.index_select(-1, torch.cat([s.index.reshape(-1) for s in sets]))
        parts = picked.split([s.index.numel() for s in sets], dim=-1)
        # contiguous: the batched products that use the experts' fields would copy
        # a strided view each time (measured: a slower backward pass)
        return [
            (part.unflatten(-1, s.index.shape) * s.valid).movedim(-2, 1).contiguous()
            for part, s in zip(parts, sets, strict=True)
        ]

    def scatter(self, y: torch.Tensor) -> torch.Tensor:
        """``(B, k, ..., m)`` -> ``(B, ..., n)``, the sum of the experts' values at each
        DOF (padding ignored)."""
        if self.everything:
            return y[:, 0]
        shape = (len(self.index),) + (1,) * (y.ndim - 3) + (self.index.shape[1],)
        flat = (y * self.valid.reshape(shape)).movedim(1, -2).flatten(-2)  # (B, ..., k m)
        out = y.new_zeros(*flat.shape[:-1], self.n_dofs)
        return out.index_add_(-1, self.index.reshape(-1), flat)


class _Constant(nn.Module):
    """A constant tensor that moves with its module (a buffer in a ModuleList)."""

    def __init__(self, value: torch.Tensor):
        super().__init__()
        self.register_buffer("value", value, persistent=False)
