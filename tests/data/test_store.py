import contextlib
import hashlib
import io
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest
import xarray as xr

from fenop.data.header import StoreError, open_h5
from fenop.data.store import (
    create_store,
    open_store,
    read_store,
    store_space,
    validate_store,
    write_samples,
)
from fenop.fem import FunctionSpace, l_shape
from tests.helpers import FUZZ_EXAMPLES, FUZZ_EXAMPLES_SLOW, one_line_naming


@pytest.fixture
def store(tmp_path):
    """A complete store of 5 samples of fields a and u on a P2 L-shape space."""
    space = FunctionSpace(l_shape(5), degree=2, dirichlet="boundary")
    path = tmp_path / "store.h5"
    create_store(
        path, space, fields=["a", "u"], n_samples=5, attrs={"pde": "test", "dirichlet": "boundary"}
    )
    values = {
        "a": np.arange(5 * space.n_dofs, dtype=float).reshape(5, -1),
        "u": -np.arange(5 * space.n_dofs, dtype=float).reshape(5, -1),
    }
    write_samples(path, 0, {k: v[:3] for k, v in values.items()})
    write_samples(path, 3, {k: v[3:] for k, v in values.items()})
    return path, space, values


def _digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_round_trip_and_xarray_without_fenop(store):
    path, space, values = store
    with open_store(path) as ds:
        np.testing.assert_array_equal(ds["u"].values, values["u"])
        np.testing.assert_array_equal(ds["x"].values, space.dof_points[:, 0])
    plain = xr.open_dataset(path, engine="h5netcdf")
    assert plain["a"].dims == ("sample", "dof")
    assert plain["mesh_points"].dims == ("vertex", "axis")
    assert plain["mesh_cells"].dims == ("cell", "corner")
    assert plain.attrs["fenop_format"] == 1
    np.testing.assert_array_equal(plain["a"].values, values["a"])
    rebuilt = store_space(path)
    assert rebuilt.n_dofs == space.n_dofs and rebuilt.element == "P2"
    np.testing.assert_array_equal(rebuilt.boundary_dofs, space.boundary_dofs)


def _break(path, how: str) -> None:
    if how == "truncated bytes":
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 3])
        return
    if how == "not hdf5":
        path.write_text("hello\n")
        return
    with h5py.File(path, "r+") as f:
        if how == "missing field":
            del f["u"]
        elif how == "wrong shape":
            del f["u"]
            f.create_dataset("u", data=np.zeros((5, 7)))
        elif how == "nan":
            f["u"][3, 2] = np.nan
        elif how == "inf":
            f["a"][0, 0] = np.inf
        elif how == "newer format":
            f.attrs["fenop_format"] = 2
        elif how == "not a store":
            del f.attrs["fenop_format"]
        elif how == "incomplete":
            f.attrs["n_complete"] = 3
        elif how == "bad mesh":
            f["mesh_cells"][0, 0] = 10_000
        elif how == "zero mesh points":
            f["mesh_points"][:] = 0.0
    if how == "damaged header":  # zeros over the root group's object header
        with open(path, "r+b") as raw:
            raw.seek(512)
            raw.write(bytes(4096))


@pytest.mark.parametrize(
    ("how", "message"),
    [
        ("missing field", r"missing field 'u'"),
        ("wrong shape", r"field 'u' has shape \(5, 7\), expected \(5, 65\)"),
        ("nan", r"field 'u' holds NaN or Inf in sample 3"),
        ("inf", r"field 'a' holds NaN or Inf in sample 0"),
        ("newer format", r"store format 2, newer than this fenop reads \(1\)"),
        ("not a store", r"not a fenop store"),
        ("incomplete", r"incomplete: 3 of 5 samples"),
        ("bad mesh", r"mesh_cells: the cells refer to vertices that the points do not have"),
        ("zero mesh points", r"mesh_cells: 24 of 24 cells have zero area"),
        ("damaged header", r"damaged: HDF5 cannot read its structure"),
        ("truncated bytes", r"not a readable HDF5 file"),
        ("not hdf5", r"not a readable HDF5 file"),
    ],
)
def test_bad_files_give_a_clear_error_naming_the_file(store, how, message):
    path = store[0]
    _break(path, how)
    before = _digest(path)
    with pytest.raises(StoreError, match=message) as info:
        open_store(path)
    assert str(path) in str(info.value)
    assert _digest(path) == before  # reading never writes


