"""Normalizer: per-channel affine normalisation of fields, fitted on data, kept in models.

The one type the statistics travel in: :meth:`fenop.data.FieldDataset.normalizer`
fits it, :class:`~fenop.operators.FEOperator` holds it (its buffers are in the
checkpoint's weights) and checkpoints describe it as ``[mean, std]`` in JSON.

>>> import torch
>>> normalizer = Normalizer([1.0], [2.0])
>>> normalizer.encode(torch.tensor([[[3.0, 1.0]]]))
tensor([[[1., 0.]]])
>>> Normalizer.from_json(normalizer.to_json()).to_json()
[[1.0], [2.0]]
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


class Normalizer(nn.Module):
    """Per-channel ``(x - mean) / std`` and its inverse.

    One mean and one standard deviation per channel, not per DOF: per-DOF statistics
    would tie a model to one mesh, and fenop models move between meshes.

    Args:
        mean, std: ``(C,)`` statistics; ``std`` positive.

    Shapes:
        ``encode``/``decode``: ``(B, C, ...)`` -> same (FE ``(B, C, n_dofs)`` or grid
        ``(B, C, *grid)`` tensors alike).
    """

    def __init__(self, mean: Sequence[float] | torch.Tensor, std: Sequence[float] | torch.Tensor):
        super().__init__()
        mean = torch.as_tensor(mean, dtype=torch.float64).reshape(-1)
        std = torch.as_tensor(std, dtype=torch.float64).reshape(-1)
        if mean.shape != std.shape:
            raise ValueError(
                f"`mean` and `std` must have the same length, got {mean.shape} and {std.shape}"
            )
        if not (torch.isfinite(mean).all() and torch.isfinite(std).all() and (std > 0).all()):
            raise ValueError(f"statistics must be finite with positive std, got {mean} and {std}")
        self.register_buffer("mean", mean)
        self.register_buffer("std", std)

    @property
    def channels(self) -> int:
        return len(self.mean)

    def _views(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if x.ndim < 2 or x.shape[1] != self.channels:
            raise ValueError(
                f"input must have shape (batch, {self.channels}, ...), got {tuple(x.shape)}"
            )
        view = (1, -1) + (1,) * (x.ndim - 2)
        return self.mean.to(x.dtype).reshape(view), self.std.to(x.dtype).reshape(view)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        mean, std = self._views(x)
        return (x - mean) / std

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        mean, std = self._views(x)
        return x * std + mean

    def to_json(self) -> list[list[float]]:
        """``[mean, std]``, as checkpoints' ``config.json`` stores them."""
        return [self.mean.tolist(), self.std.tolist()]

    @classmethod
    def from_json(cls, data: Sequence[Sequence[float]]) -> Normalizer:
        mean, std = data
        return cls(mean, std)

    @classmethod
    def of(cls, stats: Normalizer | tuple[Sequence[float], Sequence[float]] | None):
        """``stats`` as a Normalizer: one already, or a ``(mean, std)`` pair (``None`` stays)."""
        if stats is None or isinstance(stats, Normalizer):
            return stats
        return cls(*stats)

    def extra_repr(self) -> str:
        return f"mean={self.mean.tolist()}, std={self.std.tolist()}"
