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


def test_titles_name_the_fields_samples_and_errors_and_no_panel_is_empty(tmp_path, monkeypatch):
    import json
    import struct

    import matplotlib.pyplot as plt

    figures = []
    monkeypatch.setattr(plt, "close", figures.append)  # keep the figure to look at
    space = FunctionSpace(unit_square(5))
    x, y = space.dof_points.T
    fields = np.stack([x * y, x + y])
    metrics = tmp_path / "metrics.jsonl"
    lines = [{"epoch": e, "train_loss": 1 / e, "test_l2": 2 / e} for e in (1, 2, 3)]
    metrics.write_text("".join(json.dumps(line) + "\n" for line in lines))
    path = plot_predictions(
        space,
        fields,
        fields,
        1.1 * fields,
        tmp_path / "p.png",
        metrics=metrics,
        names=("a", "u"),
        samples=[250, 251],
        errors=[0.1, 0.0123],
    )
    (figure,) = figures
    titles = [ax.get_title() for ax in figure.axes if ax.get_title()]
    assert "sample 250\na" in titles and "sample 251\nu (prediction)" in titles
    assert "sample 251\nerror, relative L2 0.0123" in titles and "training" in titles
    drawn = [ax for ax in figure.axes if ax.get_title()]  # colour bars aside
    assert len(drawn) == 2 * 4 + 1  # no empty panel: the curves take the whole last row
    assert all(ax.collections or ax.lines for ax in drawn)
    width = struct.unpack(">I", path.read_bytes()[16:20])[0]
    assert width == 13 * 150  # 150 dpi
