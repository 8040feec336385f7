"""Stores to XDMF / VTU and back (meshio): lossless round trips for P1, P2, Q1 and
Q2, predictions with their errors, a file from another solver, and refusals."""

import h5py
import meshio
import numpy as np
import pytest

from fenop._errors import InputError
from fenop.data.header import StoreError
from fenop.data.meshio_files import meshio_to_store, store_to_meshio
from fenop.data.store import create_store, read_store, write_samples
from fenop.fem import FunctionSpace, l_shape, unit_square


def _store(path, space, n=3, fields=("a", "u")):
    """A store of smooth fields (values known from the DOF points) on ``space``."""
    x, y = space.dof_points.T
    values = {
        name: np.stack([np.sin(x + k) * np.cos(2 * y) + j for k in range(n)])
        for j, name in enumerate(fields)
    }
    create_store(path, space, fields=list(fields), n_samples=n, attrs={"pde": "test"})
    write_samples(path, 0, values)
    return path, values


SPACES = {
    "P1 L-shape": lambda: FunctionSpace(l_shape(5), dirichlet="boundary"),
    "P2 L-shape": lambda: FunctionSpace(l_shape(5), degree=2, dirichlet="boundary"),
    "Q1 square": lambda: FunctionSpace(unit_square(4, cell="quad"), dirichlet="boundary"),
    "Q2 square": lambda: FunctionSpace(unit_square(4, cell="quad"), degree=2, dirichlet="boundary"),
}


@pytest.mark.parametrize("suffix", [".xdmf", ".vtu"])
@pytest.mark.parametrize("name", list(SPACES))
def test_a_store_goes_out_and_comes_back_unchanged(tmp_path, name, suffix):
    space = SPACES[name]()
    path, values = _store(tmp_path / "d.h5", space, n=1 if suffix == ".vtu" else 3)
    (written, *_) = store_to_meshio(path, tmp_path / f"view{suffix}")
    back = read_store(meshio_to_store(written, tmp_path / "back.h5"))
    assert back.space.element == space.element and back.header["fields"] == ["a", "u"]
    np.testing.assert_array_equal(back.space.mesh.p, space.mesh.p)
    np.testing.assert_array_equal(back.space.mesh.t, space.mesh.t)
    for field, expected in values.items():
        with h5py.File(back.path) as f:
            np.testing.assert_array_equal(f[field][()], expected)


@pytest.mark.parametrize("name", ["P2 L-shape", "Q2 square"])
def test_second_order_cells_have_their_nodes_where_vtk_puts_them(tmp_path, name):
    # corners, then the midpoints of the edges (0, 1), (1, 2), ... in turn (and the centre)
    space = SPACES[name]()
    path, _ = _store(tmp_path / "d.h5", space, n=1)
    mesh = meshio.read(store_to_meshio(path, tmp_path / "view.vtu")[0])
    (block,) = mesh.cells
    nodes = mesh.points[block.data][..., :2]  # (cells, nodes, 2)
    corners = 3 if block.type == "triangle6" else 4
    for edge in range(corners):
        middle = (nodes[:, edge] + nodes[:, (edge + 1) % corners]) / 2
        np.testing.assert_allclose(nodes[:, corners + edge], middle, atol=1e-12)
    if block.type == "quad9":
        np.testing.assert_allclose(nodes[:, 8], nodes[:, :4].mean(axis=1), atol=1e-12)


def test_an_xdmf_time_series_has_a_step_per_sample_and_predictions_with_errors(tmp_path):
    space = FunctionSpace(unit_square(5), dirichlet="boundary")
    data, values = _store(tmp_path / "d.h5", space, n=4)
    predicted, guesses = _store(tmp_path / "p.h5", space, n=4, fields=("u",))
    written = store_to_meshio(
        data, tmp_path / "view.xdmf", predictions=predicted, samples=slice(1, 3)
    )
    assert [p.name for p in written] == ["view.xdmf", "view.h5"]
    with meshio.xdmf.TimeSeriesReader(str(written[0])) as reader:
        reader.read_points_cells()
        steps = [reader.read_data(k) for k in range(reader.num_steps)]
    assert [t for t, _, _ in steps] == [1.0, 2.0]
    for k, (_, point_data, _) in enumerate(steps, start=1):
        assert set(point_data) == {"a", "u", "u_predicted", "u_error"}
        np.testing.assert_array_equal(point_data["u_error"], guesses["u"][k] - values["u"][k])


