"""The tensor layouts used throughout fenop, stated once.

FE side
    ``(batch, channels, n_dofs)``: coefficients of ``channels`` finite-element
    functions per sample, in the DOF order of a :class:`fenop.fem.FunctionSpace`.

Grid side
    ``(batch, channels, *grid)``: values on a tensor grid over the mesh's bounding
    box, ``grid = (n_1, ..., n_d)``. Axis ``k`` of the grid runs along coordinate
    ``k`` ("ij" indexing, as ``numpy.meshgrid(..., indexing="ij")``), from the box's
    lower to its upper corner, end points included.

Points
    ``(n_points, dim)`` arrays of coordinates. Callables that scikit-fem evaluates
    (functions to interpolate, Dirichlet selectors) receive instead the scikit-fem
    layout ``x`` of shape ``(dim, n)``, so that ``x[0]`` is the first coordinate.
"""

from __future__ import annotations

from typing import TypeAlias

import numpy as np
import torch

FETensor: TypeAlias = torch.Tensor
"""``(batch, channels, n_dofs)``"""

GridTensor: TypeAlias = torch.Tensor
"""``(batch, channels, *grid)``"""

Points: TypeAlias = np.ndarray | torch.Tensor
"""``(n_points, dim)``"""
