import pytest
import skfem
from skfem.helpers import dot, grad

from fenop.fem import FunctionSpace, l_shape, unit_cube, unit_square
from fenop.fem.weighted_stiffness import WeightedStiffness


@pytest.mark.parametrize(
    "space",
    [
        FunctionSpace(l_shape(7)),
        FunctionSpace(l_shape(5), degree=2),
        FunctionSpace(unit_square(5, cell="quad")),
        FunctionSpace(unit_cube(3)),
    ],
    ids=["P1", "P2", "Q1", "tet-P1"],
)
def test_matches_scikit_fem_assembly(space, rng):
    form = skfem.BilinearForm(lambda u, v, w: w["a"] * dot(grad(u), grad(v)))
    weighted = WeightedStiffness(space)
    for _ in range(2):
        a = rng.uniform(0.5, 12.0, size=space.n_dofs)
        expected = form.assemble(space.basis, a=space.basis.interpolate(a))
        got = weighted(a)
        assert abs(got - expected).max() < 1e-12 * abs(expected).max()
        assert got.shape == expected.shape
