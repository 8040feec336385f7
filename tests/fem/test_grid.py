import numpy as np
import pytest

from fenop.fem import Grid


def test_points_follow_ij_order():
    grid = Grid(lower=(0.0, -1.0), upper=(2.0, 1.0), shape=(3, 5))
    points = grid.points().reshape(3, 5, 2)
    np.testing.assert_array_equal(points[:, 0, 0], [0.0, 1.0, 2.0])
    np.testing.assert_array_equal(points[0, :, 1], [-1.0, -0.5, 0.0, 0.5, 1.0])


@pytest.mark.parametrize("dim", [1, 2, 3])
def test_multilinear_interpolation_is_exact_for_multilinear_functions(dim, rng):
    grid = Grid(lower=(-1.0,) * dim, upper=(2.0,) * dim, shape=tuple(range(4, 4 + dim)))

    def f(x):  # x: (n, dim); a product of affine factors is multilinear
        return np.prod(0.5 + x * np.arange(1, dim + 1), axis=1)

    points = rng.uniform(-1, 2, size=(200, dim))
    points[:5] = grid.upper  # the upper corner uses the last cell
    matrix = grid.interpolation_matrix(points)
    np.testing.assert_allclose(matrix @ f(grid.points()), f(points), atol=1e-12)
    np.testing.assert_allclose(matrix.sum(axis=1), 1.0, atol=1e-14)
    assert matrix.shape == (200, grid.size)


def test_rejects_bad_arguments():
    grid = Grid(lower=(0.0, 0.0), upper=(1.0, 1.0), shape=(4, 4))
    with pytest.raises(ValueError, match="inside the grid's box"):
        grid.interpolation_matrix(np.array([[0.5, 1.1]]))
    with pytest.raises(ValueError, match=r"\(n_points, 2\)"):
        grid.interpolation_matrix(np.zeros((3, 3)))
    with pytest.raises(ValueError, match="at least 2"):
        Grid(lower=(0.0,), upper=(1.0,), shape=(1,))
    with pytest.raises(ValueError, match="must exceed"):
        Grid(lower=(0.0, 1.0), upper=(1.0, 1.0), shape=(4, 4))
