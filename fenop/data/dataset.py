"""A torch Dataset over a store, and the normalisers fitted on it (:class:`Normalizer`).

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

import h5py
import numpy as np
import torch
from torch.utils.data import Dataset

from fenop.data.header import open_h5
from fenop.data.store import StoreInfo, read_store, store_space
from fenop.fem import FunctionSpace
from fenop.fem.normalizer import Normalizer

# Samples read per block when fitting normalisers: memory stays flat in the file size.
_BLOCK = 256


class FieldDataset(Dataset):
    """Samples of a store as ``(inputs (C_in, n_dofs), outputs (C_out, n_dofs))`` tensors.

    Reads lazily: each item is read from the file when asked for (a batch at once
    through ``__getitems__``), so memory does not grow with the file. The file is
    opened once per process, so DataLoader workers work.

    Args:
        store: a complete store: its path, or a :class:`~fenop.data.store.StoreInfo`
            already read (then the file is not opened again to check it; several
            splits of one store share its space).
        inputs, outputs: field names, in channel order.
        indices: the samples of this dataset (e.g. ``range(800)`` for a training
            split); default all.
        dtype: dtype of the returned tensors.
        check_values: check that this dataset's samples hold no NaN or Inf (a
            caller that checked them already passes ``False``).
    """

    def __init__(
        self,
        store: str | os.PathLike | StoreInfo,
        inputs: Sequence[str] = ("a",),
        outputs: Sequence[str] = ("u",),
        *,
        indices: Sequence[int] | None = None,
        dtype: torch.dtype = torch.float32,
        check_values: bool = True,
    ):
        self.inputs, self.outputs = list(inputs), list(outputs)
        if not self.inputs or not self.outputs:
            raise ValueError("`inputs` and `outputs` must each name at least one field")
        fields = self.inputs + self.outputs
        if not isinstance(store, StoreInfo):
            store = read_store(store, fields=fields)
        elif not set(fields) <= set(store.fields) or store.n_complete < store.n_samples:
            # read for other fields, or allowing partial stores: check it for these
            store = read_store(store.path, fields=fields)
        store.require_static(fields, reader="FieldDataset")
        self.path, self.header = store.path, store.header
        self._space: FunctionSpace | None = store.space
        n_samples = store.n_samples
        self.indices = (
            np.arange(n_samples) if indices is None else np.asarray(indices, dtype=np.int64)
        )
        if self.indices.ndim != 1 or (
            len(self.indices) and (self.indices.min() < 0 or self.indices.max() >= n_samples)
        ):
            raise ValueError(f"`indices` must lie in [0, {n_samples}) for {self.path}")
        if check_values:
            store.check_values(fields, self.indices)
        self.dtype = dtype
        self._file: h5py.File | None = None
        self._pid: int | None = None

    @property
    def space(self) -> FunctionSpace:
        """The FE space of the fields (mesh and element of the store)."""
        if self._space is None:
            self._space = store_space(self.path)
        return self._space

    def __getstate__(self) -> dict:
        # For DataLoader workers started by spawn: an open h5py file does not pickle,
        # and the space is cheaper to rebuild than to send.
        state = dict(self.__dict__)
        state["_space"] = state["_file"] = state["_pid"] = None
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

    def normalizers(self) -> tuple[Normalizer, Normalizer]:
        """:meth:`normalizer` of the inputs and of the outputs, fitted in one pass."""
        both = self.normalizer(self.inputs + self.outputs)
        k = len(self.inputs)
        return (
            Normalizer(both.mean[:k], both.std[:k]),
            Normalizer(both.mean[k:], both.std[k:]),
        )
