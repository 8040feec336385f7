"""The HDF5 store: fields at the DOFs of a mesh, one file per data set.

Layout (format 1), readable by ``xarray.open_dataset(path, engine="h5netcdf")``
without fenop, thanks to HDF5 dimension scales::

    / attrs      fenop_format = 1, pde, element, dirichlet ("boundary" or "none"),
                 fields (JSON list), parameters (JSON), seed, n_samples,
                 n_complete, chunk_size
    /mesh_points (vertex, axis)  float64   mesh vertices
    /mesh_cells  (cell, corner)  int64     connectivity into mesh_points
    /<field>     (sample, dof)   float64   one dataset per field
    /time        (time,)         float64   trajectory stores: the times of the states
    /<field>     (sample, time, dof)       a trajectory: one state per time

A field is either static, one row per sample, or a trajectory, one state per entry
of ``/time`` (increasing); a store may hold both (a coefficient and the states it
drives).

A file written by hand needs only ``fenop_format``, ``element``, the mesh and its
fields (float32 or float64; cells int32 or int64), and ``/time`` where it holds
trajectories: without ``fields`` the fields are its other (sample, dof) and
(sample, time, dof) datasets, without ``n_samples`` their length, and without
``n_complete`` it is complete (docs/formats.md).

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

import dataclasses
import json
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence

import h5py
import numpy as np
import skfem

from fenop.data.header import (
    FORMAT_VERSION,
    StoreError,
    _header,
    _open,
    _waiting,
    field_name_problem,
    open_h5,
)
from fenop.fem import FunctionSpace
from fenop.fem.mesh import mesh_from_arrays

_DEGREES = {"P1": 1, "P2": 2, "Q1": 1, "Q2": 2}
# Rows checked for NaN/Inf per read while validating: bounds memory on large files.
_VALIDATION_ROWS = 256


def _scale(f: h5py.File, name: str, size: int) -> h5py.Dataset:
    """A dimension-scale dataset (what netCDF and xarray read as a dimension)."""
    if name not in f:
        f.create_dataset(name, data=np.arange(size, dtype=np.int64)).make_scale(name)
    return f[name]


def _attach(f: h5py.File, dataset: h5py.Dataset, dims: Sequence[str]) -> None:
    for axis, name in enumerate(dims):
        dataset.dims[axis].attach_scale(_scale(f, name, dataset.shape[axis]))


def create_store(
    path: str | os.PathLike,
    space: FunctionSpace,
    *,
    fields: Sequence[str],
    n_samples: int,
    attrs: Mapping[str, object] | None = None,
    chunk_size: int = 32,
    times: Sequence[float] | None = None,
    trajectories: Sequence[str] = (),
) -> None:
    """Create an empty store for ``n_samples`` samples of ``fields`` on ``space``.

    Args:
        path: the file to create (an existing one is replaced).
        space: the FE space of every field: its mesh and element are stored.
        fields: field names, e.g. ``["a", "u"]``.
        n_samples: samples the store will hold.
        attrs: further root attributes; dicts and lists are stored as JSON.
        chunk_size: samples per written chunk (recorded; resumption uses it).
        times: the times of a trajectory's states ``(n_times,)``, increasing; needed
            with ``trajectories``.
        trajectories: the fields (of ``fields``) that hold a state per time,
            ``(n_samples, n_times, n_dofs)``; the others are ``(n_samples, n_dofs)``.
    """
    if n_samples < 1:
        raise ValueError(f"`n_samples` must be at least 1, got {n_samples}")
    if not fields or len(set(fields)) != len(fields):
        raise ValueError(f"`fields` must be distinct names, got {list(fields)}")
    for name in fields:
        if problem := field_name_problem(name):
            raise ValueError(f"field name {name!r}: {problem}")
    if not set(trajectories) <= set(fields):
        raise ValueError(
            f"`trajectories` must be among `fields` {list(fields)}, got {list(trajectories)}"
        )
    if trajectories:
        if times is None:
            raise ValueError("`times` must be given with `trajectories`")
        if problem := times_problem(np.asarray(times)):
            raise ValueError(f"`times`: {problem}")
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
        if trajectories:
            f.create_dataset("time", data=np.asarray(times, dtype=np.float64)).make_scale("time")
        for name in fields:
            moving = name in trajectories
            shape = (n_samples, len(times)) if moving else (n_samples,)
            data = f.create_dataset(
                name,
                shape=(*shape, space.n_dofs),
                dtype=np.float64,
                fillvalue=np.nan,
                dcpl=dcpl,
            )
            _attach(f, data, ("sample", "time", "dof") if moving else ("sample", "dof"))


def write_samples(path: str | os.PathLike, start: int, values: Mapping[str, np.ndarray]) -> None:
    """Write samples ``start, start + 1, ...`` of every field and mark them complete.

    Args:
        path: a store made by :func:`create_store`.
        start: index of the first sample; must equal the store's ``n_complete``.
        values: per field, an array ``(k, n_dofs)``, or ``(k, n_times, n_dofs)`` for
            a trajectory.
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


