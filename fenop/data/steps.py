"""The time steps of a trajectory store as training pairs (:class:`StepDataset`).

A model that advances a state maps the last ``history`` states of a trajectory (and
the static fields of its sample: a coefficient, a velocity) to the next ``bundle``
states. Every window of ``history + bundle`` consecutive states of every sample is
one pair::

    x = (u[t - history + 1], ..., u[t], *statics)     (history + n_statics, n_dofs)
    y = (u[t + 1], ..., u[t + bundle])                 (bundle, n_dofs)

>>> import tempfile, pathlib
>>> from fenop.data import generate
>>> from fenop.fem import unit_square
>>> path = generate("heat", 3, unit_square(9), seed=0, n_steps=5, trajectory=True,
...                 path=pathlib.Path(tempfile.mkdtemp()) / "h.h5", progress=False)
>>> steps = StepDataset(path, history=2)
>>> x, y = steps[0]
>>> x.shape, y.shape, len(steps)  # 3 samples of 6 states: 4 windows of 3 states each
(torch.Size([2, 81]), torch.Size([1, 81]), 12)
>>> steps.trajectories([0]).shape  # whole trajectories, to roll out against
torch.Size([1, 6, 81])
"""

from __future__ import annotations

import copy
import os
from collections.abc import Sequence

import h5py
import numpy as np
import torch
from torch.utils.data import Dataset

from fenop.data.header import StoreError, open_h5
from fenop.data.store import StoreInfo, read_store
from fenop.fem import FunctionSpace
from fenop.fem.normalizer import Normalizer

# Samples read per block when fitting normalisers: memory stays flat in the file size.
_BLOCK = 64


