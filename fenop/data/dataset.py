"""A torch Dataset over a store, and the normalisers fitted on it.

>>> import tempfile, pathlib
>>> from fenop.data import generate
>>> from fenop.fem import unit_square
>>> path = generate("darcy", 6, unit_square(9), seed=0,
...                 path=pathlib.Path(tempfile.mkdtemp()) / "d.h5", progress=False)
>>> train = FieldDataset(path, inputs=["a"], outputs=["u"], indices=range(4))
>>> x, y = train[0]
>>> x.shape, y.shape, len(train)
(torch.Size([1, 81]), torch.Size([1, 81]), 4)
>>> normalizer = train.normalizer(["a"])
>>> normalizer.encode(x[None]).shape
torch.Size([1, 1, 81])
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from functools import cached_property

import h5py
import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from fenop.data.store import open_h5, store_space, validate_store
from fenop.fem import FunctionSpace

# Samples read per block when fitting normalisers: memory stays flat in the file size.
_BLOCK = 256


class Normalizer(nn.Module):
    """Per-channel affine normalisation to zero mean and unit variance.

    One mean and one standard deviation per channel, not per DOF: per-DOF statistics
    would tie the model to one mesh, and fenop models move between meshes.

    Args:
        mean, std: ``(C,)`` statistics.

    Shapes:
        ``encode``/``decode``: ``(B, C, n_dofs)`` -> same.
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

    def _check(self, x: torch.Tensor) -> None:
        if x.ndim != 3 or x.shape[1] != len(self.mean):
            raise ValueError(
                f"input must have shape (batch, {len(self.mean)}, n_dofs), got {tuple(x.shape)}"
            )

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        self._check(x)
        return (x - self.mean.to(x.dtype)[:, None]) / self.std.to(x.dtype)[:, None]

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        self._check(x)
        return x * self.std.to(x.dtype)[:, None] + self.mean.to(x.dtype)[:, None]

    def to_dict(self) -> dict:
        """JSON-ready statistics (for checkpoints' ``config.json``)."""
        return {"mean": self.mean.tolist(), "std": self.std.tolist()}

    @classmethod
    def from_dict(cls, data: dict) -> Normalizer:
        return cls(data["mean"], data["std"])


class FieldDataset(Dataset):
    """Samples of a store as ``(inputs (C_in, n_dofs), outputs (C_out, n_dofs))`` tensors.

    Reads lazily: each item is read from the file when asked for (a batch at once
    through ``__getitems__``), so memory does not grow with the file. The file is
    opened once per process, so DataLoader workers work.

    Args:
        path: a complete, valid store (checked on construction).
        inputs, outputs: field names, in channel order.
        indices: the samples of this dataset (e.g. ``range(800)`` for a training
            split); default all.
        dtype: dtype of the returned tensors.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        inputs: Sequence[str] = ("a",),
        outputs: Sequence[str] = ("u",),
        *,
        indices: Sequence[int] | None = None,
        dtype: torch.dtype = torch.float32,
    ):
        self.path = os.fspath(path)
        self.inputs, self.outputs = list(inputs), list(outputs)
        if not self.inputs or not self.outputs:
            raise ValueError("`inputs` and `outputs` must each name at least one field")
        header = validate_store(self.path, fields=self.inputs + self.outputs)
        self.header = header
        n_samples = int(header["n_samples"])
        self.indices = (
            np.arange(n_samples) if indices is None else np.asarray(indices, dtype=np.int64)
        )
        if self.indices.ndim != 1 or (
            len(self.indices) and (self.indices.min() < 0 or self.indices.max() >= n_samples)
        ):
            raise ValueError(f"`indices` must lie in [0, {n_samples}) for {self.path}")
        self.dtype = dtype
        self._file: h5py.File | None = None
        self._pid: int | None = None

    @cached_property
    def space(self) -> FunctionSpace:
        """The FE space of the fields (mesh and element of the store)."""
        return store_space(self.path)

    def __getstate__(self) -> dict:
        # For DataLoader workers started by spawn: an open h5py file does not pickle,
        # and the space is cheaper to rebuild than to send.
        state = dict(self.__dict__)
        state.pop("space", None)
        state["_file"] = state["_pid"] = None
        return state

    def _fields(self) -> h5py.File:
        # h5py handles do not survive fork: each process opens its own.
        if self._file is None or self._pid != os.getpid():
            self._file = open_h5(self.path, "r")
            self._pid = os.getpid()
        return self._file

    def __len__(self) -> int:
        return len(self.indices)

    def _read(self, names: list[str], rows: np.ndarray) -> np.ndarray:
        """``(len(rows), len(names), n_dofs)`` for any order of ``rows``."""
        order = np.argsort(rows)
        unique, inverse = np.unique(rows[order], return_inverse=True)
        f = self._fields()
        block = np.stack([f[name][unique] for name in names], axis=1)  # h5py wants increasing
        out = np.empty((len(rows), *block.shape[1:]))
        out[order] = block[inverse]
        return out

    def __getitems__(self, items: Sequence[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        rows = self.indices[np.asarray(items, dtype=np.int64)]
        x = torch.as_tensor(self._read(self.inputs, rows), dtype=self.dtype)
        y = torch.as_tensor(self._read(self.outputs, rows), dtype=self.dtype)
        return list(zip(x, y, strict=True))

    def __getitem__(self, item: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not -len(self) <= item < len(self):
            raise IndexError(f"index {item} out of range for {len(self)} samples")
        return self.__getitems__([item % len(self)])[0]

    def normalizer(self, names: Sequence[str]) -> Normalizer:
        """Fit a :class:`Normalizer` for fields ``names`` on this dataset's samples.

        The statistics are integrals over the domain (each DOF weighted by its row
        sum of the mass matrix), so they do not depend on how the mesh is refined.
        """
        mass = self.space.mass
        weights = (mass @ torch.ones(mass.shape[0], dtype=torch.float64)).numpy()
        weights = weights / weights.sum()
        rows = np.sort(self.indices)
        sums = np.zeros(len(names))
        squares = np.zeros(len(names))
        for start in range(0, len(rows), _BLOCK):
            block = self._read(list(names), rows[start : start + _BLOCK])  # (b, C, n)
            sums += (block @ weights).sum(axis=0)
            squares += ((block**2) @ weights).sum(axis=0)
        mean = sums / len(rows)
        std = np.sqrt(np.maximum(squares / len(rows) - mean**2, 0.0))
        return Normalizer(mean, np.where(std > 0, std, 1.0))
