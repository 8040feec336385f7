import meshio
import numpy as np
import pytest
import skfem

from fenop.fem import l_shape, load_mesh, unit_cube, unit_interval, unit_square


def _area(mesh) -> float:
    basis = skfem.Basis(mesh, skfem.ElementTriP1())
    return skfem.Functional(lambda w: 1.0 + 0.0 * w.x[0]).assemble(basis)


def test_constructors_have_the_stated_vertices_and_cells():
    assert unit_interval(5).p.shape == (1, 5)
    assert unit_square(5).p.shape == (2, 25) and unit_square(5).t.shape == (3, 32)
    quad = unit_square(5, cell="quad")
    assert isinstance(quad, skfem.MeshQuad1) and quad.t.shape == (4, 16)
    assert unit_cube(3).p.shape == (3, 27)
    np.testing.assert_array_equal(unit_square(3).p.min(axis=1), [0.0, 0.0])
    np.testing.assert_array_equal(unit_square(3).p.max(axis=1), [1.0, 1.0])


def test_l_shape_covers_three_quarters_of_the_square():
    mesh = l_shape(9)
    # (-1, 1)^2 has area 4; removing one quadrant leaves 3.
    assert _area(mesh) == pytest.approx(3.0, abs=1e-12)
    centroids = mesh.p[:, mesh.t].mean(axis=1)
    assert not ((centroids[0] > 0) & (centroids[1] < 0)).any()
    # every vertex is used by some cell (no orphans left by the removal)
    assert np.unique(mesh.t).size == mesh.p.shape[1]
    assert [0.0, 0.0] in mesh.p.T.tolist()


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda: unit_square(1), ValueError, "at least 2"),
        (lambda: unit_square(4.0), TypeError, "must be an int"),
        (lambda: unit_square(4, cell="hex"), ValueError, "hex"),
        (lambda: l_shape(8), ValueError, "odd"),
        (lambda: unit_interval(True), TypeError, "bool"),
    ],
)
def test_constructors_reject_bad_arguments(call, error, match):
    with pytest.raises(error, match=match):
        call()


@pytest.mark.parametrize("suffix", [".msh", ".vtk", ".vtu", ".xdmf"])
def test_load_mesh_round_trips_through_meshio(tmp_path, suffix):
    mesh = l_shape(5)
    path = tmp_path / f"mesh{suffix}"
    meshio.write(path, meshio.Mesh(mesh.p.T, [("triangle", mesh.t.T)]))
    loaded = load_mesh(path)
    assert type(loaded) is skfem.MeshTri1
    np.testing.assert_allclose(loaded.p, mesh.p, atol=1e-12)
    np.testing.assert_array_equal(loaded.t, mesh.t)


def test_load_mesh_reads_a_3d_tetrahedral_mesh(tmp_path):
    mesh = unit_cube(3)
    path = tmp_path / "cube.vtu"
    meshio.write(path, meshio.Mesh(mesh.p.T, [("tetra", mesh.t.T)]))
    assert type(load_mesh(path)) is skfem.MeshTet1


def test_load_mesh_errors_name_the_file(tmp_path):
    missing = tmp_path / "missing.msh"
    with pytest.raises(ValueError, match=r"missing\.msh.*no such file"):
        load_mesh(missing)

    garbage = tmp_path / "garbage.msh"
    garbage.write_text("this is not a mesh\n")
    with pytest.raises(ValueError, match=r"cannot read mesh .*garbage\.msh"):
        load_mesh(garbage)

    points = np.array([[0, 0, 0], [1, 0, 0], [0, 1, 0], [0.5, 0, 0], [0.5, 0.5, 0], [0, 0.5, 0]])
    quadratic = tmp_path / "quadratic.vtk"
    meshio.write(quadratic, meshio.Mesh(points, [("triangle6", np.array([[0, 1, 2, 3, 4, 5]]))]))
    with pytest.raises(ValueError, match=r"quadratic\.vtk.*MeshTri2"):
        load_mesh(quadratic)

    vertices = tmp_path / "vertices.vtk"
    meshio.write(vertices, meshio.Mesh(points, [("vertex", np.array([[0], [1]]))]))
    with pytest.raises(ValueError, match=r"vertices\.vtk.*vertex"):
        load_mesh(vertices)


def test_flat_cells_and_damaged_points_are_refused():
    from fenop.fem.mesh import MeshError, mesh_from_arrays

    points = np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [2.0, 0.0]])
    cells = np.array([[0, 1, 2], [0, 1, 3]])  # the second on a line
    with pytest.raises(MeshError, match="1 of 2 cells have zero area"):
        mesh_from_arrays(points, cells)
    with pytest.raises(MeshError, match="NaN or Inf"):
        mesh_from_arrays(np.where(points == 2.0, np.nan, points), cells)
    quad = unit_square(3, cell="quad")
    squashed = quad.p.T.copy()
    squashed[:, 1] = 0.0
    with pytest.raises(MeshError, match="4 of 4 cells have zero area"):
        mesh_from_arrays(squashed, quad.t.T)
    assert mesh_from_arrays(quad.p.T, quad.t.T).t.shape == (4, 4)