class StepDataset(Dataset):
    """Windows of the trajectories of a store as ``(x (history + S, n_dofs),
    y (bundle, n_dofs))`` tensors (see the module's docstring for their channels).

    Reads lazily, a window at a time; the file is opened once per process.

    Args:
        store: a complete store with the trajectory ``state``: its path or a
            :class:`~fenop.data.store.StoreInfo`.
        state: the trajectory field the model advances.
        statics: static fields of each sample, appended to the input channels.
        history: states the model sees (``m``).
        bundle: states it predicts at once (``k``, temporal bundling).
        unroll: model calls whose targets each window holds (``y`` has
            ``unroll * bundle`` states).
        indices: the samples (trajectories) of this dataset; default all.
        horizon: use only the first ``horizon + 1`` states of each trajectory (a
            model trained on a short horizon, rolled out on a longer one); default all.
        dtype: dtype of the returned tensors.
        check_values: check the samples for NaN and Inf.
    """

    def __init__(
        self,
        store: str | os.PathLike | StoreInfo,
        *,
        state: str = "u",
        statics: Sequence[str] = (),
        history: int = 1,
        bundle: int = 1,
        unroll: int = 1,
        indices: Sequence[int] | None = None,
        horizon: int | None = None,
        dtype: torch.dtype = torch.float32,
        check_values: bool = True,
    ):
        for name, value in (("history", history), ("bundle", bundle), ("unroll", unroll)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"`{name}` must be a positive int, got {value!r}")
        self.state, self.statics = state, list(statics)
        fields = [state, *self.statics]
        path = store.path if isinstance(store, StoreInfo) else store
        store = read_store(path, fields=fields)
        if state not in store.trajectories:
            raise StoreError(
                store.path,
                f"field {state!r} is not a trajectory (sample, time, dof): there is no "
                "state to advance",
            )
        moving = [name for name in self.statics if name in store.trajectories]
        if moving:
            raise StoreError(
                store.path,
                f"field {moving[0]!r} is a trajectory; static inputs are (sample, dof) fields",
            )
        n_times = len(store.times) if horizon is None else horizon + 1
        if horizon is not None and not 1 <= horizon < len(store.times):
            raise ValueError(
                f"`horizon` must lie in [1, {len(store.times) - 1}] for {store.path}, got {horizon}"
            )
        self.path, self.header, self.space = store.path, store.header, store.space
        self.times = store.times[:n_times]
        self.history, self.bundle, self.unroll = history, bundle, unroll
        self.indices = (
            np.arange(store.n_samples) if indices is None else np.asarray(indices, dtype=np.int64)
        )
        if self.indices.ndim != 1 or (
            len(self.indices) and (self.indices.min() < 0 or self.indices.max() >= store.n_samples)
        ):
            raise ValueError(f"`indices` must lie in [0, {store.n_samples}) for {self.path}")
        if check_values:
            store.check_values(fields, self.indices)
        self.windows = self._windows(unroll)  # per trajectory
        self.dtype = dtype
        self._file: h5py.File | None = None
        self._pid: int | None = None

    @property
    def dt(self) -> float:
        """The step between saved states; a ValueError where it is not uniform."""
        steps = np.diff(self.times)
        if not np.allclose(steps, steps[0], rtol=1e-9, atol=0):
            raise ValueError(f"{self.path}: the saved times are not evenly spaced")
        return float(steps[0])

    def _windows(self, unroll: int) -> int:
        """Windows per trajectory with the targets of ``unroll`` calls; a StoreError
        where the trajectories are too short for one."""
        ahead, n_times = unroll * self.bundle, len(self.times)
        if n_times < self.history + ahead:
            raise StoreError(
                self.path,
                f"its trajectories of {n_times} states are too short for a history of "
                f"{self.history} and {ahead} predicted state(s) ({self.history + ahead} needed)",
            )
        return n_times - self.history - ahead + 1

    def unrolled(self, unroll: int) -> StepDataset:
        """The same trajectories in windows with the targets of ``unroll`` calls (what
        the training modes that chain calls need; the Trainer asks for them)."""
        windows = copy.copy(self)
        windows.windows, windows.unroll = self._windows(unroll), unroll
        windows._file = windows._pid = None
        return windows

    def description(self) -> dict:
        """How a stepper trained on these windows rolls out, JSON-ready: what its
        checkpoint records as ``data.stepper`` (``fenop evaluate`` and ``fenop
        predict`` read it). ``dt`` is ``None`` where the times are uneven."""
        try:
            dt = self.dt
        except ValueError:
            dt = None
        return {
            "state": self.state,
            "statics": list(self.statics),
            "history": self.history,
            "bundle": self.bundle,
            "horizon": len(self.times) - 1,
            "dt": dt,
        }

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_file"] = state["_pid"] = None  # an open h5py file does not pickle
        return state

    def _fields(self) -> h5py.File:
        if self._file is None or self._pid != os.getpid():  # h5py handles do not survive fork
            self._file = open_h5(self.path, "r")
            self._pid = os.getpid()
        return self._file

    def __len__(self) -> int:
        return len(self.indices) * self.windows

    def __getitem__(self, item: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not -len(self) <= item < len(self):
            raise IndexError(f"index {item} out of range for {len(self)} windows")
        sample, start = divmod(item % len(self), self.windows)
        row = int(self.indices[sample])
        f = self._fields()
        states = f[self.state][row, start : start + self.history + self.unroll * self.bundle]
        x = [states[: self.history]] + [f[name][row][None] for name in self.statics]
        return (
            torch.as_tensor(np.concatenate(x), dtype=self.dtype),
            torch.as_tensor(states[self.history :], dtype=self.dtype),
        )

    def trajectories(self, items: Sequence[int]) -> torch.Tensor:
        """The states of trajectories ``items`` (positions in :attr:`indices`), up to
        the horizon: ``(len(items), n_times, n_dofs)``."""
        rows = self.indices[np.asarray(items, dtype=np.int64)]
        f = self._fields()
        values = np.stack([f[self.state][int(r), : len(self.times)] for r in rows])
        return torch.as_tensor(values, dtype=self.dtype)

    def static_fields(self, items: Sequence[int]) -> torch.Tensor:
        """The static inputs of trajectories ``items``: ``(len(items), S, n_dofs)``."""
        rows = self.indices[np.asarray(items, dtype=np.int64)]
        f = self._fields()
        values = np.zeros((len(rows), len(self.statics), self.space.n_dofs))
        for i, row in enumerate(rows):
            for c, name in enumerate(self.statics):
                values[i, c] = f[name][int(row)]
        return torch.as_tensor(values, dtype=self.dtype)

    def normalizers(self) -> tuple[Normalizer, Normalizer]:
        """Input and output :class:`~fenop.fem.Normalizer` for a stepper: one set of
        statistics for the state, whichever channel it is in (a predicted state
        becomes an input of the next step), and each static field's own.

        Integrals over the domain, as :meth:`FieldDataset.normalizer
        <fenop.data.FieldDataset.normalizer>`, over every state of every trajectory.
        """
        space: FunctionSpace = self.space
        mass = space.mass
        weights = (mass @ torch.ones(mass.shape[0], dtype=torch.float64)).numpy()
        weights = weights / weights.sum()
        names = [self.state, *self.statics]
        sums, squares, counts = np.zeros(len(names)), np.zeros(len(names)), np.zeros(len(names))
        f = self._fields()
        rows = np.unique(self.indices)  # h5py reads rows in increasing order
        for start in range(0, len(rows), _BLOCK):
            block = rows[start : start + _BLOCK]
            for c, name in enumerate(names):
                values = f[name][block]
                if c == 0:
                    values = values[:, : len(self.times)].reshape(-1, space.n_dofs)
                sums[c] += (values @ weights).sum()
                squares[c] += ((values**2) @ weights).sum()
                counts[c] += len(values)
        mean = sums / counts
        std = np.sqrt(np.maximum(squares / counts - mean**2, 0.0))
        std = np.where(std > 0, std, 1.0)
        x = [0] * self.history + list(range(1, len(names)))
        y = [0] * self.bundle  # a stepper's outputs: one call's
        return Normalizer(mean[x], std[x]), Normalizer(mean[y], std[y])
