"""Block tridiagonal factorisations of banded systems, against dense solves."""

import numpy as np
import pytest
import torch

from fenop.operators.constraints.banded import BandedFactorisation, BandedLU, BandLayout


def _banded(size: int, width: int, batch: int, seed: int) -> np.ndarray:
    """``(batch, size, size)`` symmetric positive definite matrices of bandwidth ``width``."""
    rng = np.random.default_rng(seed)
    out = np.zeros((batch, size, size))
    for k in range(1, width + 1):
        band = rng.uniform(-1, 1, (batch, size - k))
        out[:, np.arange(size - k), np.arange(k, size)] = band
        out[:, np.arange(k, size), np.arange(size - k)] = band
    out[:, np.arange(size), np.arange(size)] = 2 * width + rng.uniform(0, 1, (batch, size))
    return out


def _skewed(size: int, width: int, batch: int, seed: int) -> np.ndarray:
    """:func:`_banded` plus a skew-symmetric part as large as its symmetric one off
    the diagonal: not symmetric, with a positive definite symmetric part."""
    rng = np.random.default_rng(seed + 100)
    out = _banded(size, width, batch, seed)
    for k in range(1, width + 1):
        skew = rng.uniform(-1, 1, (batch, size - k))
        out[:, np.arange(size - k), np.arange(k, size)] += skew
        out[:, np.arange(k, size), np.arange(size - k)] -= skew
    return out


@pytest.mark.parametrize("kind", ["cholesky", "lu"])
@pytest.mark.parametrize(("size", "width"), [(10, 3), (12, 3), (7, 1), (5, 6), (1, 1)])
def test_banded_solves_are_dense_solves(kind, size, width):
    # blocks of `width` unknowns, the last padded where size is not a multiple of it
    make, factorised = {"cholesky": (_banded, BandedFactorisation), "lu": (_skewed, BandedLU)}[kind]
    matrices = make(size, min(width, size - 1) if size > 1 else 0, 3, seed=size + width)
    if kind == "lu" and size > 1:
        assert not np.allclose(matrices, matrices.transpose(0, 2, 1))
    rows, cols = np.nonzero(np.abs(matrices).sum(axis=0))
    layout = BandLayout(rows, cols, size)
    entries = torch.from_numpy(matrices[:, rows, cols])
    ridge = torch.full((3, size), 0.5, dtype=torch.float64)
    scale = torch.rand(3, size, dtype=torch.float64) + 0.5
    rhs = torch.randn(3, size, dtype=torch.float64)
    w, ok = factorised(layout, entries, ridge, scale).solve(rhs)
    # w = S (A + ridge I)⁻¹ S rhs
    systems = torch.from_numpy(matrices) + 0.5 * torch.eye(size, dtype=torch.float64)
    expected = scale * torch.linalg.solve(systems, scale * rhs)
    torch.testing.assert_close(w, expected, rtol=1e-11, atol=1e-13)
    assert ok.tolist() == [True] * 3


def test_failed_and_non_finite_systems_are_reported_and_give_no_nan():
    matrices = _banded(9, 2, 3, seed=0)
    matrices[1, 4, 4] = -100.0  # indefinite: a block's Cholesky fails
    rows, cols = np.nonzero(np.abs(matrices).sum(axis=0))
    entries = torch.from_numpy(matrices[:, rows, cols])
    entries[2, 0] = float("nan")
    zero = torch.zeros(3, 9, dtype=torch.float64)
    w, ok = BandedFactorisation(BandLayout(rows, cols, 9), entries, zero).solve(
        torch.ones(3, 9, dtype=torch.float64)
    )
    assert ok.tolist() == [True, False, False]
    assert torch.isfinite(w[:2]).all()


def test_banded_solves_pass_gradcheck():
    matrices = _banded(8, 2, 2, seed=1)
    rows, cols = np.nonzero(np.abs(matrices).sum(axis=0))
    layout = BandLayout(rows, cols, 8)
    # symmetric perturbations: each entry above the diagonal moves its mirror too
    mirror = {(r, c): i for i, (r, c) in enumerate(zip(rows, cols, strict=True))}
    to_full = torch.tensor([mirror[min(r, c), max(r, c)] for r, c in zip(rows, cols, strict=True)])
    half = torch.from_numpy(matrices[:, rows, cols]).requires_grad_(True)
    rhs = torch.randn(2, 8, dtype=torch.float64, requires_grad=True)
    zero = torch.zeros(2, 8, dtype=torch.float64)

    def solved(half, rhs):
        return BandedFactorisation(layout, half[:, to_full], zero).solve(rhs)[0]

    assert torch.autograd.gradcheck(solved, (half, rhs))


def test_banded_lu_reports_singular_and_non_finite_systems_without_nan():
    matrices = _skewed(9, 2, 3, seed=0)
    matrices[1, :3, :3] = 0.0  # the first block singular
    rows, cols = np.nonzero(np.abs(_skewed(9, 2, 1, seed=0)[0]))
    entries = torch.from_numpy(matrices[:, rows, cols])
    entries[2, 0] = float("nan")
    zero = torch.zeros(3, 9, dtype=torch.float64)
    w, ok = BandedLU(BandLayout(rows, cols, 9), entries, zero).solve(torch.ones(3, 9).double())
    assert ok.tolist() == [True, False, False]
    assert torch.isfinite(w).all()


def test_banded_lu_solves_pass_gradcheck():
    matrices = _skewed(8, 2, 2, seed=1)
    rows, cols = np.nonzero(np.abs(matrices).sum(axis=0))
    layout = BandLayout(rows, cols, 8)
    entries = torch.from_numpy(matrices[:, rows, cols]).requires_grad_(True)
    rhs = torch.randn(2, 8, dtype=torch.float64, requires_grad=True)
    zero = torch.zeros(2, 8, dtype=torch.float64)

    def solved(entries, rhs):
        return BandedLU(layout, entries, zero).solve(rhs)[0]

    assert torch.autograd.gradcheck(solved, (entries, rhs))