def _trajectories(path, space, n=3, shift=0.0):
    """A store of a static field ``a`` and a trajectory ``u`` of 4 states."""
    x, y = space.dof_points.T
    times = np.array([0.0, 0.5, 1.0, 2.0])
    u = np.stack([[np.sin(x + k) * np.cos(y) * (1 + t) + shift for t in times] for k in range(n)])
    a = np.stack([np.cos(x * k) for k in range(n)])
    create_store(path, space, fields=["a", "u"], n_samples=n, times=times, trajectories=["u"])
    write_samples(path, 0, {"a": a, "u": u})
    return path, times, {"a": a, "u": u}


def test_a_trajectory_is_a_time_series_over_its_times_that_paraview_plays(tmp_path):
    space = FunctionSpace(unit_square(5), dirichlet="boundary")
    data, times, values = _trajectories(tmp_path / "t.h5", space)
    predicted = _trajectories(tmp_path / "p.h5", space, shift=0.25)[0]
    written = store_to_meshio(
        data, tmp_path / "one.xdmf", samples=slice(2, 3), predictions=predicted
    )
    with meshio.xdmf.TimeSeriesReader(str(written[0])) as reader:
        reader.read_points_cells()
        steps = [reader.read_data(k) for k in range(reader.num_steps)]
    assert [t for t, _, _ in steps] == times.tolist()
    for t, (_, point_data, _) in enumerate(steps):
        # every predicted field, static or not, with its error
        assert set(point_data) == {"a", "u"} | {
            f"{n}_{k}" for n in "au" for k in ("predicted", "error")
        }
        np.testing.assert_array_equal(point_data["u"], values["u"][2, t])
        np.testing.assert_array_equal(point_data["a"], values["a"][2])  # static
        np.testing.assert_allclose(point_data["u_error"], 0.25, rtol=1e-12)
    written = store_to_meshio(data, tmp_path / "two.xdmf", samples=slice(0, 2))
    with meshio.xdmf.TimeSeriesReader(str(written[0])) as reader:
        reader.read_points_cells()
        _, point_data, _ = reader.read_data(3)
    assert set(point_data) == {"a_0", "a_1", "u_0", "u_1"}
    np.testing.assert_array_equal(point_data["u_1"], values["u"][1, 3])
    with pytest.raises(InputError, match=r"a store of trajectories converts to \.xdmf"):
        store_to_meshio(data, tmp_path / "t.vtu")
    other = _trajectories(tmp_path / "q.h5", space)[0]
    with h5py.File(other, "r+") as f:
        f["time"][3] = 3.0
    with pytest.raises(StoreError, match="its states are not at the times of"):
        store_to_meshio(data, tmp_path / "x.xdmf", predictions=other)
    assert not (tmp_path / "x.xdmf").exists()


def test_several_samples_go_to_numbered_vtu_files(tmp_path):
    space = FunctionSpace(unit_square(5), dirichlet="boundary")
    path, values = _store(tmp_path / "d.h5", space, n=3)
    written = store_to_meshio(path, tmp_path / "view.vtu")
    assert [p.name for p in written] == ["view_0000.vtu", "view_0001.vtu", "view_0002.vtu"]
    np.testing.assert_array_equal(meshio.read(written[2]).point_data["a"], values["a"][2])


def test_a_file_from_another_solver_becomes_a_store(tmp_path):
    # Gmsh-like: boundary lines beside the triangles, a point no cell uses, a vector
    # field (skipped) and a scalar one
    mesh = unit_square(5)
    points = np.vstack([np.c_[mesh.p.T, np.zeros(25)], [[9.0, 9.0, 0.0]]])
    lines = np.array([[0, 1], [1, 2]])
    temperature = points[:, 0] + 2 * points[:, 1]
    source = meshio.Mesh(
        points,
        [("line", lines), ("triangle", mesh.t.T)],
        point_data={"T": temperature, "velocity": np.ones((26, 2))},
    )
    path = tmp_path / "solver.vtu"
    meshio.write(path, source)
    store = read_store(meshio_to_store(path, tmp_path / "s.h5"))
    assert store.header["fields"] == ["T"] and store.space.element == "P1"
    x, y = store.space.dof_points.T
    with h5py.File(store.path) as f:
        np.testing.assert_allclose(f["T"][0], x + 2 * y)


