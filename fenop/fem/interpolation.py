"""FE functions of one space interpolated into another space on the same domain.

The mesh-native counterpart of the grid encoder and decoder: it carries FE
coefficients from any mesh of a domain to a processor's own mesh (and back), so a
processor that works on FE coefficients, such as :class:`~fenop.operators.FEMultigrid`,
reads and writes functions on meshes it was not built on.

>>> import torch
>>> from fenop.fem import FunctionSpace, l_shape
>>> coarse, fine = FunctionSpace(l_shape(9)), FunctionSpace(l_shape(17), degree=2)
>>> to_fine = SpaceInterpolator(coarse, fine)
>>> u = coarse.interpolate(lambda x: 1 + 2 * x[0] - x[1])     # linear: P1 holds it exactly
>>> exact = fine.interpolate(lambda x: 1 + 2 * x[0] - x[1])
>>> to_fine(u[None, None]).shape, bool(torch.allclose(to_fine(u), exact, atol=1e-12))
(torch.Size([1, 1, 833]), True)
"""

from __future__ import annotations

from torch import nn

from fenop._types import FETensor
from fenop.fem.space import FunctionSpace
from fenop.fem.sparse import SparseMatrix


class SpaceInterpolator(nn.Module):
    """Interpolates functions of ``source`` into ``target``: ``I_target u``.

    Every DOF of ``target`` takes the value of the ``source`` function at its point,
    which for Lagrange elements is the FE interpolant in ``target``. The map is a
    sparse matrix built once, differentiable, and exact for functions that both
    spaces hold (a permutation when the two meshes share their nodes).

    Args:
        source: the space of the input coefficients.
        target: the space of the output coefficients; its DOF points must lie in
            ``source``'s mesh, or outside it by at most ``padding``.
        padding: DOF points of ``target`` outside ``source``'s mesh by at most this
            fraction of the size of the cell they are nearest take the value
            extrapolated from that cell. Two meshes of one curved domain differ
            so at the boundary (a refined mesh cuts the curve by chords, a finer
            mesh of the curve has points beyond them); points farther out are an
            error. ``0`` asks every point to be inside.

    Shapes:
        ``(..., source.n_dofs)`` -> ``(..., target.n_dofs)``.

    Raises:
        TypeError: ``source`` or ``target`` is not a :class:`FunctionSpace`.
        ValueError: DOF points of ``target`` lie outside ``source``'s mesh (the
            message says how many, and the first).
    """

    def __init__(self, source: FunctionSpace, target: FunctionSpace, *, padding: float = 0.5):
        super().__init__()
        for name, space in (("source", source), ("target", target)):
            if not isinstance(space, FunctionSpace):
                raise TypeError(f"`{name}` must be a FunctionSpace, got {type(space).__name__}")
        if source.dim != target.dim:
            raise ValueError(
                f"`source` is {source.dim}-D but `target` is {target.dim}-D: not the same domain"
            )
        matrix, inside = source.evaluation_matrix(target.dof_points, padding=padding)
        if not inside.all():
            first = target.dof_points[(~inside).argmax()]
            raise ValueError(
                f"{int((~inside).sum())} of {target.n_dofs} DOF points of the target mesh lie "
                f"outside the source mesh by more than {padding:g} of a cell (first: "
                f"{tuple(first.tolist())}): not the same domain"
            )
        self.source, self.target = source, target
        self.matrix = SparseMatrix(matrix)

    def extra_repr(self) -> str:
        return f"{self.source.n_dofs} -> {self.target.n_dofs} DOFs"

    def forward(self, u: FETensor) -> FETensor:
        """``u`` ``(..., source.n_dofs)`` -> ``(..., target.n_dofs)``."""
        self.source.check_coefficients(u, "input")
        return self.matrix(u)
