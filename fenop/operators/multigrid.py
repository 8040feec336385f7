"""Multigrid processors: MgNO on grids, FEMultigrid on FE mesh hierarchies.

MgNO (He, Liu & Xu, ICLR 2024) parameterises each layer's linear operator by one
multichannel multigrid V-cycle: smoothing steps ``u <- u + S(f - A u)`` with learned
3x3 convolutions ``A`` and ``S``, the residual restricted by a strided convolution,
the coarse correction prolongated by a transposed convolution. A layer is
``σ(MgConv(u) + W u)``. The number of levels follows from the grid the network is
built for, and any grid size works (coarse sizes are ``ceil(n / 2)``; prolongated
tensors are cropped to the finer size).

:class:`FEMultigrid` is the same idea on a hierarchy of FE meshes (usually nested,
``mesh.refined()``, though any coarser meshes of the domain serve): smoothers and
operators mix channels of the FE stencils (identity, row-normalised mass and
stiffness matrices) instead of 3x3 convolutions, and prolongation is FE
interpolation, restriction its (row-averaged) transpose. It needs no grid.

>>> import torch
>>> mgno = MgNO(3, 1, grid=(33, 33), width=8, n_layers=2)
>>> mgno.levels, mgno(torch.randn(2, 3, 33, 33)).shape
(4, torch.Size([2, 1, 33, 33]))
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence

import numpy as np
import scipy.sparse
import skfem
import torch
from torch import nn

from fenop.fem import FunctionSpace
from fenop.fem._sparse import SparseMatrix

_CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
_CONV_T = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}


def grid_levels(shape: Sequence[int], *, coarsest: int = 4) -> int:
    """Levels of a V-cycle on ``shape``: halve (rounding up) while every side stays >= ``coarsest``.

    >>> grid_levels((64, 64)), grid_levels((85, 85)), grid_levels((16, 40))
    (5, 5, 3)
    """
    n, levels = min(shape), 1
    while math.ceil(n / 2) >= coarsest:
        n, levels = math.ceil(n / 2), levels + 1
    return levels


class MgConv(nn.Module):
    """One multichannel V-cycle, a linear map ``f -> u`` of ``(B, C, *grid)`` tensors.

    Args:
        channels: channels of ``f`` and ``u``.
        dim: grid dimension (1, 2 or 3).
        levels: grid levels (1 = smoothing on the fine grid only).
        pre, post: smoothing steps before restriction and after prolongation.
        padding: ``"zeros"`` or ``"circular"`` (periodic) for the convolutions.
    """

    def __init__(
        self,
        channels: int,
        *,
        dim: int = 2,
        levels: int,
        pre: int = 1,
        post: int = 1,
        padding: str = "zeros",
    ):
        super().__init__()
        if padding not in ("zeros", "circular"):
            raise ValueError(f'`padding` must be "zeros" or "circular", got {padding!r}')
        if levels < 1 or pre < 1 or post < 0:
            raise ValueError(f"need levels >= 1, pre >= 1, post >= 0; got {levels}, {pre}, {post}")
        conv, conv_t = _CONV[dim], _CONV_T[dim]

        def stencil():
            return conv(channels, channels, 3, padding=1, padding_mode=padding, bias=False)

        self.levels = levels
        self.smoothers = nn.ModuleList(  # S per level and step, pre then post
            nn.ModuleList(stencil() for _ in range(pre + post)) for _ in range(levels)
        )
        self.operators = nn.ModuleList(  # A per level for steps 1, 2, ... (step 0 has none)
            nn.ModuleList(stencil() for _ in range(pre + post - 1)) for _ in range(levels)
        )
        self.residual = nn.ModuleList(stencil() for _ in range(levels - 1))
        self.restrict = nn.ModuleList(
            conv(channels, channels, 3, stride=2, padding=1, padding_mode=padding, bias=False)
            for _ in range(levels - 1)
        )
        # Transposed convolutions pad with zeros only; periodic grids get a zero
        # halo in the prolongation, which the following smoothing sees past.
        self.prolong = nn.ModuleList(
            conv_t(channels, channels, 4, stride=2, padding=1, bias=False)
            for _ in range(levels - 1)
        )
        self.pre, self.post = pre, post

    def _smooth(self, level: int, steps: range, u: torch.Tensor | None, f: torch.Tensor):
        for step in steps:
            if u is None:
                u = self.smoothers[level][step](f)
            else:
                u = u + self.smoothers[level][step](f - self.operators[level][step - 1](u))
        return u

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        """``(B, C, *grid)`` -> ``(B, C, *grid)``."""
        rhs, solutions = [f], []
        for level in range(self.levels):
            # The coarsest level has no way back up: it smooths pre + post times at once.
            coarsest = level == self.levels - 1
            u = self._smooth(level, range(self.pre + self.post * coarsest), None, rhs[level])
            solutions.append(u)
            if level < self.levels - 1:
                # The coarse problem is the fine residual's, as in multigrid.
                r = rhs[level] - self.residual[level](u)
                rhs.append(self.restrict[level](r))
        u = solutions[-1]
        for level in range(self.levels - 2, -1, -1):
            fine = solutions[level]
            correction = self.prolong[level](u)
            correction = correction[(..., *(slice(0, n) for n in fine.shape[2:]))]
            u = self._smooth(
                level, range(self.pre, self.pre + self.post), fine + correction, rhs[level]
            )
        return u


class MgNO(nn.Module):
    """Multigrid neural operator on ``(B, C, *grid)`` tensors.

    Args:
        in_channels, out_channels: channels of input and output.
        grid: the grid size the network is built for (sets the number of levels;
            other sizes run too).
        width: channels inside the network.
        n_layers: MgNO layers ``σ(MgConv(u) + W u)``.
        pre, post: smoothing steps per level.
        padding: ``"zeros"`` or ``"circular"``.
        levels: override the number of levels derived from ``grid``.
        activation: the nonlinearity σ.

    Shapes:
        ``(B, in_channels, *grid)`` -> ``(B, out_channels, *grid)``.

    Training: each V-cycle chains many learned convolutions, so large learning rates
    can make long runs blow up. On fenop's Darcy benchmark AdamW at 2e-3 diverged
    within 20 minutes, while 5e-4 (the value the MgNO authors use) trained stably
    over 30 minutes to the second-lowest error of the processors (BENCHMARKS.md).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        *,
        grid: Sequence[int],
        width: int = 32,
        n_layers: int = 4,
        pre: int = 1,
        post: int = 1,
        padding: str = "zeros",
        levels: int | None = None,
        activation: Callable[[torch.Tensor], torch.Tensor] = nn.functional.gelu,
    ):
        super().__init__()
        grid = tuple(int(n) for n in grid)
        if len(grid) not in _CONV:
            raise ValueError(f"`grid` must have 1 to 3 axes, got {grid}")
        self.dim, self.in_channels, self.out_channels = len(grid), in_channels, out_channels
        self.levels = grid_levels(grid) if levels is None else int(levels)
        conv = _CONV[self.dim]
        self.lift = conv(in_channels, width, 1)
        self.cycles = nn.ModuleList(
            MgConv(width, dim=self.dim, levels=self.levels, pre=pre, post=post, padding=padding)
            for _ in range(n_layers)
        )
        self.skips = nn.ModuleList(conv(width, width, 1) for _ in range(n_layers))
        self.project = nn.Sequential(
            conv(width, 4 * width, 1), nn.GELU(), conv(4 * width, out_channels, 1)
        )
        self.activation = activation
        self.config = {
            "in_channels": in_channels,
            "out_channels": out_channels,
            "grid": list(grid),
            "width": width,
            "n_layers": n_layers,
            "pre": pre,
            "post": post,
            "padding": padding,
            "levels": self.levels,
        }

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 2 + self.dim or x.shape[1] != self.in_channels:
            raise ValueError(
                f"input must have shape (batch, {self.in_channels}, {self.dim} grid axes), "
                f"got {tuple(x.shape)}"
            )
        if min(x.shape[2:]) < 2 ** (self.levels - 1):
            raise ValueError(f"grid {tuple(x.shape[2:])} too small for {self.levels} levels")
        u = self.lift(x)
        for cycle, skip in zip(self.cycles, self.skips, strict=True):
            u = self.activation(cycle(u) + skip(u))
        return self.project(u)


