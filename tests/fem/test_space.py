import numpy as np
import pytest
import skfem
import torch

from fenop.fem import FunctionSpace, l_shape, unit_cube, unit_interval, unit_square
from tests.helpers import l_shape_interior_points, loglog_slope

# A polynomial of total degree 1 and one of degree 2, and the bi-quadratic for Q2.
LINEAR = lambda x: 0.3 + 1.7 * x[0] - 2.1 * x[1]  # noqa: E731
QUADRATIC = lambda x: 0.3 + x[0] - 2 * x[1] + 1.5 * x[0] ** 2 - x[0] * x[1] + 0.7 * x[1] ** 2  # noqa: E731
BIQUADRATIC = lambda x: (1 + x[0] - 2 * x[0] ** 2) * (0.5 - x[1] + 3 * x[1] ** 2)  # noqa: E731
BILINEAR = lambda x: (1 + 2 * x[0]) * (0.5 - x[1])  # noqa: E731


@pytest.mark.parametrize(("degree", "f"), [(1, LINEAR), (2, QUADRATIC)])
def test_reproduces_polynomials_of_its_degree_on_the_l_shape(degree, f, rng):
    space = FunctionSpace(l_shape(7), degree=degree)
    points = l_shape_interior_points(rng, 1000)
    values = space.evaluate(space.interpolate(f), points).numpy()
    np.testing.assert_allclose(values, f(points.T), rtol=0, atol=1e-12)


@pytest.mark.parametrize(
    ("mesh", "degree", "f"),
    [
        (unit_square(5, cell="quad"), 1, BILINEAR),
        (unit_square(5, cell="quad"), 2, BIQUADRATIC),
        (unit_interval(6), 1, lambda x: 2.0 - 3.0 * x[0]),
        (unit_interval(6), 2, lambda x: 2.0 - 3.0 * x[0] + 5 * x[0] ** 2),
        (unit_cube(4), 1, lambda x: 1 + x[0] - 2 * x[1] + 3 * x[2]),
        (unit_cube(3), 2, lambda x: x[0] * x[2] - x[1] ** 2 + x[2]),
    ],
    ids=["Q1", "Q2", "interval-P1", "interval-P2", "tet-P1", "tet-P2"],
)
def test_reproduces_polynomials_on_other_cells(mesh, degree, f, rng):
    space = FunctionSpace(mesh, degree=degree)
    points = rng.uniform(0, 1, size=(300, mesh.dim()))
    values = space.evaluate(space.interpolate(f), points).numpy()
    np.testing.assert_allclose(values, f(points.T), rtol=0, atol=1e-12)


def _interpolation_error(space: FunctionSpace, f) -> float:
    """||f - I_h f||_L2 by high-order scikit-fem quadrature, independent of fenop's evaluation."""
    basis = skfem.Basis(space.mesh, space.basis.elem, intorder=10)
    uh = basis.interpolate(space.interpolate(f).numpy())
    form = skfem.Functional(lambda w: (w["uh"] - f(w.x)) ** 2)
    return float(np.sqrt(form.assemble(basis, uh=uh)))


@pytest.mark.parametrize("degree", [1, 2])
def test_interpolation_converges_at_order_degree_plus_one(degree):
    def f(x):
        return np.sin(np.pi * x[0]) * np.cos(np.pi * x[1] / 2) + x[0] ** 2

    sizes = [9, 17, 33]
    h = [2 / (n - 1) for n in sizes]
    errors = [_interpolation_error(FunctionSpace(l_shape(n), degree=degree), f) for n in sizes]
    assert abs(loglog_slope(h, errors) - (degree + 1)) <= 0.1


def test_evaluation_matrix_equals_scikit_fem_probes(rng):
    space = FunctionSpace(l_shape(7), degree=2)
    points = l_shape_interior_points(rng, 200)
    ours, inside = space.evaluation_matrix(points)
    assert inside.all()
    theirs = space.basis.probes(points.T)
    np.testing.assert_allclose(ours.toarray(), theirs.toarray(), atol=1e-13)


