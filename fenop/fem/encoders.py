"""FE functions to grid tensors: the input side of an FE-wrapped grid processor.

>>> import torch
>>> from fenop.fem import FunctionSpace, l_shape
>>> space = FunctionSpace(l_shape(9))
>>> encoder = GridEncoder(space, 16)
>>> encoder(torch.zeros(4, 1, space.n_dofs)).shape   # value, mask, x, y
torch.Size([4, 4, 16, 16])
>>> encoder.out_channels(1)
4
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import scipy.sparse
import torch
from scipy.spatial import cKDTree
from torch import nn

from fenop._types import FETensor, GridTensor
from fenop.fem.grid import Grid, as_resolution
from fenop.fem.mesh import bounding_box
from fenop.fem.space import FunctionSpace
from fenop.fem.sparse import SparseMatrix


def bounding_grid(space: FunctionSpace, resolution: int | Sequence[int]) -> Grid:
    """The grid of ``resolution`` points per axis spanning ``space``'s mesh."""
    lower, upper = bounding_box(space.mesh)
    return Grid(lower=tuple(lower), upper=tuple(upper), shape=as_resolution(resolution, space.dim))


def _nearest_boundary_dof_matrix(
    space: FunctionSpace, points: np.ndarray, rows: np.ndarray
) -> scipy.sparse.csr_array:
    """``(n_points, n_dofs)`` selecting, for each point where ``rows`` is True, the
    boundary DOF nearest to it."""
    facets = space.mesh.boundary_facets()
    dofs = np.unique(space.basis.get_dofs(facets).all())
    nearest = dofs[cKDTree(space.dof_points[dofs]).query(points[rows])[1]]
    selected = np.nonzero(rows)[0]
    return scipy.sparse.csr_array(
        (np.ones(len(selected)), (selected, nearest)), shape=(len(points), space.n_dofs)
    )


def extra_channels(dim: int, *, mask: bool = True, coordinates: bool = True) -> int:
    """Channels a :class:`GridEncoder` adds to its input on a ``dim``-dimensional grid:
    the domain mask and one coordinate per axis (what a processor must take on top
    of the fields).

    >>> extra_channels(2)
    3
    """
    return int(mask) + (dim if coordinates else 0)


class GridEncoder(nn.Module):
    """Evaluates FE functions on a tensor grid over the mesh's bounding box.

    Grid points outside the domain (a non-convex or non-rectangular mesh) take the
    value of the nearest DOF on the domain's boundary: a continuous extension up to
    the mesh size, so the processor sees no artificial jump where the domain ends
    (``extend=False`` sets them to 0 instead). The mask channel tells the
    processor which points are outside.

    Args:
        space: the FE space of the input coefficients.
        resolution: grid points per axis (an int for all axes, or one per axis).
        mask: append a channel that is 1 at grid points in the domain, 0 outside.
        coordinates: append ``dim`` channels holding each grid point's coordinates,
            scaled to [0, 1] across the bounding box.
        extend: fill outside grid points from the nearest boundary DOF (else 0).

    Shapes:
        ``(B, C, n_dofs)`` -> ``(B, C + extra_channels, *grid.shape)``.
    """

    def __init__(
        self,
        space: FunctionSpace,
        resolution: int | Sequence[int],
        *,
        mask: bool = True,
        coordinates: bool = True,
        extend: bool = True,
    ):
        super().__init__()
        if not isinstance(space, FunctionSpace):
            raise TypeError(f"`space` must be a FunctionSpace, got {type(space).__name__}")
        self.space = space
        self.grid = bounding_grid(space, resolution)
        points = self.grid.points()
        matrix, inside = space.evaluation_matrix(points)
        if extend and not inside.all():
            matrix = matrix + _nearest_boundary_dof_matrix(space, points, ~inside)
        self.matrix = SparseMatrix(matrix)
        extra = []
        if mask:
            extra.append(inside.astype(np.float64).reshape(self.grid.shape))
        if coordinates:
            extra.extend(
                np.meshgrid(*(np.linspace(0.0, 1.0, n) for n in self.grid.shape), indexing="ij")
            )
        self.extra_channels = extra_channels(space.dim, mask=mask, coordinates=coordinates)
        self.register_buffer(
            "extra",
            torch.from_numpy(np.stack(extra)) if extra else torch.zeros(0, *self.grid.shape),
            persistent=False,
        )
        self.register_buffer(
            "inside", torch.from_numpy(inside.reshape(self.grid.shape)), persistent=False
        )

    def out_channels(self, in_channels: int) -> int:
        """Channels of the encoded tensor for ``in_channels`` input functions."""
        return in_channels + self.extra_channels

    def forward(self, x: FETensor) -> GridTensor:
        """Encode ``x`` ``(B, C, n_dofs)`` as ``(B, C + extra_channels, *grid)``."""
        if x.ndim != 3:
            raise ValueError(
                f"input must have shape (batch, channels, n_dofs), got {tuple(x.shape)}"
            )
        self.space.check_coefficients(x, "input")
        values = self.matrix(x).reshape(*x.shape[:2], *self.grid.shape)
        if self.extra_channels == 0:
            return values
        extra = self.extra.to(values.dtype).expand(x.shape[0], *self.extra.shape)
        return torch.cat([values, extra], dim=1)
