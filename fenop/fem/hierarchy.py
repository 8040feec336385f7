"""Mesh hierarchies: a mesh and its uniform refinements, as FE spaces.

>>> from fenop.fem import l_shape
>>> [s.n_dofs for s in hierarchy(l_shape(3), 3)]
[8, 21, 65]
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import numpy as np
import skfem

from fenop.fem.space import FunctionSpace


def is_refinement(fine: skfem.Mesh, coarse: skfem.Mesh) -> bool:
    """Whether ``fine`` is ``coarse.refined()``, vertices and cells in the same order."""
    if fine.p.shape[1] < coarse.p.shape[1] or type(fine) is not type(coarse):
        return False
    refined = coarse.refined()
    return np.array_equal(refined.p, fine.p) and np.array_equal(refined.t, fine.t)


def is_nested(spaces: Sequence[FunctionSpace]) -> bool:
    """Whether each space's mesh is the one before it refined (coarsest first): then
    the coarsest mesh and the number of levels describe the whole hierarchy.

    >>> from fenop.fem import unit_square
    >>> is_nested(hierarchy(unit_square(3), 3)), is_nested(hierarchy(unit_square(4), 1) * 2)
    (True, False)
    """
    return all(is_refinement(fine.mesh, coarse.mesh) for coarse, fine in itertools.pairwise(spaces))


def hierarchy(
    coarse: skfem.Mesh, levels: int, *, degree: int = 1, dirichlet=None
) -> list[FunctionSpace]:
    """FE spaces on ``coarse`` and its ``levels - 1`` successive uniform refinements,
    coarsest first (the levels of :class:`~fenop.operators.FEMultigrid`)."""
    if levels < 1:
        raise ValueError(f"`levels` must be at least 1, got {levels}")
    meshes = [coarse]
    for _ in range(levels - 1):
        meshes.append(meshes[-1].refined())
    return [FunctionSpace(m, degree=degree, dirichlet=dirichlet) for m in meshes]
