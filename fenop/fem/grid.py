"""Tensor grids over a box, and multilinear interpolation from them.

A :class:`Grid` is what the encoder writes to and the decoder reads from: ``shape``
points along each axis from ``lower`` to ``upper``, end points included, axis ``k``
along coordinate ``k`` (see :mod:`fenop._types`).

>>> grid = Grid(lower=(0.0, 0.0), upper=(1.0, 2.0), shape=(3, 2))
>>> grid.points()
array([[0. , 0. ],
       [0. , 2. ],
       [0.5, 0. ],
       [0.5, 2. ],
       [1. , 0. ],
       [1. , 2. ]])
>>> grid.interpolation_matrix(np.array([[0.25, 1.0]])).toarray()
array([[0.25, 0.25, 0.25, 0.25, 0.  , 0.  ]])
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import scipy.sparse


def as_resolution(resolution: int | Sequence[int], dim: int) -> tuple[int, ...]:
    """``resolution`` as a tuple of ``dim`` ints, each at least 2.

    >>> as_resolution(64, 2)
    (64, 64)
    """
    if isinstance(resolution, int | np.integer) and not isinstance(resolution, bool):
        resolution = (int(resolution),) * dim
    try:
        resolution = tuple(resolution)
    except TypeError:
        raise TypeError(
            f"`resolution` must be an int or a sequence of {dim} ints, "
            f"got {type(resolution).__name__}"
        ) from None
    if len(resolution) != dim or not all(
        isinstance(r, int | np.integer) and not isinstance(r, bool) for r in resolution
    ):
        raise ValueError(f"`resolution` must be {dim} ints for a {dim}-D mesh, got {resolution}")
    if min(resolution) < 2:
        raise ValueError(f"`resolution` must be at least 2 points per axis, got {resolution}")
    return tuple(int(r) for r in resolution)


@dataclass(frozen=True)
class Grid:
    """A tensor grid of ``shape`` points spanning the box from ``lower`` to ``upper``."""

    lower: tuple[float, ...]
    upper: tuple[float, ...]
    shape: tuple[int, ...]

    def __post_init__(self):
        lower = tuple(float(v) for v in self.lower)
        upper = tuple(float(v) for v in self.upper)
        shape = as_resolution(self.shape, len(lower))
        if len(upper) != len(lower) or not all(h > lo for lo, h in zip(lower, upper, strict=True)):
            raise ValueError(f"`upper` {upper} must exceed `lower` {lower} on every axis")
        object.__setattr__(self, "lower", lower)
        object.__setattr__(self, "upper", upper)
        object.__setattr__(self, "shape", shape)

    @property
    def dim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        return int(np.prod(self.shape))

    def axes(self) -> list[np.ndarray]:
        """The coordinates along each axis, ``[(shape[0],), (shape[1],), ...]``."""
        return [
            np.linspace(lo, h, n)
            for lo, h, n in zip(self.lower, self.upper, self.shape, strict=True)
        ]

    def points(self) -> np.ndarray:
        """All grid points ``(size, dim)``, in the order of a C-flattened grid tensor."""
        mesh = np.meshgrid(*self.axes(), indexing="ij")
        return np.stack([m.ravel() for m in mesh], axis=1)

    def interpolation_matrix(self, points: np.ndarray) -> scipy.sparse.csr_array:
        """Multilinear interpolation from grid values to ``points``.

        Args:
            points: ``(n_points, dim)`` coordinates inside the box (points a
                rounding error outside are clamped onto it).

        Returns:
            Sparse ``(n_points, size)`` with ``2**dim`` weights per row, summing to 1.
        """
        points = np.asarray(points, dtype=np.float64)
        if points.ndim != 2 or points.shape[1] != self.dim:
            raise ValueError(f"`points` must have shape (n_points, {self.dim}), got {points.shape}")
        lower, upper = np.array(self.lower), np.array(self.upper)
        slack = 1e-9 * (upper - lower)
        if (points < lower - slack).any() or (points > upper + slack).any():
            raise ValueError("`points` must lie inside the grid's box")
        cells = np.array(self.shape) - 1
        # Position in units of grid spacing; the cell index is clamped so that
        # points on the upper face use the last cell with weight 1 at its far end.
        s = np.clip((points - lower) / (upper - lower) * cells, 0.0, cells)
        base = np.minimum(np.floor(s).astype(np.int64), cells - 1)
        frac = s - base
        strides = np.array([int(np.prod(self.shape[k + 1 :])) for k in range(self.dim)])
        rows, cols, vals = [], [], []
        for corner in itertools.product((0, 1), repeat=self.dim):
            corner = np.array(corner)
            weight = np.prod(np.where(corner == 1, frac, 1.0 - frac), axis=1)
            rows.append(np.arange(len(points)))
            cols.append((base + corner) @ strides)
            vals.append(weight)
        return scipy.sparse.csr_array(
            (np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))),
            shape=(len(points), self.size),
        )
