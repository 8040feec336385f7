import numpy as np
import pytest
import skfem

from fenop.fem import PointLocator, l_shape, unit_cube, unit_interval, unit_square
from tests.helpers import l_shape_interior_points


def _contains(mesh, cell: int, point: np.ndarray) -> bool:
    """Independent check through scikit-fem's inverse mapping of that one cell."""
    reference = mesh._mapping().invF(point[:, None, None], tind=np.array([cell]))[:, 0, 0]
    if isinstance(mesh, skfem.MeshQuad1):
        return bool(np.all(reference >= -1e-9) and np.all(reference <= 1 + 1e-9))
    return bool(np.all(reference >= -1e-9) and reference.sum() <= 1 + 1e-9)


def test_l_shape_points_are_found_inside_and_flagged_outside(rng):
    mesh = l_shape(9)
    inside = l_shape_interior_points(rng, 500)
    cells = PointLocator(mesh)(inside)
    assert (cells >= 0).all()
    assert all(_contains(mesh, c, p) for c, p in zip(cells, inside, strict=True))

    cut_out = rng.uniform([1e-6, -1 + 1e-6], [1 - 1e-6, -1e-6], size=(200, 2))
    beyond = rng.uniform(1.001, 2.0, size=(50, 2))
    assert (PointLocator(mesh)(np.concatenate([cut_out, beyond])) == -1).all()


def test_points_on_the_boundary_count_as_inside():
    mesh = l_shape(5)
    t = np.linspace(-1, 1, 41)
    on_boundary = np.concatenate(
        [
            np.stack([t, -np.ones_like(t)], 1)[t <= 0],  # bottom edge of the left part
            np.stack([-np.ones_like(t), t], 1),  # left edge
            np.stack([t, np.ones_like(t)], 1),  # top edge
            np.stack([np.zeros_like(t), t], 1)[t <= 0],  # re-entrant vertical edge
            np.stack([t, np.zeros_like(t)], 1)[t >= 0],  # re-entrant horizontal edge
        ]
    )
    assert (PointLocator(mesh)(on_boundary) >= 0).all()


@pytest.mark.parametrize("mesh", [unit_square(6, cell="quad"), unit_cube(4), unit_interval(7)])
def test_other_cell_types(mesh, rng):
    dim = mesh.dim()
    points = rng.uniform(0, 1, size=(300, dim))
    cells = PointLocator(mesh)(points)
    assert (cells >= 0).all()
    if dim == 2:
        assert all(_contains(mesh, c, p) for c, p in zip(cells, points, strict=True))
    assert (PointLocator(mesh)(points + 1.5) == -1).all()


def test_agrees_with_scikit_fem_element_finder_on_inside_points(rng):
    mesh = unit_square(9)
    points = rng.uniform(0, 1, size=(400, 2))
    ours = PointLocator(mesh)(points)
    theirs = mesh.element_finder()(*points.T)
    # a point on a shared edge may be given to either neighbour; both must contain it
    differ = ours != theirs
    assert all(_contains(mesh, c, p) for c, p in zip(ours[differ], points[differ], strict=True))


def test_rejects_points_of_the_wrong_dimension():
    with pytest.raises(ValueError, match=r"\(n_points, 2\)"):
        PointLocator(unit_square(3))(np.zeros((4, 3)))
