"""Point location: which cell of a mesh holds each point, or that none does.

scikit-fem's own ``element_finder`` raises as soon as one point lies outside the
mesh and then searches every element for every point; encoders need to mark
outside points (the cut-out quadrant of the L-shape) and to do so in time linear
in the number of points. This module does that for every supported mesh.

>>> import numpy as np
>>> from fenop.fem.mesh import l_shape
>>> locate(l_shape(3), np.array([[-0.5, 0.5], [0.5, -0.5]]))
array([ 1, -1])
"""

from __future__ import annotations

import numpy as np
import skfem
from scipy.spatial import cKDTree

# Barycentric coordinates down to -TOLERANCE still count as inside, so that points
# on an element's boundary (grid points on the edge of the domain) are found
# despite rounding. It is relative to the element, hence free of the mesh's scale.
TOLERANCE = 1e-10

# Candidate (point, element) pairs examined at once; bounds the work arrays.
_CHUNK = 2_000_000


def _simplices(mesh: skfem.Mesh) -> tuple[np.ndarray, np.ndarray]:
    """Vertex indices of simplices covering the mesh ``(dim + 1, n_simplices)`` and
    the cell owning each simplex ``(n_simplices,)``."""
    if isinstance(mesh, skfem.MeshQuad1):
        # A convex quadrilateral is the union of the two triangles cut by a diagonal.
        t = mesh.t
        simplices = np.concatenate([t[[0, 1, 2]], t[[0, 2, 3]]], axis=1)
        owner = np.concatenate([np.arange(t.shape[1])] * 2)
        return simplices, owner
    return mesh.t, np.arange(mesh.t.shape[1])


class PointLocator:
    """Locates points in the cells of a mesh; built once per mesh, reusable.

    Args:
        mesh: a first-order scikit-fem mesh (lines, triangles, quadrilaterals or
            tetrahedra).

    >>> from fenop.fem.mesh import unit_square
    >>> PointLocator(unit_square(2))(np.array([[0.25, 0.75], [2.0, 0.0]]))
    array([ 0, -1])
    """

    def __init__(self, mesh: skfem.Mesh):
        self.dim = mesh.dim()
        simplices, self._owner = _simplices(mesh)
        vertices = mesh.p[:, simplices]  # (dim, dim + 1, n_simplices)
        self._origin = vertices[:, 0].T  # (n_simplices, dim)
        edges = (vertices[:, 1:] - vertices[:, :1]).transpose(2, 0, 1)  # (n_s, dim, dim)
        self._inverse = np.linalg.inv(edges)
        centroids = vertices.mean(axis=1).T
        # Any point inside a simplex lies within its centroid-to-vertex radius of the
        # centroid, so a ball query with the largest such radius finds every candidate.
        radii = np.linalg.norm(vertices - vertices.mean(axis=1, keepdims=True), axis=0)
        self._radius = float(radii.max()) * (1.0 + 1e-9)
        self._tree = cKDTree(centroids)

    def __call__(self, points: np.ndarray, *, padding: float = 0.0) -> np.ndarray:
        """Cell index of each point ``(n_points,)``, -1 for points outside the mesh.

        Args:
            points: ``(n_points, dim)`` coordinates.
            padding: points outside every cell, but by at most this fraction of a
                cell's size (barycentric coordinates down to ``-padding``), get the
                cell they are least outside of: the mesh's boundary taken as that
                much thicker, as where a refined mesh cuts a curved boundary by
                chords and another mesh of the same domain has points on the curve.
        """
        points = np.asarray(points, dtype=np.float64)
        if points.ndim != 2 or points.shape[1] != self.dim:
            raise ValueError(f"`points` must have shape (n_points, {self.dim}), got {points.shape}")
        if not padding >= 0:
            raise ValueError(f"`padding` must be non-negative, got {padding}")
        found = np.full(points.shape[0], -1, dtype=np.int64)
        if points.shape[0] == 0:
            return found
        for p, s, outside in self._candidates(points, self._radius):
            inside = outside <= TOLERANCE
            # The first containing simplex wins; later chunks only fill points still unknown.
            p_in, s_in = p[inside], s[inside]
            first = np.unique(p_in, return_index=True)[1]
            p_in, s_in = p_in[first], s_in[first]
            unset = found[p_in] < 0
            found[p_in[unset]] = self._owner[s_in[unset]]
        missing = np.flatnonzero(found < 0)
        if padding > 0 and len(missing):
            # Within `padding` of a simplex is within the simplex scaled about its
            # centroid by 1 + (dim + 1) padding: the ball query grows as much.
            radius = self._radius * (1 + (self.dim + 1) * padding)
            best = np.full(len(missing), np.inf)
            for p, s, outside in self._candidates(points[missing], radius):
                order = np.lexsort((outside, p))  # per point, the least outside first
                p, s, outside = p[order], s[order], outside[order]
                first = np.unique(p, return_index=True)[1]
                p, s, outside = p[first], s[first], outside[first]
                better = (outside < best[p]) & (outside <= padding)
                best[p[better]] = outside[better]
                found[missing[p[better]]] = self._owner[s[better]]
        return found

    def _candidates(self, points: np.ndarray, radius: float):
        """Chunks of (point, simplex) pairs whose simplex's centroid lies within
        ``radius`` of the point, with how far the point lies outside the simplex:
        minus its least barycentric coordinate (zero or less inside)."""
        candidates = self._tree.query_ball_point(points, radius)
        counts = np.fromiter((len(c) for c in candidates), dtype=np.int64, count=len(points))
        which_point = np.repeat(np.arange(len(points)), counts)
        which_simplex = np.fromiter(
            (s for c in candidates for s in c), dtype=np.int64, count=int(counts.sum())
        )
        for start in range(0, len(which_point), _CHUNK):
            p = which_point[start : start + _CHUNK]
            s = which_simplex[start : start + _CHUNK]
            lam = np.einsum("nij,nj->ni", self._inverse[s], points[p] - self._origin[s])
            outside = -np.minimum(lam.min(axis=1), 1.0 - lam.sum(axis=1))
            yield p, s, outside


def locate(mesh: skfem.Mesh, points: np.ndarray) -> np.ndarray:
    """Cell index of each of ``points`` ``(n_points, dim)`` in ``mesh``, -1 if outside.

    Builds a :class:`PointLocator`; keep one to locate several point sets.
    """
    return PointLocator(mesh)(points)
