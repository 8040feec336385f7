"""Grid data sets of the neuraloperator ecosystem, read into fenop's FE form.

neuraloperator's small Darcy sets are ``.pt`` files holding a dict with ``x``
``(N, n, n)`` (the permeability, as booleans or values) and ``y`` ``(N, n, n)``
(the pressure) on an n x n grid of the unit square. On the P1 space of
``unit_square(n)`` the grid values are exactly the DOF values, so such a file
becomes a store that fenop's training code reads like its own.

Array axis 0 is taken as the x-coordinate and axis 1 as y (the layout of
:mod:`fenop._types`).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from fenop._checks import missing_file
from fenop.data.header import StoreError
from fenop.data.store import create_store, write_samples
from fenop.fem import FunctionSpace, unit_square


def grid_to_dofs(space: FunctionSpace, values: np.ndarray) -> np.ndarray:
    """Values on the ``n x n`` vertex grid of ``unit_square(n)`` -> DOF values.

    Args:
        space: a P1 space on ``unit_square(n)``.
        values: ``(N, n, n)``, axis 1 along x and axis 2 along y.

    Returns:
        ``(N, n_dofs)``.
    """
    n = values.shape[-1]
    index = np.rint(space.dof_points * (n - 1)).astype(np.int64)
    if values.shape[-2:] != (n, n) or index.max() != n - 1 or space.n_dofs != n * n:
        raise ValueError(f"values of shape {values.shape} do not match {space!r}")
    return values[:, index[:, 0], index[:, 1]]


def read_neuralop_darcy(
    path: str | os.PathLike, *, a_values: tuple[float, float] = (3.0, 12.0)
) -> tuple[FunctionSpace, dict[str, np.ndarray]]:
    """Read a neuraloperator Darcy ``.pt`` file.

    Args:
        path: the file (a dict with ``x`` and ``y``, each ``(N, n, n)``).
        a_values: permeability for False and True when ``x`` is boolean.

    Returns:
        The P1 space on ``unit_square(n)`` (no Dirichlet DOFs: these grids are
        crops whose outer values are not zero) and the fields ``a`` and ``u``,
        each ``(N, n_dofs)`` float64.
    """
    path = Path(path)
    if problem := missing_file(path):
        raise StoreError(path, problem)
    try:
        # weights_only: plain tensors in a dict, never arbitrary pickled objects.
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise StoreError(path, f"not a readable torch file: {exc}") from None
    if not isinstance(data, dict) or not {"x", "y"} <= set(data):
        raise StoreError(path, "expected a dict with tensors 'x' and 'y'")
    x, y = data["x"], data["y"]
    if x.ndim != 3 or x.shape != y.shape or x.shape[1] != x.shape[2]:
        raise StoreError(
            path, f"'x' and 'y' must both be (N, n, n), got {tuple(x.shape)} and {tuple(y.shape)}"
        )
    if x.dtype == torch.bool:
        x = torch.where(x, a_values[1], a_values[0])
    x, y = x.double().numpy(), y.double().numpy()
    if not (np.isfinite(x).all() and np.isfinite(y).all()):
        raise StoreError(path, "'x' or 'y' holds NaN or Inf")
    space = FunctionSpace(unit_square(x.shape[1]))
    return space, {"a": grid_to_dofs(space, x), "u": grid_to_dofs(space, y)}


def convert_neuralop_darcy(
    source: str | os.PathLike,
    target: str | os.PathLike,
    *,
    a_values: tuple[float, float] = (3.0, 12.0),
    overwrite: bool = False,
) -> Path:
    """Write a neuraloperator Darcy ``.pt`` file as a fenop store at ``target``."""
    target = Path(target)
    if target.exists() and not overwrite:
        raise StoreError(target, "exists; pass overwrite to replace it")
    space, fields = read_neuralop_darcy(source, a_values=a_values)
    n_samples = len(fields["a"])
    attrs = {
        "pde": "darcy",
        "dirichlet": "none",
        "parameters": {"a_low": a_values[0], "a_high": a_values[1], "origin": Path(source).name},
        "seed": -1,
    }
    create_store(target, space, fields=["a", "u"], n_samples=n_samples, attrs=attrs)
    write_samples(target, 0, fields)
    return target
