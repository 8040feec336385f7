"""Mesh constructors and loading. The mesh type is scikit-fem's :class:`skfem.Mesh`.

Every constructor returns a first-order scikit-fem mesh (``MeshLine1``,
``MeshTri1``, ``MeshQuad1`` or ``MeshTet1``); nested hierarchies come from
``mesh.refined()``.

>>> mesh = unit_square(5)
>>> mesh.p.shape, mesh.t.shape
((2, 25), (3, 32))
>>> l_shape(5).p.shape
(2, 21)
"""

from __future__ import annotations

import contextlib
import io
import os
from pathlib import Path

import numpy as np
import skfem

from fenop._checks import missing_file
from fenop._errors import InputError


class MeshError(InputError):
    """A mesh that fenop cannot use (a file, a size, a cell type); the message says why."""


SUPPORTED_MESHES = (skfem.MeshLine1, skfem.MeshTri1, skfem.MeshQuad1, skfem.MeshTet1)
# (dimension, vertices per cell) -> mesh type: how stored arrays tell their type
_BY_SHAPE = {
    (1, 2): skfem.MeshLine1,
    (2, 3): skfem.MeshTri1,
    (2, 4): skfem.MeshQuad1,
    (3, 4): skfem.MeshTet1,
}


def _vertices_per_side(n: int) -> np.ndarray:
    if isinstance(n, bool) or not isinstance(n, int | np.integer):
        raise TypeError(f"`n` must be an int (vertices per side), got {type(n).__name__}")
    if n < 2:
        raise MeshError(f"`n` must be at least 2 vertices per side, got {n}")
    return np.linspace(0.0, 1.0, int(n))


def unit_interval(n: int) -> skfem.MeshLine1:
    """The interval [0, 1] with ``n`` equally spaced vertices.

    >>> unit_interval(3).p
    array([[0. , 0.5, 1. ]])
    """
    return skfem.MeshLine.init_tensor(_vertices_per_side(n))


def unit_square(n: int, *, cell: str = "tri") -> skfem.MeshTri1 | skfem.MeshQuad1:
    """The unit square [0, 1]^2 with ``n`` x ``n`` vertices.

    Args:
        n: vertices per side (at least 2).
        cell: ``"tri"`` (each grid square cut into two triangles) or ``"quad"``.
    """
    x = _vertices_per_side(n)
    if cell == "tri":
        return skfem.MeshTri.init_tensor(x, x)
    if cell == "quad":
        return skfem.MeshQuad.init_tensor(x, x)
    raise MeshError(f'`cell` must be "tri" or "quad", got {cell!r}')


def unit_cube(n: int) -> skfem.MeshTet1:
    """The unit cube [0, 1]^3 with ``n`` x ``n`` x ``n`` vertices, cut into tetrahedra."""
    x = _vertices_per_side(n)
    return skfem.MeshTet.init_tensor(x, x, x)


def l_shape(n: int) -> skfem.MeshTri1:
    """The L-shaped domain (-1, 1)^2 minus [0, 1) x (-1, 0], triangulated.

    The mesh is the structured ``n`` x ``n`` triangulation of (-1, 1)^2 with the
    lower-right quadrant removed, so the re-entrant corner at the origin is a
    vertex; ``n`` must therefore be odd.
    """
    if isinstance(n, int | np.integer) and not isinstance(n, bool) and n % 2 == 0:
        raise MeshError(f"`n` must be odd so that the re-entrant corner is a vertex, got {n}")
    x = 2.0 * _vertices_per_side(n) - 1.0
    square = skfem.MeshTri.init_tensor(x, x)
    centroids = square.p[:, square.t].mean(axis=1)
    removed = np.nonzero((centroids[0] > 0.0) & (centroids[1] < 0.0))[0]
    return square.remove_elements(removed)


# The built-in 2-D domains by name, each a function of the vertices per side: the
# `fenop generate --domain` choices and the domains of a training configuration.
DOMAINS = {"square": unit_square, "lshape": l_shape}