# -- FE multigrid -------------------------------------------------------------------


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
        scaled.append(scipy.sparse.diags(1.0 / row_sums) @ matrix)
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


class FEMultigrid(nn.Module):
    """A multigrid neural operator acting on FE coefficients over a mesh hierarchy.

    Args:
        spaces: FE spaces on meshes of one domain, coarsest first; inputs and
            outputs live in the finest. Usually a nested hierarchy (see
            :func:`hierarchy`), but a level need not refine the one before it: FE
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
        spaces = list(spaces)
        if not spaces or not all(isinstance(s, FunctionSpace) for s in spaces):
            raise TypeError("`spaces` must be a non-empty sequence of FunctionSpace")
        self.spaces, self.space, self.coarse_space = spaces, spaces[-1], spaces[0]
        # Whether every level is the one before it refined: then the coarsest mesh and
        # the number of levels describe the whole hierarchy (as checkpoints store it).
        self.nested = all(
            _is_refinement(fine.mesh, coarse.mesh) for coarse, fine in itertools.pairwise(spaces)
        )
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
        self.config = {
            "in_channels": in_channels,
            "out_channels": out_channels,
            "width": width,
            "n_layers": n_layers,
            "pre": pre,
            "post": post,
            "levels": self.levels,
        }

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


def _is_refinement(fine: skfem.Mesh, coarse: skfem.Mesh) -> bool:
    """Whether ``fine`` is ``coarse.refined()``, vertices and cells in the same order."""
    if fine.p.shape[1] < coarse.p.shape[1] or type(fine) is not type(coarse):
        return False
    refined = coarse.refined()
    return np.array_equal(refined.p, fine.p) and np.array_equal(refined.t, fine.t)


def hierarchy(
    coarse: skfem.Mesh, levels: int, *, degree: int = 1, dirichlet=None
) -> list[FunctionSpace]:
    """FE spaces on ``coarse`` and its ``levels - 1`` successive uniform refinements.

    >>> from fenop.fem import l_shape
    >>> [s.n_dofs for s in hierarchy(l_shape(3), 3)]
    [8, 21, 65]
    """
    if levels < 1:
        raise ValueError(f"`levels` must be at least 1, got {levels}")
    meshes = [coarse]
    for _ in range(levels - 1):
        meshes.append(meshes[-1].refined())
    return [FunctionSpace(m, degree=degree, dirichlet=dirichlet) for m in meshes]