def _mesh(path, f: h5py.File) -> skfem.Mesh:
    for name in ("mesh_points", "mesh_cells"):
        if name not in f:
            raise StoreError(path, f"missing dataset {name!r}")
    cells = f["mesh_cells"]
    if not np.issubdtype(cells.dtype, np.integer):
        raise StoreError(path, f"mesh_cells must hold integers, got {cells.dtype}")
    try:
        return mesh_from_arrays(f["mesh_points"][()], cells[()])
    except ValueError as exc:
        raise StoreError(path, f"mesh_points and mesh_cells: {exc}") from None


@dataclasses.dataclass(frozen=True)
class StoreInfo:
    """What a store holds, read in one opening: its header, its FE space, and which
    fields are checked. Values are not read; :meth:`check_values` scans rows of them.

    Attributes:
        path: the file.
        header: root attributes, JSON values decoded (:func:`read_header`).
        space: the FE space of its fields (mesh, element, Dirichlet DOFs).
        fields: the fields whose presence and shape were checked.
        times: the times of the trajectories' states ``(n_times,)``; ``None`` in a
            store without trajectories.
        trajectories: those of ``fields`` that hold a state per time,
            ``(n_samples, n_times, n_dofs)``.
    """

    path: str
    header: dict
    space: FunctionSpace
    fields: tuple[str, ...]  # those whose presence and shape were checked
    times: np.ndarray | None = None
    trajectories: tuple[str, ...] = ()

    def require_static(self, fields: Iterable[str], *, reader: str) -> None:
        """Raise a :class:`StoreError` if one of ``fields`` is a trajectory, which
        ``reader`` (what reads one row per sample) cannot take."""
        moving = [name for name in fields if name in self.trajectories]
        if moving:
            raise StoreError(
                self.path,
                f"field {moving[0]!r} is a trajectory (sample, time, dof) of {len(self.times)} "
                f"states; {reader} reads fields of one row per sample (sample, dof)",
            )

    @property
    def n_samples(self) -> int:
        return int(self.header["n_samples"])

    @property
    def n_complete(self) -> int:
        return int(self.header["n_complete"])

    def check_values(self, fields: Iterable[str], rows: Iterable[int] | None = None) -> None:
        """Raise a :class:`StoreError` if ``fields`` hold NaN or Inf in ``rows``
        (default: every complete sample). Reads a block of rows at a time."""
        rows = np.arange(self.n_complete) if rows is None else np.unique(np.asarray(rows))
        with _open(self.path) as f:
            for name in fields:
                for start in range(0, len(rows), _VALIDATION_ROWS):
                    block_rows = rows[start : start + _VALIDATION_ROWS]
                    # contiguous rows are one slice; h5py reads others point by point
                    if block_rows[-1] - block_rows[0] == len(block_rows) - 1:
                        block = f[name][block_rows[0] : block_rows[-1] + 1]
                    else:
                        block = f[name][block_rows]
                    bad = ~np.isfinite(block).reshape(len(block), -1)
                    if bad.any():
                        row = int(block_rows[np.nonzero(bad.any(axis=1))[0][0]])
                        raise StoreError(
                            self.path, f"field {name!r} holds NaN or Inf in sample {row}"
                        )


