"""FEMultigrid: a multigrid neural operator on a hierarchy of FE meshes, no grid.

The idea of MgNO (:mod:`fenop.operators.mgno`) on a hierarchy of FE meshes
(usually nested, ``mesh.refined()``, though any coarser meshes of the domain
serve): smoothers and operators mix channels of the FE stencils (row-normalised
mass and derivative matrices) instead of 3x3 convolutions, and prolongation is FE
interpolation, restriction its (row-averaged) transpose.

>>> import torch
>>> from fenop.fem import hierarchy, unit_square
>>> net = FEMultigrid(hierarchy(unit_square(5), 3), 1, 1, width=8, n_layers=2)
>>> net.levels, net(torch.randn(2, 1, 289)).shape
(3, torch.Size([2, 1, 289]))
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import scipy.sparse
import skfem
import torch
from torch import nn

from fenop._checks import check_counts
from fenop.fem import FunctionSpace
from fenop.fem.hierarchy import is_nested
from fenop.fem.sparse import SparseMatrix
from fenop.operators.processor import Processor


def _stencils(space: FunctionSpace) -> tuple[SparseMatrix, int]:
    """The FE stencils of a level, the mesh analogue of a 3x3 convolution's taps.

    The mass matrix, the first-derivative matrices ``∫ ∂_p φ_j φ_i`` and the
    second-derivative matrices ``∫ ∂_p φ_j ∂_q φ_i`` (symmetrised for p != q): a
    learned channel mixing of them represents averages, directional derivatives and
    anisotropic diffusion, as a convolution does, on any mesh. Each is scaled by the
    inverse of its rows' absolute sums, so its entries are O(1) on every level.
    """
    basis, dim = space.basis, space.dim
    forms = [lambda u, v, _: u * v]
    forms += [lambda u, v, _, p=p: u.grad[p] * v for p in range(dim)]
    forms += [
        lambda u, v, _, p=p, q=q: u.grad[p] * v.grad[q] + (u.grad[q] * v.grad[p] if p != q else 0)
        for p in range(dim)
        for q in range(p, dim)
    ]
    scaled = []
    for form in forms:
        matrix = scipy.sparse.csr_array(skfem.BilinearForm(form).assemble(basis))
        row_sums = np.asarray(abs(matrix).sum(axis=1)).ravel()
        # A row can vanish where the mesh is symmetric about a node (a mixed
        # derivative at the centre of a regular fan): it is set to zero, not its
        # rounding scaled up to O(1).
        live = row_sums > 1e-10 * row_sums.max()
        inverse = np.divide(1.0, row_sums, out=np.zeros_like(row_sums), where=live)
        scaled.append(scipy.sparse.diags(inverse) @ matrix)
    # Stacked (n_stencils * n_dofs, n_dofs): one sparse product applies them all.
    return SparseMatrix(scipy.sparse.vstack(scaled)), len(scaled)


class _StencilOperator(nn.Module):
    """``u -> u Θ_0 + Σ_s (S_s u) Θ_s``: channel mixing of the FE stencils ``S_s`` of
    :func:`_stencils`, the mesh analogue of a convolution. Stencils come per call."""

    def __init__(self, channels: int, n_stencils: int):
        super().__init__()
        # The initialisation of a convolution with the same fan-in (taps x channels),
        # so that a V-cycle neither blows up nor dies out at the start.
        taps = n_stencils + 1
        bound = 1.0 / (taps * channels) ** 0.5
        self.weight = nn.Parameter(torch.empty(taps, channels, channels).uniform_(-bound, bound))

    def forward(self, u: torch.Tensor, stencils: SparseMatrix) -> torch.Tensor:
        """``u`` ``(n, B, C)``, ``stencils`` stacked ``(S * n, n)`` -> ``(n, B, C)``."""
        n, batch, channels = u.shape
        applied = stencils.rows(u).reshape(-1, n * batch, channels)  # (S, n B, C)
        # All taps in one matrix product over (tap, channel): one GEMM with S C
        # terms per output, rather than S products of C terms and a sum over taps,
        # at the cost of copying the stencil values once (FEMultigrid's step 1.36 x
        # faster on the CPU; BENCHMARKS.md).
        applied = applied.transpose(0, 1).reshape(n * batch, -1)  # (n B, S C)
        mixed = (applied @ self.weight[1:].reshape(-1, channels)).reshape(n, batch, channels)
        return u @ self.weight[0] + mixed


class FEMultigrid(Processor):
    """A multigrid neural operator acting on FE coefficients over a mesh hierarchy.

    Args:
        spaces: FE spaces on meshes of one domain, coarsest first; inputs and
            outputs live in the finest. Usually a nested hierarchy (see
            :func:`~fenop.fem.hierarchy`), but a level need not refine the one before it: FE
            interpolation between any two meshes of the domain is a prolongation, so
            coarser meshes can extend a hierarchy whose refinements stop early
            (``unit_square(85)`` refines only ``unit_square(22)``).
        in_channels, out_channels: channels of input and output.
        width: channels inside the network.
        n_layers: layers ``σ(V-cycle(u) + W u)``.
        pre, post: smoothing steps per level.

    Shapes:
        ``(B, in_channels, n_dofs)`` -> ``(B, out_channels, n_dofs)`` on the finest space.

    Inside :class:`~fenop.operators.FEOperator` it also reads and writes functions on
    other meshes of its domain: they are interpolated into its finest space and back
    (:class:`~fenop.fem.SpaceInterpolator`), as a grid processor's go through its grid.
    """

    mesh_native = True

    def __init__(
        self,
        spaces: Sequence[FunctionSpace],
        in_channels: int,
        out_channels: int,
        *,
        width: int = 32,
        n_layers: int = 4,
        pre: int = 1,
        post: int = 1,
    ):
        super().__init__()
        check_counts(
            "FEMultigrid",
            in_channels=(in_channels, 1),
            out_channels=(out_channels, 1),
            width=(width, 1),
            n_layers=(n_layers, 1),
            pre=(pre, 1),
            post=(post, 0),
        )
        spaces = list(spaces)
        if not spaces or not all(isinstance(s, FunctionSpace) for s in spaces):
            raise TypeError("`spaces` must be a non-empty sequence of FunctionSpace")
        self.spaces, self.space, self.coarse_space = spaces, spaces[-1], spaces[0]
        # (then the coarsest mesh and the number of levels describe the hierarchy)
        self.nested = is_nested(spaces)
        self.in_channels, self.out_channels, self.levels = in_channels, out_channels, len(spaces)
        self._pre, self._post = pre, post
        self._set_hierarchy(spaces)
        steps = pre + post
        n_stencils = self._n_stencils
        self.smoothers = nn.ModuleList(
            nn.ModuleList(
                nn.ModuleList(_StencilOperator(width, n_stencils) for _ in range(steps))
                for _ in spaces
            )
            for _ in range(n_layers)
        )
        self.operators = nn.ModuleList(  # A for smoothing steps 1, 2, ... (step 0 has none)
            nn.ModuleList(
                nn.ModuleList(_StencilOperator(width, n_stencils) for _ in range(steps - 1))
                for _ in spaces
            )
            for _ in range(n_layers)
        )
        self.residuals = nn.ModuleList(  # A of the residual restricted from each finer level
            nn.ModuleList(_StencilOperator(width, n_stencils) for _ in spaces[1:])
            for _ in range(n_layers)
        )
        # Like the grid encoder's coordinate channels: the DOF coordinates, scaled to
        # [0, 1] over the bounding box, are appended to the input.
        points = self.space.dof_points
        lower, upper = points.min(axis=0), points.max(axis=0)
        coordinates = torch.from_numpy((points - lower) / (upper - lower))[:, None]  # (n, 1, dim)
        coordinates = coordinates.to(torch.get_default_dtype())
        self.register_buffer("coordinates", coordinates, persistent=False)
        self.lift = nn.Linear(in_channels + self.space.dim, width)
        self.skips = nn.ModuleList(nn.Linear(width, width) for _ in range(n_layers))
        self.project = nn.Sequential(
            nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, out_channels)
        )

    def _set_hierarchy(self, spaces: list[FunctionSpace]) -> None:
        """Stencils per level and FE interpolation between consecutive levels."""
        self.stencils = nn.ModuleList()
        for space in spaces:
            stencils, self._n_stencils = _stencils(space)
            self.stencils.append(stencils)
        self.prolong, self.restrict = nn.ModuleList(), nn.ModuleList()
        for level in range(len(spaces) - 1):
            coarse, fine = spaces[level], spaces[level + 1]
            matrix, inside = coarse.evaluation_matrix(fine.dof_points)
            if not inside.all():
                raise ValueError(
                    f"`spaces` must be meshes of one domain, coarsest first: "
                    f"{np.count_nonzero(~inside)} DOF points of level {level + 1} lie "
                    f"outside the mesh of level {level}"
                )
            self.prolong.append(SparseMatrix(matrix))
            # The fields restricted are nodal values, not functionals: average the fine
            # values (P^T with unit row sums) rather than sum them, so that magnitudes
            # stay alike on every level.
            restrict = scipy.sparse.csr_array(matrix.T)
            restrict = scipy.sparse.diags(1.0 / restrict.sum(axis=1)) @ restrict
            self.restrict.append(SparseMatrix(restrict))

    def _cycle(self, layer: int, f: torch.Tensor) -> torch.Tensor:
        """One V-cycle of layer ``layer`` on ``f`` ``(n, B, C)``, node-major."""
        smoothers, operators = self.smoothers[layer], self.operators[layer]
        residuals = self.residuals[layer]
        rhs, solutions = [f], []
        for level in range(self.levels - 1, -1, -1):  # finest (levels - 1) to coarsest (0)
            stencils = self.stencils[level]
            f_level = rhs[-1]
            u = smoothers[level][0](f_level, stencils)
            # The coarsest level has no way back up: it smooths pre + post times at once.
            for step in range(1, self._pre + self._post * (level == 0)):
                residual = f_level - operators[level][step - 1](u, stencils)
                u = u + smoothers[level][step](residual, stencils)
            solutions.append(u)
            if level > 0:
                residual = f_level - residuals[level - 1](u, stencils)
                rhs.append(self.restrict[level - 1].rows(residual))
        u = solutions[-1]
        for depth in range(len(solutions) - 2, -1, -1):
            level = self.levels - 1 - depth
            stencils = self.stencils[level]
            u = solutions[depth] + self.prolong[level - 1].rows(u)
            for step in range(self._pre, self._pre + self._post):
                residual = rhs[depth] - operators[level][step - 1](u, stencils)
                u = u + smoothers[level][step](residual, stencils)
        return u

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, in_channels, n_dofs)`` -> ``(B, out_channels, n_dofs)``."""
        if x.ndim != 3 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"input must have shape (batch, {self.in_channels}, n_dofs), got {tuple(x.shape)}"
            )
        self.space.check_coefficients(x, "input")
        # Inside, fields are node-major (n, B, C): sparse products act on the first
        # dimension and channel mixings on the last, neither needing a transpose.
        coordinates = self.coordinates.to(x.dtype).expand(-1, x.shape[0], -1)
        u = self.lift(torch.cat([x.permute(2, 0, 1), coordinates], dim=-1))
        for layer, skip in enumerate(self.skips):
            u = nn.functional.gelu(self._cycle(layer, u) + skip(u))
        return self.project(u).permute(1, 2, 0).contiguous()