def load_mesh(path: str | os.PathLike) -> skfem.Mesh:
    """Read a mesh file through meshio (Gmsh ``.msh``, VTK ``.vtk``/``.vtu``, XDMF, ...).

    Args:
        path: the file.

    Returns:
        A first-order scikit-fem mesh of lines, triangles, quadrilaterals or
        tetrahedra (the highest-dimensional cells of the file).

    Raises:
        ValueError: the file does not exist, cannot be read, or holds cells of a
            kind fenop does not support; the message names the file.
    """
    path = Path(path)
    if problem := missing_file(path):
        raise MeshError(f"cannot read mesh {str(path)!r}: {problem}")
    chatter = io.StringIO()
    try:
        # meshio prints to stdout/stderr while reading, and for a file whose format it
        # cannot tell apart it even calls sys.exit: keep both from reaching the caller.
        with contextlib.redirect_stdout(chatter), contextlib.redirect_stderr(chatter):
            mesh = skfem.Mesh.load(str(path))
    except (Exception, SystemExit) as exc:
        detail = str(exc) if not isinstance(exc, SystemExit) else chatter.getvalue().strip()
        raise MeshError(f"cannot read mesh {str(path)!r}: {detail or type(exc).__name__}") from None
    # Exact types: scikit-fem's second-order meshes subclass the first-order ones.
    if type(mesh) not in SUPPORTED_MESHES:
        supported = ", ".join(cls.__name__ for cls in SUPPORTED_MESHES)
        raise MeshError(
            f"mesh {str(path)!r} has cells of type {type(mesh).__name__}; "
            f"fenop supports {supported}"
        )
    return mesh


def mesh_from_arrays(points: np.ndarray, cells: np.ndarray) -> skfem.Mesh:
    """The mesh of ``points (n_vertices, dim)`` and ``cells (n_cells, corners)``, as stores
    and checkpoints keep it; its type follows from ``dim`` and ``corners`` (lines,
    triangles, quadrilaterals, tetrahedra). A ValueError says what is wrong.

    >>> mesh_from_arrays(unit_square(3).p.T, unit_square(3).t.T)
    <skfem MeshTri1 object>...
    """
    points, cells = np.asarray(points), np.asarray(cells)
    if points.ndim != 2 or cells.ndim != 2:
        raise MeshError(
            f"mesh points and cells must be 2-D arrays, got shapes {points.shape} and {cells.shape}"
        )
    kind = _BY_SHAPE.get((points.shape[1], cells.shape[1]))
    if kind is None:
        raise MeshError(
            f"unsupported mesh: {points.shape[1]}-D points with {cells.shape[1]}-vertex cells"
        )
    if cells.size and (cells.min() < 0 or cells.max() >= len(points)):
        raise MeshError("the cells refer to vertices that the points do not have")
    if not np.isfinite(points).all():
        raise MeshError("the mesh points hold NaN or Inf")
    flat = int(np.count_nonzero(_cell_measures(points, cells) <= _flat(points)))
    if flat:
        size = {1: "length", 2: "area", 3: "volume"}[points.shape[1]]
        raise MeshError(
            f"{flat} of {len(cells)} cells have zero {size} (vertices that coincide or lie "
            "on a line): the mesh points are damaged or the cells do not fit them"
        )
    return kind(
        np.ascontiguousarray(points.T, dtype=np.float64),
        np.ascontiguousarray(cells.T, dtype=np.int64),
    )


def _cell_measures(points: np.ndarray, cells: np.ndarray) -> np.ndarray:
    """``(n_cells,)`` lengths, areas or volumes (unsigned; a quadrilateral as the two
    triangles of its diagonal 0-2)."""
    corners = points[cells]  # (cells, corners, dim)
    edges = corners[:, 1:] - corners[:, :1]
    if points.shape[1] == 1:
        return np.abs(edges[:, 0, 0])
    if points.shape[1] == 3:
        return np.abs(np.linalg.det(edges[:, :3])) / 6
    cross = (
        edges[:, :, 0, None] * edges[:, None, :, 1] - edges[:, :, 1, None] * edges[:, None, :, 0]
    )
    area = np.abs(cross[:, 0, 1]) / 2  # triangle (0, 1, 2)
    if cells.shape[1] == 4:
        area = area + np.abs(cross[:, 1, 2]) / 2  # triangle (0, 2, 3)
    return area


def _flat(points: np.ndarray) -> float:
    """The measure below which a cell is flat: rounding, relative to the mesh's size."""
    extent = float(np.ptp(points, axis=0).max()) if len(points) else 0.0
    return 1e-13 * extent ** points.shape[1]


def bounding_box(mesh: skfem.Mesh) -> tuple[np.ndarray, np.ndarray]:
    """The lower and upper corners of the mesh's bounding box, each of shape ``(dim,)``."""
    return mesh.p.min(axis=1), mesh.p.max(axis=1)