def read_batches(
    store: StoreInfo,
    fields: Sequence[str],
    batch_size: int,
    *,
    dtype=np.float64,
    first: int = 0,
    stop: int | None = None,
) -> Iterator[tuple[int, np.ndarray]]:
    """Samples ``first .. stop - 1`` (default: every complete one) of ``fields``,
    ``batch_size`` at a time, in one opening of the file:
    ``(start, values (b, len(fields), n_dofs))`` in ``dtype``. A StoreError names
    the first sample whose (finite) values overflow ``dtype`` (1e300 in float32), or
    a field that is a trajectory."""
    store.require_static(fields, reader="this reader")
    stop = store.n_complete if stop is None else min(stop, store.n_complete)
    with _open(store.path) as f:
        for start in range(first, stop, batch_size):
            end = min(start + batch_size, stop)
            values = np.stack([f[name][start:end] for name in fields], axis=1)
            with np.errstate(over="ignore"):
                cast = values.astype(dtype)
            # only a cast to a narrower float can overflow (float64 to float32)
            if values.dtype.kind == "f" and values.dtype.itemsize > cast.dtype.itemsize:
                overflow = np.isfinite(values).all(axis=(1, 2)) & ~np.isfinite(cast).all(
                    axis=(1, 2)
                )
                if overflow.any():
                    raise StoreError(
                        store.path,
                        f"sample {start + int(np.argmax(overflow))} holds values beyond the "
                        f"range of {cast.dtype.name}, the model's precision",
                    )
            yield start, cast


def sample_range(samples: slice | None, n: int, path: str | os.PathLike) -> slice:
    """``samples`` ``START:STOP`` (either may be left out; default all) of the ``n``
    samples of the store at ``path``; a StoreError where the range holds none or
    reaches past the store (nothing is clipped silently)."""
    if samples is None:
        return slice(None)
    start = 0 if samples.start is None else samples.start
    stop = n if samples.stop is None else samples.stop
    span = (
        f"{'' if samples.start is None else samples.start}:{'' if samples.stop is None else stop}"
    )
    if start >= min(stop, n):
        raise StoreError(path, f"no samples in {span} of its {n}")
    if stop > n:
        raise StoreError(path, f"samples {span} asked for, but it holds {n}")
    return slice(start, stop, samples.step)


def read_store(
    path: str | os.PathLike, *, fields: Iterable[str] | None = None, allow_partial: bool = False
) -> StoreInfo:
    """Open a store once and check its structure; raise :class:`StoreError` naming the problem.

    Checked: the file opens, is a fenop store of a format this version reads, its
    mesh and element are valid, every listed field (and every one in ``fields``) is
    present with shape ``(n_samples, n_dofs)``, or ``(n_samples, n_times, n_dofs)``
    with increasing times in ``/time``, and the store is complete (unless
    ``allow_partial``). Values are checked by :meth:`StoreInfo.check_values`.
    """
    with _open(path) as f:
        header = _header(path, f)
        space = _space(path, header, _mesh(path, f))
        listed = header["fields"]
        wanted = list(listed) + [name for name in (fields or ()) if name not in listed]
        n_samples, n_complete = int(header["n_samples"]), int(header["n_complete"])
        times, trajectories = None, []
        for name in wanted:
            if name not in f:
                raise StoreError(path, f"missing field {name!r} (fields here: {sorted(listed)})")
            shape = f[name].shape
            kind = f[name].dtype.kind
            if kind not in "fiu":
                what = "complex" if kind == "c" else f"of type {f[name].dtype}"
                raise StoreError(path, f"field {name!r} is {what}; fields hold real numbers")
            if len(shape) == 3:
                if times is None:
                    times = _times(path, f, name)
                trajectories.append(name)
                expected = (n_samples, len(times), space.n_dofs)
                if shape != expected:
                    raise StoreError(
                        path,
                        f"field {name!r} has shape {shape}, expected {expected} for "
                        f"{n_samples} samples of {len(times)} states (the times in 'time') of "
                        f"{space.element} on this mesh",
                    )
            elif shape != (n_samples, space.n_dofs):
                raise StoreError(
                    path,
                    f"field {name!r} has shape {shape}, expected ({n_samples}, {space.n_dofs}) "
                    f"for {n_samples} samples of {space.element} on this mesh",
                )
    if n_samples == 0:
        raise StoreError(path, "holds no samples")
    if n_complete < n_samples and not allow_partial:
        raise StoreError(
            path,
            f"incomplete: {n_complete} of {n_samples} samples written (an interrupted "
            "generation; run the same generate command again to complete it)",
        )
    return StoreInfo(os.fspath(path), header, space, tuple(wanted), times, tuple(trajectories))


