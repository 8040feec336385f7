"""Stores to and from meshio's formats: fields for ParaView, and fields from other solvers.

:func:`store_to_meshio` writes a store's fields (and, given a store of predictions on
the same mesh, the predictions and their errors) as an XDMF time series, one step
per sample (meshio's ``TimeSeriesWriter``, which ParaView reads as a time series;
its arrays go to the ``.h5`` file of the same name), or
as VTU files, one per sample (``OUT_0000.vtu``, ``OUT_0001.vtu``, ..., which ParaView
groups). :func:`meshio_to_store` reads a mesh file with point data (an XDMF time
series: one sample per step; any other meshio file: one sample) into a store.

Fields are the values at the DOFs: P1 and Q1 fields at the vertices (meshio's
``triangle``, ``quad``), P2 and Q2 fields at the nodes of second-order cells
(``triangle6``, ``quad9``: corners, edge midpoints, for Q2 the centre), so nothing is
lost either way.

>>> import tempfile, pathlib
>>> from fenop.data import generate
>>> from fenop.fem import unit_square
>>> folder = pathlib.Path(tempfile.mkdtemp())
>>> store = generate("darcy", 3, unit_square(9), seed=0, path=folder / "d.h5", progress=False)
>>> [p.name for p in store_to_meshio(store, folder / "view.xdmf")]
['view.xdmf', 'view.h5']
>>> meshio_to_store(folder / "view.xdmf", folder / "back.h5").name
'back.h5'
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

import meshio
import numpy as np

from fenop._errors import InputError
from fenop._files import replacing
from fenop.data.header import StoreError, _open, field_name_problem
from fenop.data.store import create_store, read_batches, read_store, sample_range, write_samples
from fenop.fem import FunctionSpace
from fenop.fem.mesh import MeshError, mesh_from_arrays

__all__ = ["meshio_to_store", "store_to_meshio"]

# meshio's cell type of each element, and back (first- and second-order Lagrange)
_CELL_TYPES = {
    ("MeshTri1", 1): "triangle",
    ("MeshTri1", 2): "triangle6",
    ("MeshQuad1", 1): "quad",
    ("MeshQuad1", 2): "quad9",
    ("MeshTet1", 1): "tetra",
}
_ELEMENTS = {"triangle": "P1", "triangle6": "P2", "quad": "Q1", "quad9": "Q2", "tetra": "P1"}
_CORNERS = {"triangle": 3, "triangle6": 3, "quad": 4, "quad9": 4, "tetra": 4}
_DEGREES = {"P1": 1, "P2": 2, "Q1": 1, "Q2": 2}


def _cells(space: FunctionSpace) -> tuple[np.ndarray, list[tuple[str, np.ndarray]]]:
    """The DOF points ``(n_dofs, dim)`` and meshio cells whose nodes are the DOFs."""
    kind = _CELL_TYPES.get((type(space.mesh).__name__, space.degree))
    if kind is None:
        raise InputError(f"{space.element} on {type(space.mesh).__name__} has no meshio cell type")
    # scikit-fem numbers a cell's DOFs corners first, then its edges in the order
    # (0, 1), (1, 2), (0, 2) / (2, 3), (0, 3), then the centre: VTK's node order.
    return space.dof_points, [(kind, space.basis.element_dofs.T.astype(np.int64))]


def store_to_meshio(
    store: str | os.PathLike,
    output: str | os.PathLike,
    *,
    predictions: str | os.PathLike | None = None,
    samples: slice | None = None,
    overwrite: bool = False,
) -> list[Path]:
    """Write the fields of ``store`` (samples ``samples``, default all complete ones)
    to ``output``: ``.xdmf`` (one time step per sample, its arrays in the ``.h5``
    file of its name beside it) or ``.vtu`` (one file per sample, numbered when there
    are several). With ``predictions``, a store on the same mesh, its fields too, as
    ``NAME_predicted``, and ``NAME_error`` (prediction minus the store's value) where
    the store has the field. Returns the files written, all of which appear or none.

    Raises:
        StoreError: a store cannot be used, or the two are on different meshes;
        InputError: ``output`` has another extension, exists (without
            ``overwrite``), or would replace an input.
    """
    output = Path(output)
    if output.suffix not in (".xdmf", ".vtu"):
        raise InputError(
            f"{output}: write .xdmf (a time series, one step per sample) or .vtu "
            "(a file per sample)"
        )
    info = read_store(store, allow_partial=True)
    chosen = range(info.n_complete)[sample_range(samples, info.n_complete, store)]
    if info.trajectories:
        return _trajectories_to_xdmf(info, output, chosen, predictions, overwrite)
    fields = _rows(info, chosen)
    if predictions is not None:
        other = _predictions(info, predictions, chosen.stop)
        _add_predictions(fields, _rows(other, chosen))
    points, cells = _cells(info.space)
    if output.suffix == ".xdmf":
        targets = [output, output.with_suffix(".h5")]  # its arrays, where meshio puts them
    elif len(chosen) == 1:
        targets = [output]
    else:
        targets = [output.with_name(f"{output.stem}_{i:04d}.vtu") for i in chosen]
    _check_targets(targets, (store, predictions), overwrite)
    with _staged(output.parent, targets) as staging:
        if output.suffix == ".xdmf":
            steps = [
                (float(sample), {name: values[k] for name, values in fields.items()})
                for k, sample in enumerate(chosen)
            ]
            _write_xdmf(staging[0], points, cells, steps)
        else:
            for k, path in enumerate(staging):
                data = {name: values[k] for name, values in fields.items()}
                mesh = meshio.Mesh(points, cells, point_data=data)
                _quietly(meshio.write, str(path), mesh, file_format="vtu")
    if overwrite and output.suffix == ".vtu":  # the replaced series' other members
        for old in _series(output):
            if old not in targets:
                old.unlink(missing_ok=True)
    return targets


def _series(output: Path) -> list[Path]:
    """The files of a VTU series written to ``output``: ``output`` itself and
    ``STEM_NNNN.vtu`` beside it."""
    member = re.compile(rf"{re.escape(output.stem)}_\d{{4,}}\.vtu")
    found = [p for p in output.parent.iterdir() if member.fullmatch(p.name)]
    return sorted(found) + ([output] if output.exists() else [])


def _write_xdmf(path: Path, points, cells, steps: list[tuple[float, dict]]) -> None:
    """A time series of ``steps``, each ``(time, {name: values (n_dofs,)})``; meshio
    writes the arrays to ``path`` with ``.h5``, which the XDMF file names without a
    folder."""
    # meshio (5.3) writes the arrays to the current folder, not the XDMF file's: so
    # it writes from the XDMF file's folder (a private staging folder).
    with contextlib.chdir(path.parent), meshio.xdmf.TimeSeriesWriter(path.name) as writer:
        _quietly(writer.write_points_cells, points, cells)
        for time, data in steps:
            _quietly(writer.write_data, time, point_data=data)


def _trajectories_to_xdmf(info, output: Path, chosen: range, predictions, overwrite) -> list[Path]:
    """A store of trajectories as an XDMF time series over its times: each chosen
    sample's fields (named ``u``, or ``u_3``, ``u_4``, ... for several samples), static
    fields the same at every step, and a trajectory store of predictions with the
    same times as ``u_predicted`` and ``u_error``."""
    if output.suffix != ".xdmf":
        raise InputError(f"{output}: a store of trajectories converts to .xdmf, a time series")
    rows = list(chosen)
    fields = _sample_fields(info, rows)
    if predictions is not None:
        other = _predictions(info, predictions, rows[-1] + 1)
        if other.times is None or not np.allclose(other.times, info.times, rtol=1e-9, atol=0):
            raise StoreError(predictions, f"its states are not at the times of {info.path}")
        _add_predictions(fields, _sample_fields(other, rows))
    steps = []
    for t, time in enumerate(info.times):
        data = {}
        for name, values in fields.items():  # values (k, T, n) or, static, (k, n)
            for k, row in enumerate(rows):
                label = name if len(rows) == 1 else f"{name}_{row}"
                data[label] = values[k, t] if values.ndim == 3 else values[k]
        steps.append((float(time), data))
    targets = [output, output.with_suffix(".h5")]
    _check_targets(targets, (info.path, predictions), overwrite)
    points, cells = _cells(info.space)
    with _staged(output.parent, targets) as staging:
        _write_xdmf(staging[0], points, cells, steps)
    return targets


def _predictions(info, predictions, needed: int):
    """The store of ``predictions`` read (a StoreInfo), or a StoreError where it is
    on another mesh than ``info``'s or holds fewer than ``needed`` samples."""
    other = read_store(predictions, allow_partial=True)
    if not _same_space(info.space, other.space):
        raise StoreError(predictions, f"its mesh or element is not that of {info.path}")
    if other.n_complete < needed:
        raise StoreError(predictions, f"holds {other.n_complete} samples; {needed} are needed")
    return other


def _add_predictions(fields: dict, predicted: dict) -> None:
    """Each predicted field into ``fields`` as ``NAME_predicted``, with ``NAME_error``
    (prediction minus value) where ``fields`` has ``NAME``."""
    for name, values in predicted.items():
        fields[f"{name}_predicted"] = values
        if name in fields:
            fields[f"{name}_error"] = values - fields[name]


def _check_targets(targets: Sequence[Path], sources, overwrite: bool) -> None:
    """An InputError where a file to write is one of ``sources`` (paths or ``None``)
    or exists without ``overwrite``."""
    inputs = {Path(p).resolve() for p in sources if p is not None}
    for target in targets:
        if target.resolve() in inputs:
            raise InputError(f"{target}: is an input; name the output otherwise")
        if target.exists() and not overwrite:
            raise InputError(f"{target}: exists; pass --overwrite to replace it")


def _sample_fields(info, rows: list[int]) -> dict[str, np.ndarray]:
    """Each field of a store at the samples ``rows`` (increasing): ``(k, T, n_dofs)``
    for a trajectory, ``(k, n_dofs)`` for a static field, float64."""
    with _open(info.path) as f:
        return {name: f[name][rows].astype(np.float64) for name in info.header["fields"]}


@contextlib.contextmanager
def _staged(folder: Path, targets: Sequence[Path]):
    """Paths in a hidden folder beside the targets, one per target (same names);
    moved onto the targets when the block ends without error, else removed."""
    if not folder.is_dir():
        raise InputError(f"{targets[0]}: cannot be written, folder {folder} does not exist")
    try:
        staging = Path(tempfile.mkdtemp(prefix=f".{targets[0].name}.", dir=folder))
    except OSError as exc:
        raise InputError(f"{targets[0]}: cannot be written ({exc.strerror})") from None
    try:
        yield [staging / target.name for target in targets]
        umask = os.umask(0)
        os.umask(umask)
        for target in targets:
            (staging / target.name).chmod(0o666 & ~umask)
            os.replace(staging / target.name, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _rows(store, chosen: range) -> dict[str, np.ndarray]:
    """Each field of ``store`` (a StoreInfo) at the samples ``chosen`` ``(k, n_dofs)``,
    float64, read in one opening by the store's own reader."""
    names = list(store.header["fields"])
    stop = chosen.start + (len(chosen) - 1) * chosen.step + 1
    _, values = next(read_batches(store, names, stop - chosen.start, first=chosen.start, stop=stop))
    return {name: values[:: chosen.step, k] for k, name in enumerate(names)}


def _same_space(a: FunctionSpace, b: FunctionSpace) -> bool:
    return (
        a.element == b.element
        and a.mesh.p.shape == b.mesh.p.shape
        and np.array_equal(a.mesh.p, b.mesh.p)
        and np.array_equal(a.mesh.t, b.mesh.t)
    )


class _MeshioGaveUp(Exception):
    """meshio ended with ``sys.exit``; the message is what it printed before."""


def _quietly(function, *args, **kwargs):
    """meshio prints as it reads and writes: not to the user's terminal. Where it
    gives up with ``sys.exit`` (a file it cannot read), what it printed says why."""
    chatter = io.StringIO()
    try:
        with contextlib.redirect_stdout(chatter), contextlib.redirect_stderr(chatter):
            return function(*args, **kwargs)
    except SystemExit:
        said = " ".join(chatter.getvalue().split()).removeprefix("Error: ")
        raise _MeshioGaveUp(said or "meshio gave up on it") from None


def meshio_to_store(
    path: str | os.PathLike, output: str | os.PathLike, *, overwrite: bool = False
) -> Path:
    """A store of the point data of the mesh file ``path``: an XDMF time series gives
    one sample per step, any other file meshio reads one sample. Its cells (the
    highest-dimensional block: ``triangle``, ``quad``, their second-order
    ``triangle6``, ``quad9``, or ``tetra``) give the mesh and the element (P1, Q1,
    P2, Q2); every scalar point-data array is a field (others are skipped).

    Raises:
        InputError: the file cannot be read, has no supported cells or no scalar
            point data, or ``output`` exists (without ``overwrite``).
    """
    path, output = Path(path), Path(output)
    if output.exists() and not overwrite:
        raise InputError(f"{output}: exists; pass --overwrite to replace it")
    if not path.is_file():
        problem = "a directory, not a file" if path.is_dir() else "no such file"
        raise InputError(f"{path}: {problem}")
    if output.resolve() == path.resolve() or output.resolve() in _data_files(path):
        what = "the input" if output.resolve() == path.resolve() else f"where {path} keeps its data"
        raise InputError(f"{output}: is {what}; write the store elsewhere")
    points, cells, steps = _read(path)
    kind, nodes = _highest_cells(path, cells)
    corners = nodes[:, : _CORNERS[kind]]
    used, vertices = np.unique(corners, return_inverse=True)  # unused points dropped
    dim = 3 if kind == "tetra" else 2
    if dim == 2 and points.shape[1] == 3:
        if np.any(points[:, 2] != 0):
            raise InputError(f"{path}: a 2-D mesh ({kind}) with points off the plane z = 0")
        points = points[:, :2]
    try:
        mesh = mesh_from_arrays(points[used], vertices.reshape(corners.shape))
    except MeshError as exc:
        raise InputError(f"{path}: {exc}") from None
    element = _ELEMENTS[kind]
    space = FunctionSpace(mesh, degree=_DEGREES[element], dirichlet="boundary")
    # Each DOF's point in the file: through the cells, local node by local node.
    dofs = space.basis.element_dofs  # (local nodes, cells)
    source = np.full(space.n_dofs, -1)
    source[dofs.T.ravel()] = nodes.ravel()
    if np.any(source < 0) or not np.all(source[dofs.T] == nodes):
        raise InputError(f"{path}: its {kind} cells do not share their nodes consistently")
    names = _scalar_fields(path, steps)
    values = {name: np.stack([step[name].reshape(-1)[source] for step in steps]) for name in names}
    for name, value in values.items():
        if np.iscomplexobj(value):
            raise InputError(f"{path}: point data {name!r} is complex; fields are real")
        if not np.isfinite(value).all():
            bad = int(np.count_nonzero(~np.isfinite(value)))
            raise InputError(f"{path}: point data {name!r} holds NaN or Inf at {bad} values")
    with replacing(output) as staging:
        create_store(
            staging,
            space,
            fields=names,
            n_samples=len(steps),
            attrs={"source": path.name, "dirichlet": "boundary"},
        )
        write_samples(staging, 0, values)
    return output


def _read(path: Path) -> tuple[np.ndarray, list, list[dict]]:
    """Points, cell blocks and each step's point data of a meshio file."""
    if path.suffix == ".xdmf":
        try:
            with meshio.xdmf.TimeSeriesReader(str(path)) as reader:
                points, cells = _quietly(reader.read_points_cells)
                steps = [_quietly(reader.read_data, k)[1] for k in range(reader.num_steps)]
            if steps:
                return np.asarray(points), cells, steps
        except Exception:  # not a time series: a single mesh, read below
            pass
    try:
        mesh = _quietly(meshio.read, str(path))
    except Exception as exc:
        raise InputError(f"{path}: meshio cannot read it ({exc or type(exc).__name__})") from None
    return np.asarray(mesh.points), mesh.cells, [mesh.point_data]


def _data_files(path: Path) -> set[Path]:
    """The HDF5 files an XDMF file keeps its arrays in (``<DataItem Format="HDF">
    file.h5:/dataset``), resolved; none for other files."""
    if path.suffix != ".xdmf":
        return set()
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return set()
    found = re.findall(r">\s*([^<>]+?\.(?:h5|hdf5|hdf))\s*:", text)
    return {(path.parent / name.strip()).resolve() for name in found}


def _highest_cells(path: Path, cells) -> tuple[str, np.ndarray]:
    """The one supported cell block of the highest dimension (lines and points, such
    as Gmsh's boundary elements, are left out)."""
    blocks = [(block.type, np.asarray(block.data)) for block in cells if block.type in _ELEMENTS]
    if not blocks:
        found = sorted({block.type for block in cells})
        raise InputError(
            f"{path}: no cells fenop reads (triangle, quad, triangle6, quad9, tetra); "
            f"it has {found}"
        )
    kinds = {kind for kind, _ in blocks}
    if len(kinds) > 1:
        raise InputError(f"{path}: cells of several kinds {sorted(kinds)}; fenop takes one")
    kind = blocks[0][0]
    return kind, np.concatenate([data for _, data in blocks]).astype(np.int64)


def _scalar_fields(path: Path, steps: list[dict]) -> list[str]:
    names = [
        name
        for name, value in steps[0].items()
        if np.asarray(value).ndim == 1 or np.asarray(value).shape[1:] == (1,)
    ]
    if not names:
        raise InputError(f"{path}: no scalar point data to make fields of")
    for name in names:
        if problem := field_name_problem(name):
            raise InputError(f"{path}: point data {name!r}: {problem}; rename it")
    for k, step in enumerate(steps):
        if any(name not in step for name in names):
            raise InputError(f"{path}: step {k} lacks some of the fields {names}")
    return names
