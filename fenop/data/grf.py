"""Gaussian random fields with covariance σ² (-Δ + τ² I)^(-α) on a box, Neumann conditions.

The field is the Karhunen-Loève series in the Laplacian's Neumann eigenfunctions
on the box ``[lower, upper]`` (products of cosines, the basis of the discrete
cosine transform):

    g(x) = Σ_k σ λ_k^(-α/2) ξ_k φ_k(x),   λ_k = π² Σ_j (k_j / L_j)² + τ²,   ξ_k ~ N(0, 1),

with ``φ_k`` orthonormal on the box, ``k`` running over ``n_modes`` wave numbers
per axis, and the constant mode left out so that the field has mean zero. With
σ = τ^(α-1) on the unit square this is the recipe of the FNO paper's Darcy data
(its MATLAB generator applies a scaled inverse DCT to the same coefficients).

Because the series is evaluated pointwise, a sample is one function of space: the
same (seed, index) gives the same field on every mesh and grid of the box, which
is what lets a model be tested on meshes it was not trained on.

>>> import numpy as np
>>> grf = GaussianRandomField(lower=(0.0, 0.0), upper=(1.0, 1.0))
>>> points = np.array([[0.25, 0.5], [0.75, 0.5]])
>>> a = grf.sample(points, seed=0, index=3)
>>> b = grf.sample(points[::-1], seed=0, index=3)
>>> bool(np.allclose(a, b[::-1]))
True
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def sample_rng(seed: int, index: int) -> np.random.Generator:
    """The random generator of sample ``index`` of a data set seeded with ``seed``.

    Each sample draws from its own stream, so sample ``i`` depends only on
    ``(seed, i)``: the same whatever the number of workers or the order of work.
    """
    return np.random.default_rng([int(seed), int(index)])


class GaussianRandomField:
    """Zero-mean Gaussian random fields on a box (see the module docstring).

    Args:
        lower, upper: corners of the box, each of length ``dim``.
        alpha: smoothness exponent α (> dim / 2 for a continuous field).
        tau: inverse length scale τ.
        sigma: amplitude σ; default τ^(α-1), the FNO recipe's.
        n_modes: wave numbers per axis (0 .. n_modes - 1).
    """

    def __init__(
        self,
        lower: Sequence[float],
        upper: Sequence[float],
        *,
        alpha: float = 2.0,
        tau: float = 3.0,
        sigma: float | None = None,
        n_modes: int = 32,
    ):
        self.lower = np.asarray(lower, dtype=np.float64)
        self.upper = np.asarray(upper, dtype=np.float64)
        if self.lower.shape != self.upper.shape or self.lower.ndim != 1:
            raise ValueError(f"`lower` and `upper` must be two points, got {lower} and {upper}")
        if not np.all(self.upper > self.lower):
            raise ValueError(f"`upper` {upper} must exceed `lower` {lower} on every axis")
        if alpha <= 0 or tau <= 0:
            raise ValueError(f"`alpha` and `tau` must be positive, got {alpha} and {tau}")
        if int(n_modes) < 2:
            raise ValueError(f"`n_modes` must be at least 2, got {n_modes}")
        self.dim = len(self.lower)
        self.alpha, self.tau, self.n_modes = float(alpha), float(tau), int(n_modes)
        self.sigma = float(tau ** (alpha - 1.0) if sigma is None else sigma)

    def parameters(self) -> dict:
        """The field's parameters, JSON-ready (the box is implied by the mesh)."""
        return {"alpha": self.alpha, "tau": self.tau, "sigma": self.sigma, "n_modes": self.n_modes}

    def standard_deviations(self) -> np.ndarray:
        """σ λ_k^(-α/2) of each mode, ``(n_modes,) * dim``; 0 for the constant mode."""
        k = np.arange(self.n_modes)
        lengths = self.upper - self.lower
        eig = sum(
            np.pi**2 * (k / lengths[j]).reshape([-1 if i == j else 1 for i in range(self.dim)]) ** 2
            for j in range(self.dim)
        )
        std = self.sigma * (eig + self.tau**2) ** (-self.alpha / 2)
        std[(0,) * self.dim] = 0.0
        return std

    def eigenfunctions(self, points: np.ndarray, axis: int) -> np.ndarray:
        """The 1-D orthonormal cosines of ``axis`` at ``points``: ``(n_points, n_modes)``."""
        length = self.upper[axis] - self.lower[axis]
        k = np.arange(self.n_modes)
        scale = np.where(k == 0, np.sqrt(1.0 / length), np.sqrt(2.0 / length))
        return scale * np.cos(np.pi * np.outer(points[:, axis] - self.lower[axis], k) / length)

    def coefficients(self, rng: np.random.Generator) -> np.ndarray:
        """One draw of the series' coefficients, ``(n_modes,) * dim``."""
        return self.standard_deviations() * rng.standard_normal((self.n_modes,) * self.dim)

    def at(self, points: np.ndarray) -> FieldEvaluator:
        """An evaluator of this field's series at ``points`` ``(n_points, dim)``.

        It holds the eigenfunctions at the points, so evaluating many samples at one
        point set (the DOFs of a mesh) costs one small matrix product each.
        """
        points = np.asarray(points, dtype=np.float64)
        if points.ndim != 2 or points.shape[1] != self.dim:
            raise ValueError(f"`points` must have shape (n_points, {self.dim}), got {points.shape}")
        return FieldEvaluator([self.eigenfunctions(points, axis) for axis in range(self.dim)])

    def evaluate(self, coefficients: np.ndarray, points: np.ndarray) -> np.ndarray:
        """The series with ``coefficients`` at ``points`` ``(n_points, dim)`` -> ``(n_points,)``."""
        return self.at(points)(coefficients)

    def sample(self, points: np.ndarray, *, seed: int, index: int) -> np.ndarray:
        """Sample ``index`` of the stream ``seed`` at ``points`` ``(n_points, dim)``."""
        return self.evaluate(self.coefficients(sample_rng(seed, index)), points)


class FieldEvaluator:
    """Evaluates cosine series at a fixed point set (see :meth:`GaussianRandomField.at`).

    Args:
        eigenfunctions: per axis, the 1-D eigenfunctions at the points ``(n_points, n_modes)``.
    """

    def __init__(self, eigenfunctions: list[np.ndarray]):
        self.eigenfunctions = eigenfunctions

    def __call__(self, coefficients: np.ndarray) -> np.ndarray:
        """``(n_modes,) * dim`` coefficients -> ``(n_points,)`` values."""
        first, *rest = self.eigenfunctions
        # Contract one axis at a time: cost n_points * n_modes^dim, never n_modes^(2 dim).
        result = (first @ coefficients.reshape(coefficients.shape[0], -1)).reshape(
            first.shape[0], *coefficients.shape[1:]
        )
        for basis in rest:
            result = np.einsum("pk,pk...->p...", basis, result)
        return result
