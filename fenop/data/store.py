"""The HDF5 store: fields at the DOFs of a mesh, one file per data set.

Layout (format 1), readable by ``xarray.open_dataset(path, engine="h5netcdf")``
without fenop, thanks to HDF5 dimension scales::

    / attrs      fenop_format = 1, pde, element, dirichlet ("boundary" or "none"),
                 fields (JSON list), parameters (JSON), seed, n_samples,
                 n_complete, chunk_size
    /mesh_points (vertex, axis)  float64   mesh vertices
    /mesh_cells  (cell, corner)  int64     connectivity into mesh_points
    /<field>     (sample, dof)   float64   one dataset per field

Writing is crash-tolerant: the field datasets are allocated in full when the file
is created (so later writes change no HDF5 structure, only raw data), samples are
written a chunk at a time with the file closed in between, and ``n_complete``
records how many leading samples are complete. A killed run leaves a readable file
of its complete chunks; generation resumes from there. Rows past ``n_complete``
hold NaN.

>>> import tempfile, pathlib
>>> from fenop.fem import FunctionSpace, unit_square
>>> path = pathlib.Path(tempfile.mkdtemp()) / "demo.h5"
>>> space = FunctionSpace(unit_square(3))
>>> create_store(path, space, fields=["u"], n_samples=2, attrs={"pde": "demo"})
>>> write_samples(path, 0, {"u": np.ones((2, space.n_dofs))})
>>> ds = open_store(path)
>>> ds["u"].dims, ds["u"].shape
(('sample', 'dof'), (2, 9))
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import h5py
import numpy as np
import skfem

from fenop._checks import missing_file
from fenop.fem import FunctionSpace

FORMAT_VERSION = 1

_MESH_TYPES = {
    (1, 2): skfem.MeshLine1,
    (2, 3): skfem.MeshTri1,
    (2, 4): skfem.MeshQuad1,
    (3, 4): skfem.MeshTet1,
}
_DEGREES = {"P1": 1, "P2": 2, "Q1": 1, "Q2": 2}
# Rows checked for NaN/Inf per read while validating: bounds memory on large files.
_VALIDATION_ROWS = 256


class StoreError(ValueError):
    """A store that cannot be used; the message names the file and the problem."""

    def __init__(self, path: str | os.PathLike, problem: str):
        super().__init__(f"{os.fspath(path)}: {problem}")
        self.path, self.problem = os.fspath(path), problem


def _scale(f: h5py.File, name: str, size: int) -> h5py.Dataset:
    """A dimension-scale dataset (what netCDF and xarray read as a dimension)."""
    if name not in f:
        f.create_dataset(name, data=np.arange(size, dtype=np.int64)).make_scale(name)
    return f[name]


def _attach(f: h5py.File, dataset: h5py.Dataset, dims: Sequence[str]) -> None:
    for axis, name in enumerate(dims):
        dataset.dims[axis].attach_scale(_scale(f, name, dataset.shape[axis]))


def open_h5(path: str | os.PathLike, mode: str, *, patience: float = 60.0) -> h5py.File:
    """``h5py.File(path, mode)``, waiting while another process has the file open.

    HDF5 locks a file for as long as a process has it open: the writer of a store
    (its generation, between chunks) and its readers (``fenop info``, a resumed
    run's check) each wait for the other's brief open rather than fail. After
    ``patience`` seconds, as when a notebook keeps the file open, a StoreError
    says so.
    """
    return _waiting(lambda: h5py.File(path, mode), path, patience)


def _waiting(opener, path: str | os.PathLike, patience: float):
    """``opener()``, again while HDF5 says another process has the file locked."""
    deadline, delay = time.monotonic() + patience, 0.01
    while True:
        try:
            return opener()
        except BlockingIOError:
            if time.monotonic() > deadline:
                raise StoreError(
                    path,
                    f"locked by another process that has it open (waited {patience:g} s); "
                    "close it there, or wait for that process to end",
                ) from None
            time.sleep(delay)
            delay = min(2 * delay, 0.5)


def create_store(
    path: str | os.PathLike,
    space: FunctionSpace,
    *,
    fields: Sequence[str],
    n_samples: int,
    attrs: Mapping[str, object] | None = None,
    chunk_size: int = 32,
) -> None:
    """Create an empty store for ``n_samples`` samples of ``fields`` on ``space``.

    Args:
        path: the file to create (an existing one is replaced).
        space: the FE space of every field: its mesh and element are stored.
        fields: field names, e.g. ``["a", "u"]``.
        n_samples: samples the store will hold.
        attrs: further root attributes; dicts and lists are stored as JSON.
        chunk_size: samples per written chunk (recorded; resumption uses it).
    """
    if n_samples < 1:
        raise ValueError(f"`n_samples` must be at least 1, got {n_samples}")
    if not fields or len(set(fields)) != len(fields):
        raise ValueError(f"`fields` must be distinct names, got {list(fields)}")
    reserved = {"mesh_points", "mesh_cells", "sample", "dof", "vertex", "cell", "corner", "axis"}
    if reserved & set(fields):
        raise ValueError(f"field names {sorted(reserved & set(fields))} are reserved")
    with open_h5(path, "w") as f:
        f.attrs["fenop_format"] = FORMAT_VERSION
        f.attrs["element"] = space.element
        f.attrs["fields"] = json.dumps(list(fields))
        f.attrs["n_samples"] = int(n_samples)
        f.attrs["n_complete"] = 0
        f.attrs["chunk_size"] = int(chunk_size)
        for key, value in (attrs or {}).items():
            f.attrs[key] = json.dumps(value) if isinstance(value, dict | list) else value
        points = f.create_dataset("mesh_points", data=space.mesh.p.T.astype(np.float64))
        cells = f.create_dataset("mesh_cells", data=space.mesh.t.T.astype(np.int64))
        _attach(f, points, ("vertex", "axis"))
        _attach(f, cells, ("cell", "corner"))
        # Early allocation: writing samples later touches only raw data, never the
        # file's structure, so an interruption cannot leave the metadata inconsistent.
        dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
        dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)
        for name in fields:
            data = f.create_dataset(
                name, shape=(n_samples, space.n_dofs), dtype=np.float64, fillvalue=np.nan, dcpl=dcpl
            )
            _attach(f, data, ("sample", "dof"))


def write_samples(path: str | os.PathLike, start: int, values: Mapping[str, np.ndarray]) -> None:
    """Write samples ``start, start + 1, ...`` of every field and mark them complete.

    Args:
        path: a store made by :func:`create_store`.
        start: index of the first sample; must equal the store's ``n_complete``.
        values: per field, an array ``(k, n_dofs)``.
    """
    with open_h5(path, "r+") as f:
        if start != int(f.attrs["n_complete"]):
            raise ValueError(
                f"{os.fspath(path)}: samples must be written in order: next is "
                f"{int(f.attrs['n_complete'])}, got {start}"
            )
        fields = json.loads(f.attrs["fields"])
        if set(values) != set(fields):
            raise ValueError(f"`values` must hold the fields {fields}, got {sorted(values)}")
        counts = {np.shape(v)[0] for v in values.values()}
        if len(counts) != 1:
            raise ValueError(f"every field needs the same number of samples, got {counts}")
        (count,) = counts
        for name in fields:
            f[name][start : start + count] = values[name]
        f.flush()  # the data first, then the count that declares it complete
        f.attrs["n_complete"] = start + count


def _open(path: str | os.PathLike) -> h5py.File:
    path = Path(path)
    if problem := missing_file(path):
        raise StoreError(path, problem)
    try:
        return open_h5(path, "r")
    except OSError as exc:
        raise StoreError(path, f"not a readable HDF5 file (truncated or corrupt?): {exc}") from None


def read_header(path: str | os.PathLike) -> dict:
    """The root attributes of a store, JSON values decoded; checks the format version."""
    with _open(path) as f:
        return _header(path, f)


def _header(path, f: h5py.File) -> dict:
    if "fenop_format" not in f.attrs:
        raise StoreError(path, "not a fenop store (no 'fenop_format' attribute)")
    version = int(f.attrs["fenop_format"])
    if version > FORMAT_VERSION:
        raise StoreError(
            path,
            f"written in store format {version}, newer than this fenop reads "
            f"({FORMAT_VERSION}); upgrade fenop",
        )
    header = {}
    for key, value in f.attrs.items():
        if isinstance(value, bytes):
            value = value.decode()
        if isinstance(value, str) and value[:1] in "[{":
            value = json.loads(value)
        elif isinstance(value, np.generic):
            value = value.item()
        header[key] = value
    for key in ("element", "fields", "n_samples", "n_complete"):
        if key not in header:
            raise StoreError(path, f"missing attribute {key!r}")
    return header


def _mesh(path, f: h5py.File) -> skfem.Mesh:
    for name in ("mesh_points", "mesh_cells"):
        if name not in f:
            raise StoreError(path, f"missing dataset {name!r}")
    points, cells = f["mesh_points"][()], f["mesh_cells"][()]
    if points.ndim != 2 or cells.ndim != 2:
        raise StoreError(path, "mesh_points and mesh_cells must be 2-D")
    kind = _MESH_TYPES.get((points.shape[1], cells.shape[1]))
    if kind is None:
        raise StoreError(
            path, f"unsupported mesh: {points.shape[1]}-D points with {cells.shape[1]}-vertex cells"
        )
    if cells.size and (cells.min() < 0 or cells.max() >= len(points)):
        raise StoreError(path, "mesh_cells refers to vertices that mesh_points does not have")
    return kind(np.ascontiguousarray(points.T), np.ascontiguousarray(cells.T))


def store_space(path: str | os.PathLike) -> FunctionSpace:
    """The FE space a store's fields live in: its mesh, element and Dirichlet DOFs."""
    with _open(path) as f:
        header = _header(path, f)
        mesh = _mesh(path, f)
    dirichlet = header.get("dirichlet", "boundary")
    if dirichlet not in ("boundary", "none"):
        raise StoreError(path, f"unknown dirichlet attribute {dirichlet!r}")
    degree = _DEGREES.get(header["element"])
    if degree is None:
        raise StoreError(path, f"unknown element {header['element']!r}")
    try:
        return FunctionSpace(
            mesh, degree=degree, dirichlet=None if dirichlet == "none" else dirichlet
        )
    except ValueError as exc:
        raise StoreError(path, str(exc)) from None


def validate_store(
    path: str | os.PathLike,
    *,
    fields: Iterable[str] | None = None,
    allow_partial: bool = False,
    check_values: bool = True,
) -> dict:
    """Check a store and return its header; raise :class:`StoreError` naming the problem.

    Checked: the file opens, is a fenop store of a format this version reads, its
    mesh is valid, every listed field (and every one in ``fields``) is present with
    shape ``(n_samples, n_dofs)``, the store is complete (unless ``allow_partial``),
    and (with ``check_values``) the complete samples hold no NaN or Inf.
    """
    return _validate(path, fields, allow_partial, check_values)[0]


def _validate(path, fields, allow_partial: bool, check_values: bool) -> tuple[dict, FunctionSpace]:
    """:func:`validate_store`, also returning the space it built on the way."""
    space = store_space(path)
    with _open(path) as f:
        header = _header(path, f)
        listed = header["fields"]
        wanted = list(listed) + [name for name in (fields or ()) if name not in listed]
        n_samples, n_complete = int(header["n_samples"]), int(header["n_complete"])
        for name in wanted:
            if name not in f:
                raise StoreError(path, f"missing field {name!r} (fields here: {sorted(listed)})")
            shape = f[name].shape
            if shape != (n_samples, space.n_dofs):
                raise StoreError(
                    path,
                    f"field {name!r} has shape {shape}, expected ({n_samples}, {space.n_dofs}) "
                    f"for {n_samples} samples of {space.element} on this mesh",
                )
        if n_complete < n_samples and not allow_partial:
            raise StoreError(
                path,
                f"incomplete: {n_complete} of {n_samples} samples written (an interrupted "
                "generation; run the same generate command again to complete it)",
            )
        if check_values:
            for name in wanted:
                for start in range(0, n_complete, _VALIDATION_ROWS):
                    block = f[name][start : min(start + _VALIDATION_ROWS, n_complete)]
                    bad = ~np.isfinite(block)
                    if bad.any():
                        row = start + int(np.nonzero(bad.any(axis=1))[0][0])
                        raise StoreError(path, f"field {name!r} holds NaN or Inf in sample {row}")
    return header, space


def open_store(path: str | os.PathLike, *, allow_partial: bool = False):
    """Validate a store and open it as an ``xarray.Dataset`` (dims ``sample``, ``dof``).

    The DOF coordinates are attached as ``x``, ``y`` (``z``) coordinates along
    ``dof``. With ``allow_partial``, an incomplete store opens with just its
    complete samples. The file stays open while the dataset is used: close it (or
    open it in a ``with`` block) before writing to the file again.
    """
    import xarray as xr

    header, space = _validate(path, None, allow_partial, check_values=True)
    ds = _waiting(lambda: xr.open_dataset(path, engine="h5netcdf"), path, 60.0)
    names = ("x", "y", "z")[: space.dim]
    view = ds.isel(sample=slice(0, int(header["n_complete"]))).assign_coords(
        {n: ("dof", space.dof_points[:, i]) for i, n in enumerate(names)}
    )
    view.set_close(ds.close)  # closing the view (or leaving its `with`) closes the file
    return view
