"""The root finders on small problems whose roots are known."""

import pytest
import torch

from fenop.operators.constraints.factorisation import DenseSystems
from fenop.operators.constraints.roots import (
    LevenbergMarquardt,
    Linearisation,
    Newton,
    Stopping,
)


class Cubic:
    """``F(w) = A w + w³ - b`` per block, ``A`` symmetric positive definite: one root."""

    def __init__(self, batch=2, k=3, n=4, seed=0):
        gen = torch.Generator().manual_seed(seed)
        q = torch.randn(batch, k, n, n, generator=gen, dtype=torch.float64)
        self.a = q @ q.transpose(-1, -2) + n * torch.eye(n, dtype=torch.float64)
        self.root = torch.randn(batch, k, n, generator=gen, dtype=torch.float64)
        self.b = (self.a @ self.root[..., None])[..., 0] + self.root**3
        self.linearisations = 0

    def value(self, w):
        return (self.a @ w[..., None])[..., 0] + w**3 - self.b

    def linearised(self, w):
        self.linearisations += 1
        value = self.value(w)
        matrix = self.a + torch.diag_embed(3 * w**2)
        test = torch.ones(*w.shape, 1, dtype=w.dtype)
        return Linearisation(value, matrix, test, value.square().sum(-1))


class Rosenbrock:
    """Least squares of ``R(w) = (1 - w₁, 10 (w₂ - w₁²))``: the condition ``Jᵀ R``, the
    Gauss-Newton matrix ``Jᵀ J``; the minimum at ``(1, 1)``, where ``R = 0``."""

    def linearised(self, w):
        x, y = w[..., 0], w[..., 1]
        r = torch.stack([1 - x, 10 * (y - x**2)], dim=-1)
        jac = torch.stack(
            [
                torch.stack([-torch.ones_like(x), torch.zeros_like(x)], dim=-1),
                torch.stack([-20 * x, 10 * torch.ones_like(x)], dim=-1),
            ],
            dim=-2,
        )
        value = (jac.transpose(-1, -2) @ r[..., None])[..., 0]
        test = jac.transpose(-1, -2)
        return Linearisation(value, jac.transpose(-1, -2) @ jac, test, r.square().sum(-1))

    def value(self, w):
        return self.linearised(w).value


SYMMETRIC = DenseSystems(ridge=0.0, symmetric=True)
DATA = torch.ones(2, dtype=torch.float64)


@pytest.mark.parametrize("chord", [False, True])
def test_newton_and_chord_find_the_root(chord):
    problem = Cubic()
    finder = Newton(systems=SYMMETRIC, stopping=Stopping(max_iterations=50), chord=chord)
    result = finder.solve(problem, torch.zeros_like(problem.root), DATA)
    torch.testing.assert_close(result.solution, problem.root, rtol=1e-8, atol=1e-9)
    assert bool(result.converged.all())
    assert result.condition.shape == (2, 3) and bool((result.condition >= 1).all())
    if not chord:  # Newton's matrix is the last iterate's (chord keeps an earlier one)
        torch.testing.assert_close(result.matrix, problem.linearised(result.solution).matrix)


def test_newton_converges_quadratically_and_chord_saves_linearisations():
    counts = {}
    for chord in (False, True):
        problem = Cubic(seed=1)
        finder = Newton(systems=SYMMETRIC, stopping=Stopping(tolerance=1e-12), chord=chord)
        result = finder.solve(problem, torch.zeros_like(problem.root), DATA)
        counts[chord] = (int(result.iterations.max()), problem.linearisations)
    assert counts[False][0] <= 8  # quadratic: a handful of iterations from zero
    assert counts[True][1] < counts[False][1]  # chord: fewer linearisations


def test_levenberg_marquardt_minimises_rosenbrock():
    start = torch.tensor([[[-1.2, 1.0]], [[0.5, -0.5]]], dtype=torch.float64)
    finder = LevenbergMarquardt(
        systems=SYMMETRIC, stopping=Stopping(max_iterations=200, tolerance=1e-12)
    )
    result = finder.solve(Rosenbrock(), start, DATA)
    torch.testing.assert_close(result.solution, torch.ones_like(start), rtol=0, atol=1e-8)
    assert bool(result.converged.all())


def test_a_problem_that_does_not_converge_in_time_is_reported():
    problem = Cubic()
    finder = Newton(systems=SYMMETRIC, stopping=Stopping(max_iterations=1, tolerance=1e-14))
    result = finder.solve(problem, torch.zeros_like(problem.root), DATA)
    assert not bool(result.converged.any())
    assert bool((result.iterations == 1).all())


def test_a_converged_problem_is_left_as_it_is():
    problem = Cubic()
    start = problem.root.clone()
    start[0, 1] = 0.0  # one problem of six starts away from its root
    finder = Newton(systems=SYMMETRIC, stopping=Stopping(tolerance=1e-12))
    result = finder.solve(problem, start, DATA)
    moved = result.iterations > 0
    assert moved.tolist() == [[False, True, False], [False, False, False]]
    torch.testing.assert_close(result.solution[~moved], problem.root[~moved], rtol=0, atol=0)


class CubicByRows(Cubic):
    """A Cubic that gives the problems of some samples alone, and records the
    samples each evaluation saw."""

    def __init__(self, seen=None, **options):
        super().__init__(**options)
        self.seen = [] if seen is None else seen

    def rows(self, index):
        part = CubicByRows.__new__(CubicByRows)
        part.a, part.root, part.b = self.a[index], self.root[index], self.b[index]
        part.linearisations, part.seen = 0, self.seen
        return part

    def value(self, w):
        self.seen.append(len(w))
        return super().value(w)


@pytest.mark.parametrize("chord", [False, True])
def test_samples_that_converged_are_not_evaluated_again(chord):
    start = CubicByRows(batch=3).root.clone()
    start[1] = 0.0  # only the second sample's problems start away from their roots
    finder = Newton(systems=SYMMETRIC, stopping=Stopping(tolerance=1e-12), chord=chord)
    whole, by_rows = Cubic(batch=3), CubicByRows(batch=3)
    expected = finder.solve(whole, start, torch.ones(3, dtype=torch.float64))
    result = finder.solve(by_rows, start, torch.ones(3, dtype=torch.float64))
    torch.testing.assert_close(result.solution, expected.solution, rtol=0, atol=1e-15)
    assert result.iterations.tolist() == expected.iterations.tolist()
    assert result.converged.tolist() == expected.converged.tolist()
    # after the first, every evaluation saw the second sample alone
    assert by_rows.seen[0] == 3 and set(by_rows.seen[1:]) == {1} and len(by_rows.seen) > 2