def test_conversions_that_would_lose_or_replace_files_are_refused(tmp_path):
    space = FunctionSpace(unit_square(5), dirichlet="boundary")
    path, _ = _store(tmp_path / "d.h5", space)
    with pytest.raises(InputError, match=r"d\.h5: is an input; name the output otherwise"):
        store_to_meshio(path, tmp_path / "d.xdmf")  # its arrays would go to d.h5
    assert not (tmp_path / "d.xdmf").exists()
    with pytest.raises(InputError, match=r"write \.xdmf"):
        store_to_meshio(path, tmp_path / "view.png")
    store_to_meshio(path, tmp_path / "view.xdmf")
    with pytest.raises(InputError, match="exists; pass --overwrite"):
        store_to_meshio(path, tmp_path / "view.xdmf")
    other, _ = _store(tmp_path / "o.h5", FunctionSpace(unit_square(6), dirichlet="boundary"))
    with pytest.raises(StoreError, match="its mesh or element is not that of"):
        store_to_meshio(path, tmp_path / "p.xdmf", predictions=other)
    lines = tmp_path / "lines.vtu"
    meshio.write(lines, meshio.Mesh(np.eye(3), [("line", np.array([[0, 1]]))]))
    with pytest.raises(InputError, match=r"no cells fenop reads .* it has \['line'\]"):
        meshio_to_store(lines, tmp_path / "l.h5")
    assert not (tmp_path / "l.h5").exists()


def _triangle_file(path, **point_data):
    """A mesh file of one unit square's triangles with ``point_data``."""
    space = FunctionSpace(unit_square(3))
    mesh = meshio.Mesh(space.mesh.p.T, [("triangle", space.mesh.t.T)], point_data=point_data)
    meshio.write(path, mesh)
    return path


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"mesh_points": np.arange(9.0)}, r"point data 'mesh_points': a name the store's layout"),
        ({"a/b": np.arange(9.0)}, r"point data 'a/b': not a dataset name"),
        ({"u": np.r_[np.nan, np.arange(8.0)]}, r"point data 'u' holds NaN or Inf at 1 values"),
        ({"u": np.arange(9.0) * 1j}, r"point data 'u' is complex"),
    ],
)
def test_point_data_a_store_cannot_hold_is_refused_by_name(tmp_path, data, message):
    # (MOAB's .h5m is a format meshio writes complex data to; VTK's are not)
    suffix = ".h5m" if np.iscomplexobj(next(iter(data.values()))) else ".vtu"
    source = _triangle_file(tmp_path / f"m{suffix}", **data)
    with pytest.raises(InputError, match=message):
        meshio_to_store(source, tmp_path / "out.h5")
    assert not (tmp_path / "out.h5").exists()


def test_an_xdmf_files_own_data_file_is_never_the_store_it_becomes(tmp_path):
    space = FunctionSpace(unit_square(5), dirichlet="boundary")
    data, _ = _store(tmp_path / "d.h5", space, n=2)
    xdmf, arrays = store_to_meshio(data, tmp_path / "v2.xdmf")
    before = arrays.read_bytes()
    with pytest.raises(InputError, match=r"v2\.h5: is where .*v2\.xdmf keeps its data"):
        meshio_to_store(xdmf, arrays, overwrite=True)
    assert arrays.read_bytes() == before
    assert read_store(meshio_to_store(xdmf, tmp_path / "back.h5")).n_samples == 2


def test_a_file_meshio_gives_up_on_is_refused_with_meshios_reason(tmp_path):
    (tmp_path / "bad.vtu").write_text("hello")
    with pytest.raises(InputError, match=r"bad\.vtu: meshio cannot read it \(Couldn't read file"):
        meshio_to_store(tmp_path / "bad.vtu", tmp_path / "out.h5")


def test_overwriting_a_vtu_series_removes_the_old_series_other_files(tmp_path):
    space = FunctionSpace(unit_square(5), dirichlet="boundary")
    data, _ = _store(tmp_path / "d.h5", space, n=4)
    assert len(store_to_meshio(data, tmp_path / "v.vtu")) == 4
    (tmp_path / "v_other.vtu").write_text("not part of the series")
    written = store_to_meshio(data, tmp_path / "v.vtu", samples=slice(0, 2), overwrite=True)
    series = sorted(p.name for p in tmp_path.glob("v*.vtu"))
    assert series == ["v_0000.vtu", "v_0001.vtu", "v_other.vtu"] and len(written) == 2


def test_samples_past_the_store_are_refused_not_clipped(tmp_path):
    space = FunctionSpace(unit_square(5), dirichlet="boundary")
    data, _ = _store(tmp_path / "d.h5", space, n=3)
    with pytest.raises(StoreError, match=r"samples 1:9 asked for, but it holds 3"):
        store_to_meshio(data, tmp_path / "v.xdmf", samples=slice(1, 9))