def times_problem(times: np.ndarray) -> str | None:
    """Why ``times`` cannot be the times of a trajectory's states, or ``None``."""
    if times.ndim != 1 or len(times) < 2:
        return f"must list at least two times, got shape {times.shape}"
    if times.dtype.kind not in "fiu":
        return f"must hold real numbers, got {times.dtype}"
    if not np.isfinite(times).all():
        return "holds NaN or Inf"
    if not (np.diff(times) > 0).all():
        return "must increase from state to state"
    return None


def _times(path, f: h5py.File, field: str) -> np.ndarray:
    """The ``/time`` dataset of a store with the trajectory ``field``, checked."""
    if "time" not in f or not isinstance(f["time"], h5py.Dataset):
        raise StoreError(
            path,
            f"field {field!r} is a trajectory (sample, time, dof), but the store has no "
            "'time' dataset with the times of its states",
        )
    times = f["time"][()]
    if problem := times_problem(times):
        raise StoreError(path, f"dataset 'time' {problem}")
    return times.astype(np.float64)


def _space(path, header: dict, mesh: skfem.Mesh) -> FunctionSpace:
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


def dirichlet_label(space: FunctionSpace) -> str:
    """What a store's header and a model's description record of ``space``'s boundary
    condition: ``"boundary"`` where it has Dirichlet DOFs, ``"none"`` where it has
    none; a store's space is made back from it."""
    return "boundary" if len(space.boundary_dofs) else "none"


def store_space(path: str | os.PathLike) -> FunctionSpace:
    """The FE space a store's fields live in: its mesh, element and Dirichlet DOFs."""
    return read_store(path, allow_partial=True).space


def validate_store(
    path: str | os.PathLike,
    *,
    fields: Iterable[str] | None = None,
    allow_partial: bool = False,
    check_values: bool = True,
) -> dict:
    """Check a store and return its header; raise :class:`StoreError` naming the problem.

    :func:`read_store`'s checks, and (with ``check_values``) that the complete
    samples of every field checked hold no NaN or Inf.
    """
    store = read_store(path, fields=fields, allow_partial=allow_partial)
    if check_values:
        listed = store.header["fields"]
        store.check_values(list(listed) + [n for n in (fields or ()) if n not in listed])
    return store.header


def open_store(path: str | os.PathLike, *, allow_partial: bool = False):
    """Validate a store and open it as an ``xarray.Dataset`` (dims ``sample``, ``dof``,
    and ``time``, with the states' times as its coordinate, for trajectories).

    The DOF coordinates are attached as ``x``, ``y`` (``z``) coordinates along
    ``dof``. With ``allow_partial``, an incomplete store opens with just its
    complete samples. The file stays open while the dataset is used: close it (or
    open it in a ``with`` block) before writing to the file again.
    """
    import xarray as xr

    store = read_store(path, allow_partial=allow_partial)
    store.check_values(store.header["fields"])
    header, space = store.header, store.space
    ds = _waiting(lambda: xr.open_dataset(path, engine="h5netcdf", phony_dims="sort"), path, 60.0)
    close = ds.close
    fields = header["fields"]
    if "sample" not in ds.dims:  # written without dimension scales (by hand): the
        # fields' unnamed axes are (sample, dof) or (sample, time, dof); the mesh is
        # left out
        def named(name):
            dims = ("sample", "time", "dof") if name in store.trajectories else ("sample", "dof")
            return ds[name].rename(dict(zip(ds[name].dims, dims, strict=True)))

        ds = xr.Dataset({name: named(name) for name in fields})
        if store.trajectories:
            ds = ds.assign_coords(time=("time", store.times))
    names = ("x", "y", "z")[: space.dim]
    view = ds.isel(sample=slice(0, int(header["n_complete"]))).assign_coords(
        {n: ("dof", space.dof_points[:, i]) for i, n in enumerate(names)}
    )
    view.set_close(close)  # closing the view (or leaving its `with`) closes the file
    return view