@pytest.mark.parametrize(
    ("attribute", "value", "message"),
    [
        ("parameters", "{not json", r"attribute 'parameters' is not valid JSON"),
        ("parameters", "[1, 2]", r"attribute 'parameters' must be a JSON object"),
        ("fields", "[a, u]", r"attribute 'fields' is not valid JSON"),
        ("fenop_format", "one", r"attribute 'fenop_format' must be a format number, got 'one'"),
        ("n_samples", "[3]", r"attribute 'n_samples' must be a non-negative integer, got \[3\]"),
        ("n_samples", 2.5, r"attribute 'n_samples' must be a non-negative integer"),
        ("n_complete", 99, r"'n_complete' = 99 exceeds 'n_samples' = 5"),
        ("n_samples", 0, r"field 'a' has shape \(5, 65\), expected \(0, 65\)"),
        ("element", 3, r"attribute 'element' must be text, got 3"),
        ("pde", 7, r"attribute 'pde' must be text"),
    ],
)
def test_attributes_of_the_wrong_type_are_named(store, attribute, value, message):
    # Hand-written files: before, each of these ended in a traceback (a JSON or int()
    # error, or a reshape in predict for n_complete past the rows).
    path = store[0]
    with h5py.File(path, "r+") as f:
        f.attrs[attribute] = value
        if attribute == "n_samples":
            f.attrs["n_complete"] = 0
    with pytest.raises(StoreError, match=message) as info:
        read_store(path, allow_partial=True)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_a_store_of_no_samples_is_refused(store):
    path = store[0]
    with h5py.File(path, "r+") as f:  # as written by hand: no counts, fields of 0 rows
        for key in ("n_samples", "n_complete"):
            del f.attrs[key]
        for name in ("a", "u"):
            del f[name]
            f[name] = np.zeros((0, store[1].n_dofs))
    with pytest.raises(StoreError, match="holds no samples"):
        read_store(path)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ("float cells", r"mesh_cells must hold integers, got float64"),
        ("complex field", r"field 'u' is complex; fields hold real numbers"),
    ],
)
def test_datasets_of_the_wrong_type_are_named(store, change, message):
    path = store[0]
    with h5py.File(path, "r+") as f:
        if change == "float cells":
            cells = f["mesh_cells"][()].astype(float)
            del f["mesh_cells"]
            f["mesh_cells"] = cells
        else:
            u = f["u"][()].astype(complex)
            del f["u"]
            f["u"] = u
    with pytest.raises(StoreError, match=message):
        read_store(path, fields=["u"])


ATTRIBUTES = ("fenop_format", "element", "fields", "n_samples", "n_complete", "chunk_size")
ATTRIBUTES += ("pde", "parameters", "dirichlet", "seed")


def _fuzz_attributes(store, examples: int) -> None:
    """Any value of any type in any attribute: ``fenop info`` reads the store or refuses
    it in one line naming it, with status 2; never a traceback, never a write."""
    from hypothesis import given
    from hypothesis import strategies as st

    from fenop.cli import main
    from tests.helpers import fuzz_settings, fuzz_values

    path = store[0]
    pristine = path.read_bytes()

    @fuzz_settings(examples)
    @given(st.dictionaries(st.sampled_from(ATTRIBUTES), fuzz_values(tables=False), min_size=1))
    def check(changes):
        path.write_bytes(pristine)
        with h5py.File(path, "r+") as f:
            for key, value in changes.items():
                if isinstance(value, list):  # an HDF5 array attribute
                    text = any(isinstance(v, str) for v in value)
                    value = np.array(value, dtype=h5py.string_dtype() if text else None)
                f.attrs[key] = value
        before = _digest(path)
        err = io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            status = main(["info", str(path)])
        assert status in (0, 2), status
        if status == 2:
            assert one_line_naming(err.getvalue(), path), err.getvalue()
        assert _digest(path) == before

    check()


def test_fuzzed_attributes_are_read_or_refused_in_one_line(store):
    _fuzz_attributes(store, FUZZ_EXAMPLES)


@pytest.mark.slow
def test_fuzzed_attributes_are_read_or_refused_in_one_line_at_length(store):
    _fuzz_attributes(store, FUZZ_EXAMPLES_SLOW)


def test_missing_file_and_partial_opening(store, tmp_path):
    with pytest.raises(StoreError, match="no such file"):
        validate_store(tmp_path / "nope.h5")
    path = store[0]
    _break(path, "incomplete")
    with open_store(path, allow_partial=True) as partial:
        assert partial.sizes["sample"] == 3


