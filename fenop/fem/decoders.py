"""Grid tensors to FE functions with exact Dirichlet values: the output side.

>>> import torch
>>> from fenop.fem import FunctionSpace, unit_square
>>> space = FunctionSpace(unit_square(9), dirichlet="boundary")
>>> decoder = FEDecoder(space, 16, boundary_values=1.0)
>>> u = decoder(torch.randn(2, 1, 16, 16))
>>> u.shape, bool((u[..., space.boundary_dofs] == 1.0).all())
(torch.Size([2, 1, 81]), True)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import nn

from fenop._types import FETensor, GridTensor
from fenop.fem.encoders import bounding_grid
from fenop.fem.space import FunctionSpace
from fenop.fem.sparse import SparseMatrix

BoundaryValues = float | np.ndarray | torch.Tensor | Callable[[np.ndarray], np.ndarray]


class FEDecoder(nn.Module):
    """Interpolates grid values to the DOFs and imposes the Dirichlet values.

    The grid spans the mesh's bounding box (as :class:`~fenop.fem.GridEncoder`'s
    does); each DOF takes the multilinear interpolant of the grid values at its
    point. The Dirichlet DOFs of ``space`` are then overwritten with the
    prescribed values, so the output meets the boundary condition exactly, bit for
    bit, whatever the grid holds.

    Args:
        space: the FE space of the output.
        resolution: grid points per axis of the input tensor.
        boundary_values: the Dirichlet data ``g``: ``None`` (zero), a number, an
            array ``(n_boundary,)`` in the order of ``space.boundary_dofs``, or a
            callable receiving the Dirichlet DOF coordinates ``x`` ``(dim, n_boundary)``.

    Shapes:
        ``(B, C, *grid)`` -> ``(B, C, n_dofs)``.
    """

    def __init__(
        self,
        space: FunctionSpace,
        resolution: int | Sequence[int],
        *,
        boundary_values: BoundaryValues | None = None,
    ):
        super().__init__()
        if not isinstance(space, FunctionSpace):
            raise TypeError(f"`space` must be a FunctionSpace, got {type(space).__name__}")
        self.space = space
        self.grid = bounding_grid(space, resolution)
        matrix = self.grid.interpolation_matrix(space.dof_points)
        self.matrix = SparseMatrix(matrix)
        n_boundary = len(space.boundary_dofs)
        if boundary_values is not None and n_boundary == 0:
            raise ValueError("`boundary_values` given but `space` has no Dirichlet DOFs")
        self.register_buffer(
            "boundary_dofs", torch.from_numpy(space.boundary_dofs), persistent=False
        )
        self.register_buffer(
            "boundary_values", boundary_tensor(space, boundary_values), persistent=False
        )

    def forward(self, y: GridTensor, *, boundary_values: torch.Tensor | None = None) -> FETensor:
        """Decode ``y`` ``(B, C, *grid)`` to FE coefficients ``(B, C, n_dofs)``.

        Args:
            y: grid values.
            boundary_values: per-sample Dirichlet data overriding the decoder's,
                broadcastable to ``(B, C, n_boundary)``.
        """
        shape = self.grid.shape
        if y.ndim != 2 + len(shape) or tuple(y.shape[2:]) != shape:
            raise ValueError(
                f"input must have shape (batch, channels, {', '.join(map(str, shape))}), "
                f"got {tuple(y.shape)}"
            )
        u = self.matrix(y.reshape(*y.shape[:2], -1))
        if len(self.boundary_dofs) == 0:
            if boundary_values is not None:
                raise ValueError("`boundary_values` given but the space has no Dirichlet DOFs")
            return u
        g = self.boundary_values if boundary_values is None else boundary_values
        return impose_dirichlet(u, self.boundary_dofs, g)


def boundary_tensor(space: FunctionSpace, values: BoundaryValues | None) -> torch.Tensor:
    """Dirichlet data as a float64 tensor ``(n_boundary,)`` in ``space.boundary_dofs`` order.

    ``values``: ``None`` (zero), a number, an array ``(n_boundary,)``, or a callable of
    the Dirichlet DOF coordinates ``x`` ``(dim, n_boundary)``.
    """
    n_boundary = len(space.boundary_dofs)
    if values is None:
        return torch.zeros(n_boundary, dtype=torch.float64)
    if callable(values):
        values = values(space.dof_points[space.boundary_dofs].T.copy())
    values = torch.as_tensor(values, dtype=torch.float64)
    if values.ndim == 0:
        values = values.expand(n_boundary).clone()
    if values.shape != (n_boundary,):
        raise ValueError(
            f"`boundary_values` must have shape ({n_boundary},), one per Dirichlet DOF, "
            f"got {tuple(values.shape)}"
        )
    if not torch.isfinite(values).all():
        raise ValueError("`boundary_values` must be finite")
    return values


def impose_dirichlet(u: torch.Tensor, dofs: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """``u`` with ``u[..., dofs] = values``, differentiably (in ``u`` and ``values``).

    Args:
        u: ``(B, C, n_dofs)`` coefficients.
        dofs: ``(n_boundary,)`` indices of the Dirichlet DOFs.
        values: broadcastable to ``(B, C, n_boundary)``.
    """
    u = u.clone()
    # Assignment, not the addition of a lifting: the boundary DOFs hold g exactly.
    u[..., dofs] = values.to(u.dtype).expand(*u.shape[:-1], len(dofs))
    return u
