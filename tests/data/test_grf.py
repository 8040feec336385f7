import numpy as np
import pytest
import scipy.fft

from fenop.data.grf import GaussianRandomField, sample_rng


@pytest.mark.parametrize(
    ("lower", "upper"),
    [((0.0, 0.0), (1.0, 1.0)), ((-1.0,), (1.0,))],
    ids=["unit-square", "interval-of-length-2"],
)
def test_empirical_spectrum_matches_the_prescribed_covariance(lower, upper):
    """Coefficients recovered with scipy's DCT-II have variance σ² (π²|k/L|² + τ²)^(-α).

    At the N cell midpoints of each axis the orthonormal DCT-II basis is the field's
    cosine basis sampled, times sqrt(L / N) per axis, so DCT coefficients divided by
    that factor are exactly the series coefficients (for k < N).
    """
    alpha, tau, n_modes, n_points, n_samples = 2.0, 3.0, 12, 32, 400
    grf = GaussianRandomField(lower, upper, alpha=alpha, tau=tau, n_modes=n_modes)
    dim, length = len(lower), upper[0] - lower[0]
    axis = lower[0] + length * (np.arange(n_points) + 0.5) / n_points
    grid = np.stack(np.meshgrid(*[axis] * dim, indexing="ij"), axis=-1).reshape(-1, dim)
    evaluator = grf.at(grid)
    coefficients = []
    for index in range(n_samples):
        field = evaluator(grf.coefficients(sample_rng(7, index))).reshape((n_points,) * dim)
        dct = scipy.fft.dctn(field, type=2, norm="ortho") * (length / n_points) ** (dim / 2)
        coefficients.append(dct[(slice(0, n_modes),) * dim])
    variance = np.var(coefficients, axis=0, mean=0.0)

    k = np.stack(np.meshgrid(*[np.arange(n_modes)] * dim, indexing="ij"))
    expected = tau ** (2 * (alpha - 1)) * (np.pi**2 * (k**2).sum(axis=0) / length**2 + tau**2) ** (
        -alpha
    )
    constant = (0,) * dim
    assert variance[constant] == pytest.approx(0.0, abs=1e-20)  # the mean is removed
    expected[constant] = variance[constant] = 1.0
    ratio = variance / expected
    # Each ratio is chi^2 with n_samples degrees of freedom over n_samples: mean 1,
    # standard deviation sqrt(2 / n_samples) = 0.071. Allow 5 of those per mode, and
    # 4 standard errors for the mean over all modes.
    sd = np.sqrt(2 / n_samples)
    assert np.abs(ratio - 1).max() < 5 * sd
    assert abs(ratio.mean() - 1) < 4 * sd / np.sqrt(ratio.size)
    # Far outside sampling error, a wrong exponent would be caught:
    assert np.abs(variance / (expected * (1 + (k**2).sum(axis=0)) ** 0.5) - 1).max() > 5 * sd


def test_samples_are_reproducible_and_independent_of_the_point_set(rng):
    grf = GaussianRandomField((0.0, 0.0), (1.0, 1.0))
    points = rng.uniform(0, 1, size=(50, 2))
    first = grf.sample(points, seed=3, index=10)
    np.testing.assert_array_equal(first, grf.sample(points, seed=3, index=10))
    np.testing.assert_allclose(grf.sample(points[:7], seed=3, index=10), first[:7], atol=1e-14)
    assert not np.allclose(first, grf.sample(points, seed=3, index=11))
    assert not np.allclose(first, grf.sample(points, seed=4, index=10))


def test_rejects_bad_arguments():
    with pytest.raises(ValueError, match="must exceed"):
        GaussianRandomField((0.0, 1.0), (1.0, 1.0))
    with pytest.raises(ValueError, match="positive"):
        GaussianRandomField((0.0,), (1.0,), alpha=-1.0)
    with pytest.raises(ValueError, match=r"\(n_points, 2\)"):
        GaussianRandomField((0.0, 0.0), (1.0, 1.0)).at(np.zeros((3, 3)))