def test_writes_must_come_in_order(store):
    path, space, _ = store
    with pytest.raises(ValueError, match="in order"):
        write_samples(path, 2, {"a": np.zeros((1, space.n_dofs)), "u": np.zeros((1, space.n_dofs))})
    with pytest.raises(ValueError, match=r"the store.s layout reserves"):
        create_store(path.parent / "x.h5", space, fields=["mesh_points"], n_samples=1)


@contextlib.contextmanager
def _held_open(path, seconds: float, *, mode: str = "r"):
    """While it lasts, another process has ``path`` open (HDF5 locks it)."""
    script = (
        "import sys, time, h5py; f = h5py.File(sys.argv[1], sys.argv[3]); "
        "print('open', flush=True); time.sleep(float(sys.argv[2]))"
    )
    process = subprocess.Popen(
        [sys.executable, "-c", script, str(path), str(seconds), mode],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout.readline() == "open\n"
        yield
    finally:
        process.kill()
        process.communicate()


def test_writes_wait_while_a_reader_has_the_file_open(tmp_path):
    space = FunctionSpace(l_shape(5), dirichlet="boundary")
    path = tmp_path / "s.h5"
    create_store(path, space, fields=["u"], n_samples=2)
    with _held_open(path, 1.0):
        start = time.monotonic()
        # Without waiting, HDF5 refuses the write while the reader holds its lock
        # (a `fenop info` during generation stopped the generation).
        write_samples(path, 0, {"u": np.ones((2, space.n_dofs))})
        assert time.monotonic() - start > 0.5
    with _held_open(path, 1.0, mode="r+"), open_store(path) as opened:  # a writer's turn
        assert opened["u"].values.sum() == 2 * space.n_dofs
    with _held_open(path, 30.0):
        with pytest.raises(StoreError, match=r"locked by another process .* \(waited 0.5 s\)"):
            open_h5(path, "r+", patience=0.5)


def _by_hand(path, *, fields=None, extra=None):
    """A store written as a user would: the required attributes, float32 fields and
    int32 cells, on a 5 x 5 P1 mesh; ``fields``, if given, as the attribute."""
    from fenop.fem import unit_square

    mesh = unit_square(5)
    with h5py.File(path, "w") as f:
        f.attrs["fenop_format"], f.attrs["element"] = 1, "P1"
        if fields is not None:
            f.attrs["fields"] = fields
        f["mesh_points"], f["mesh_cells"] = mesh.p.T, mesh.t.T.astype(np.int32)
        f["a"] = np.ones((3, 25), dtype=np.float32)
        f["u"] = np.zeros((3, 25), dtype=np.float32)
        for name, value in (extra or {}).items():
            f[name] = value
    return path


@pytest.mark.parametrize(
    "fields",
    [None, "a, u", "a u", np.array(["a", "u"], dtype=h5py.string_dtype()), '["a", "u"]'],
    ids=["none", "commas", "spaces", "string array", "json"],
)
def test_a_store_written_by_hand_needs_no_fields_or_counts(tmp_path, fields):
    path = _by_hand(tmp_path / "mine.h5", fields=fields)
    store = read_store(path)
    assert store.header["fields"] == ["a", "u"]  # not letter by letter
    assert store.n_samples == store.n_complete == 3 and store.space.n_dofs == 25
    with open_store(path) as ds:
        assert ds["a"].dtype == np.float32 and ds.sizes["sample"] == 3


@pytest.mark.parametrize(
    ("extra", "fields", "message"),
    [
        ({"b": np.ones((4, 25))}, None, r"the fields \['a', 'b', 'u'\] have different numbers"),
        ({"b": np.ones((3, 7))}, None, r"field 'b' has shape \(3, 7\), expected \(3, 25\)"),
        ({}, "a, v", r"missing field 'v'"),
    ],
)
def test_a_store_written_by_hand_with_mistakes_is_refused_clearly(tmp_path, extra, fields, message):
    path = _by_hand(tmp_path / "mine.h5", fields=fields, extra=extra)
    with pytest.raises(StoreError, match=message) as info:
        read_store(path)
    assert str(path) in str(info.value)


def test_a_store_without_any_field_is_refused(tmp_path):
    path = tmp_path / "empty.h5"
    with h5py.File(path, "w") as f:
        f.attrs["fenop_format"], f.attrs["element"] = 1, "P1"
        f["mesh_points"], f["mesh_cells"] = np.eye(3)[:, :2], np.array([[0, 1, 2]])
    with pytest.raises(StoreError, match="no fields: no 'fields' attribute"):
        read_store(path)


@pytest.fixture
def trajectories(tmp_path):
    """A store of 3 samples of a static field ``a`` and a trajectory ``u`` of 4 states."""
    space = FunctionSpace(l_shape(5), dirichlet="boundary")
    path = tmp_path / "moving.h5"
    times = np.array([0.0, 0.1, 0.2, 0.4])
    create_store(
        path, space, fields=["a", "u"], n_samples=3, times=times, trajectories=["u"], chunk_size=2
    )
    values = {
        "a": np.arange(3 * space.n_dofs, dtype=float).reshape(3, -1),
        "u": np.arange(3 * 4 * space.n_dofs, dtype=float).reshape(3, 4, -1),
    }
    write_samples(path, 0, {k: v[:2] for k, v in values.items()})
    write_samples(path, 2, {k: v[2:] for k, v in values.items()})
    return path, space, times, values


def test_a_trajectory_store_opens_in_xarray_with_its_time_axis(trajectories):
    path, _, times, values = trajectories
    plain = xr.open_dataset(path, engine="h5netcdf")  # without fenop
    assert plain["u"].dims == ("sample", "time", "dof")
    assert plain["a"].dims == ("sample", "dof")
    np.testing.assert_array_equal(plain["time"].values, times)
    np.testing.assert_array_equal(plain["u"].sel(time=0.2).values, values["u"][:, 2])
    plain.close()
    store = read_store(path)
    assert store.trajectories == ("u",) and store.n_samples == 3
    np.testing.assert_array_equal(store.times, times)
    with open_store(path) as ds:
        np.testing.assert_array_equal(ds["u"].values, values["u"])
        np.testing.assert_array_equal(ds["time"].values, times)


def test_a_trajectory_written_by_hand_is_read_with_its_times(tmp_path):
    path = _by_hand(tmp_path / "mine.h5", extra={"time": [0.0, 0.5], "v": np.ones((3, 2, 25))})
    store = read_store(path)
    assert store.header["fields"] == ["a", "u", "v"] and store.trajectories == ("v",)
    with open_store(path) as ds:
        assert ds["v"].dims == ("sample", "time", "dof")
        np.testing.assert_array_equal(ds["time"].values, [0.0, 0.5])


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"v": np.ones((3, 2, 25))}, r"field 'v' is a trajectory .* no 'time' dataset"),
        (
            {"time": [0.0, 0.5, 1.0], "v": np.ones((3, 2, 25))},
            r"field 'v' has shape \(3, 2, 25\), expected \(3, 3, 25\) for 3 samples of 3 states",
        ),
        ({"time": [0.0, 0.5, 0.5], "v": np.ones((3, 3, 25))}, r"'time' must increase"),
        ({"time": [0.0], "v": np.ones((3, 1, 25))}, r"'time' must list at least two times"),
        ({"time": [0.0, np.nan], "v": np.ones((3, 2, 25))}, r"'time' holds NaN"),
    ],
    ids=["no times", "time axis does not match", "times repeat", "one time", "nan time"],
)
def test_a_trajectory_whose_time_axis_does_not_match_is_refused(tmp_path, extra, message):
    path = _by_hand(tmp_path / "mine.h5", extra=extra)
    with pytest.raises(StoreError, match=message) as info:
        read_store(path)
    assert one_line_naming(str(info.value), path)


def test_nan_in_a_trajectory_names_its_sample(trajectories):
    path = trajectories[0]
    with h5py.File(path, "r+") as f:
        f["u"][2, 3, 7] = np.nan
    with pytest.raises(StoreError, match=r"field 'u' holds NaN or Inf in sample 2"):
        open_store(path)


def test_a_reader_of_static_fields_names_a_trajectory(trajectories):
    from fenop.data.store import read_batches

    store = read_store(trajectories[0])
    assert next(read_batches(store, ["a"], 2))[1].shape == (2, 1, store.space.n_dofs)
    with pytest.raises(StoreError, match=r"field 'u' is a trajectory \(sample, time, dof\) of 4"):
        next(read_batches(store, ["a", "u"], 2))


def test_a_static_dataset_of_a_trajectory_names_the_field(trajectories):
    from fenop.data import FieldDataset

    with pytest.raises(StoreError, match=r"field 'u' is a trajectory .* FieldDataset reads"):
        FieldDataset(trajectories[0], inputs=["a"], outputs=["u"])
