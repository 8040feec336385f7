"""MgNO: the multigrid neural operator of He, Liu & Xu (ICLR 2024), on grids.

MgNO parameterises each layer's linear operator by one multichannel multigrid
V-cycle: smoothing steps ``u <- u + S(f - A u)`` with learned 3x3 convolutions
``A`` and ``S``, the residual restricted by a strided convolution, the coarse
correction prolongated by a transposed convolution. A layer is
``σ(MgConv(u) + W u)``. The number of levels follows from the grid the network is
built for, and any grid size works (coarse sizes are ``ceil(n / 2)``; prolongated
tensors are cropped to the finer size). :class:`~fenop.operators.FEMultigrid` is
the same idea on FE meshes.

>>> import torch
>>> mgno = MgNO(3, 1, grid=(33, 33), width=8, n_layers=2)
>>> mgno.levels, mgno(torch.randn(2, 3, 33, 33)).shape
(4, torch.Size([2, 1, 33, 33]))
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import nn

from fenop._checks import check_counts
from fenop.operators.processor import Processor

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


class MgNO(Processor):
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
        check_counts(
            "MgNO",
            in_channels=(in_channels, 1),
            out_channels=(out_channels, 1),
            width=(width, 1),
            n_layers=(n_layers, 1),
            pre=(pre, 1),
            post=(post, 0),
        )
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
