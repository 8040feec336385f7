import numpy as np
import pytest

from fenop.fem import FunctionSpace, unit_cube, unit_square
from fenop.train.plots import plot_predictions


@pytest.mark.parametrize("cell", ["tri", "quad"])
def test_second_order_fields_are_drawn_from_every_dof(tmp_path, cell):
    # Two P2 (Q2) fields equal at the vertices, apart at the other DOFs: a picture of
    # the vertex values alone would draw them the same.
    space = FunctionSpace(unit_square(5, cell=cell), degree=2)
    n_vertices = space.mesh.p.shape[1]
    a = np.zeros(space.n_dofs)
    b = a.copy()
    b[n_vertices:] = 1.0
    for name, field in (("a", a), ("b", b)):
        plot_predictions(space, field[None], field[None], field[None], tmp_path / f"{name}.png")
    assert (tmp_path / "a.png").read_bytes() != (tmp_path / "b.png").read_bytes()


def test_only_two_dimensional_meshes(tmp_path):
    space = FunctionSpace(unit_cube(3))
    zeros = np.zeros((1, space.n_dofs))
    with pytest.raises(ValueError, match="2-D mesh"):
        plot_predictions(space, zeros, zeros, zeros, tmp_path / "x.png")