def test_evaluate_batches_over_leading_dims_and_caches(rng):
    space = FunctionSpace(unit_square(5))
    coeffs = torch.randn(3, 2, space.n_dofs, dtype=torch.float64)
    points = rng.uniform(0, 1, size=(7, 2))
    values = space.evaluate(coeffs, points)
    assert values.shape == (3, 2, 7)
    one = space.evaluate(coeffs[1, 0], torch.from_numpy(points))
    torch.testing.assert_close(values[1, 0], one, rtol=0, atol=0)
    assert len(space._evaluation_cache) == 1


def test_evaluate_is_differentiable():
    space = FunctionSpace(l_shape(5), degree=2)
    points = np.array([[-0.5, 0.5], [0.3, 0.2], [-0.1, -0.9]])
    coeffs = torch.randn(2, space.n_dofs, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda c: space.evaluate(c, points), (coeffs,))


def test_evaluate_outside_names_how_many_points(rng):
    space = FunctionSpace(l_shape(5))
    points = np.array([[-0.5, 0.5], [0.5, -0.5], [0.25, -0.75], [3.0, 0.0]])
    with pytest.raises(
        ValueError, match=r"3 of 4 points lie outside the mesh \(first: \(0\.5, -0\.5\)\)"
    ):
        space.evaluate(torch.zeros(space.n_dofs), points)


def test_evaluate_rejects_bad_shapes():
    space = FunctionSpace(unit_square(4))
    with pytest.raises(ValueError, match=r"16 DOFs.*got shape \(2, 15\)"):
        space.evaluate(torch.zeros(2, 15), np.zeros((1, 2)))
    with pytest.raises(ValueError, match=r"\(n_points, 2\), got \(3,\)"):
        space.evaluate(torch.zeros(16), np.zeros(3))
    with pytest.raises(TypeError, match="floating-point"):
        space.evaluate(torch.zeros(16, dtype=torch.int64), np.zeros((1, 2)))
    with pytest.raises(TypeError, match=r"torch\.Tensor"):
        space.evaluate(np.zeros(16), np.zeros((1, 2)))


def test_dirichlet_selection():
    mesh = unit_square(5)
    assert len(FunctionSpace(mesh).boundary_dofs) == 0
    whole = FunctionSpace(mesh, dirichlet="boundary").boundary_dofs
    assert len(whole) == 16
    np.testing.assert_array_equal(np.sort(whole), whole)
    left = FunctionSpace(mesh, degree=2, dirichlet=lambda x: np.isclose(x[0], 0.0))
    points = left.dof_points[left.boundary_dofs]
    assert len(points) == 9 and np.all(points[:, 0] == 0.0)  # 5 vertices + 4 edge midpoints


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"mesh": "square"}, TypeError, "scikit-fem Mesh"),
        ({"degree": 3}, ValueError, "no element for MeshTri1 with degree 3"),
        ({"dirichlet": "everywhere"}, ValueError, "everywhere"),
        ({"dirichlet": 1.0}, TypeError, "float"),
        (
            {"dirichlet": lambda x: np.zeros(3, dtype=bool)},
            ValueError,
            r"shape \(8,\) for 8 boundary facets",
        ),
    ],
)
def test_rejects_bad_arguments(kwargs, error, match):
    kwargs = {"mesh": unit_square(3), **kwargs}
    with pytest.raises(error, match=match):
        FunctionSpace(**kwargs)


def test_interpolate_checks_the_returned_shape():
    space = FunctionSpace(unit_square(3))
    with pytest.raises(ValueError, match=r"\(\.\.\., 9\)"):
        space.interpolate(lambda x: np.zeros(4))
    assert torch.equal(space.interpolate(lambda x: 2.0), torch.full((9,), 2.0, dtype=torch.float64))
    assert space.interpolate(lambda x: np.stack([x[0], x[1]])).shape == (2, 9)


def test_mass_and_stiffness_integrate_exactly():
    space = FunctionSpace(l_shape(7), degree=2)
    ones = torch.ones(space.n_dofs, dtype=torch.float64)
    # 1^T M 1 is the area; the stiffness matrix annihilates constants.
    assert ones @ (space.mass @ ones) == pytest.approx(3.0, abs=1e-12)
    assert (space.stiffness @ ones).abs().max() < 1e-12
    assert space.mass.layout == torch.sparse_csr and space.mass.dtype == torch.float64
