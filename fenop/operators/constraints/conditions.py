"""The conditions that pick a constraint's coefficients, as small objects.

With the basis ``χ_k Φ`` of expert ``k`` (``Φ`` restricted to its extended set;
the whole domain for a global solve) and ``J`` the residual's Jacobian, the
coefficients ``w`` of the correction ``Σ_j w_j χ_k Φ_j`` satisfy

- :class:`Galerkin`: ``(χ_k Φ)ᵀ R(u) = 0`` on the extended set, the residual
  orthogonal to the basis. For an elliptic problem this is the energy-norm best
  fit in the span (Céa's lemma); its matrix ``(χ_k Φ)ᵀ J (χ_k Φ)`` is the
  condition's exact Jacobian.
- :class:`LeastSquares`: ``min_w |R(u)|²`` on the extended set and its halo (where
  the correction moves ``R``), the objective of Chalapathi et al. (ICLR 2024):
  ``(J χ_k Φ)ᵀ R(u) = 0``, with the Gauss-Newton matrix ``(J χ_k Φ)ᵀ (J χ_k Φ)``.

Each says which fields test the residual, which rows it reads, its matrix, and
what a solver may assume of it. The layers hold one (``layer.rule``) and never
ask which it is.
"""

from __future__ import annotations

import torch

from fenop.operators.constraints.fields import _IndexSets


class Galerkin:
    """``(χ_k Φ)ᵀ R(u) = 0``: the residual tested by the basis itself."""

    name = "galerkin"
    # its rows are the extended set: the halo, where the correction also moves R,
    # is not read
    reads_halo = False
    # the condition is R tested by fixed fields: it is evaluated without J, so
    # chord iterations can keep a matrix and evaluate the condition alone
    needs_jacobian = False
    # (χ_k Φ)ᵀ J (χ_k Φ) at the root is the condition's exact Jacobian: the
    # implicit gradient needs no second derivatives
    exact_matrix = True

    def symmetric(self, residual) -> bool:
        """Whether the matrices are symmetric: where ``J`` is on the free DOFs."""
        return bool(residual.symmetric)

    def test_fields(self, local: torch.Tensor, applied: torch.Tensor) -> torch.Tensor:
        """The fields that test ``R`` on the rows, from ``χ_k Φ`` ``(B, k, N, m)`` and
        ``J (χ_k Φ)`` ``(B, k, N, m_r)``: ``χ_k Φ``."""
        return local

    def colour_system(self, local, applied, extended: _IndexSets, rows: _IndexSets, place):
        """A colour's test fields, the index sets they test ``R`` on, its matrix and
        what its gradient needs, for the sweeps of an affine residual whose experts'
        rows include their halo (``applied = J (χ_k Φ)`` on the rows ``(B, k, N, m_r)``,
        ``local = χ_k Φ`` on the extended sets ``(B, k, N, m)``, ``place`` where each
        extended set sits in its rows, ``(k, m)``). The test fields live on the
        extended sets: ``J (χ_k Φ)`` there is taken from the rows (padding reads
        garbage that meets the test fields' zeros). Returns the test fields, their
        index sets, the matrix ``(B, k, N, N)`` and ``(index, J χ_k Φ on the extended
        set)``."""
        index = place[:, None].expand(*local.shape[:-1], -1)
        on_extended = applied.gather(-1, index)
        return local, extended, local @ on_extended.transpose(-1, -2), (index, on_extended)

    def colour_backward(
        self, grad_test, grad_matrix, local, test, placed, grad_local, grad_applied
    ):
        """The gradients of a colour's ``local`` and ``applied`` (accumulated in
        ``grad_local`` and ``grad_applied``) plus those through its test fields
        (``grad_test``) and its matrix (``grad_matrix`` ``(B, k, N, N)``), for
        :meth:`colour_system`'s ``M = (χ_k Φ) (J χ_k Φ on the extended set)ᵀ``."""
        index, on_extended = placed
        grad_local = grad_local + grad_test + grad_matrix @ on_extended
        grad_applied = grad_applied.scatter_add(-1, index, grad_matrix.transpose(-1, -2) @ local)
        return grad_local, grad_applied


class LeastSquares:
    """``min_w |R(u)|²`` on the rows: ``(J χ_k Φ)ᵀ R(u) = 0``, Gauss-Newton's matrix."""

    name = "least_squares"
    reads_halo = True
    needs_jacobian = True
    exact_matrix = False  # Gauss-Newton's matrix lacks R's second derivatives

    def symmetric(self, residual) -> bool:
        """The normal equations always are."""
        return True

    def test_fields(self, local: torch.Tensor, applied: torch.Tensor) -> torch.Tensor:
        """``J (χ_k Φ)`` on the rows ``(B, k, N, m_r)`` (see :meth:`Galerkin.test_fields`)."""
        return applied

    def colour_system(self, local, applied, extended: _IndexSets, rows: _IndexSets, place):
        """As :meth:`Galerkin.colour_system`: the test fields ``J (χ_k Φ)`` on the
        rows, the rows, ``A Aᵀ`` and ``None``."""
        return applied, rows, applied @ applied.transpose(-1, -2), None

    def colour_backward(
        self, grad_test, grad_matrix, local, test, placed, grad_local, grad_applied
    ):
        """As :meth:`Galerkin.colour_backward`, for ``M = A Aᵀ`` with ``A`` the test fields."""
        grad_matrix = grad_matrix + grad_matrix.transpose(-1, -2)
        return grad_local, grad_applied + grad_test + grad_matrix @ test


RULES = {rule.name: rule for rule in (Galerkin(), LeastSquares())}
