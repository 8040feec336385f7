"""Mesh hierarchies: a mesh and its uniform refinements, as FE spaces.

>>> from fenop.fem import l_shape
>>> [s.n_dofs for s in hierarchy(l_shape(3), 3)]
[8, 21, 65]
"""

from __future__ import annotations

import numpy as np
import skfem

from fenop.fem.space import FunctionSpace


def is_refinement(fine: skfem.Mesh, coarse: skfem.Mesh) -> bool:
    """Whether ``fine`` is ``coarse.refined()``, vertices and cells in the same order."""
    if fine.p.shape[1] < coarse.p.shape[1] or type(fine) is not type(coarse):
        return False
    refined = coarse.refined()
    return np.array_equal(refined.p, fine.p) and np.array_equal(refined.t, fine.t)


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
