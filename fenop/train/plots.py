"""Pictures of predictions on the mesh, and of training curves (matplotlib, no display)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from fenop.fem import FunctionSpace


def plot_predictions(
    space: FunctionSpace,
    inputs: np.ndarray,
    reference: np.ndarray,
    prediction: np.ndarray,
    path: str | os.PathLike,
    *,
    metrics: str | os.PathLike | None = None,
) -> Path:
    """Save a figure: per sample, input, reference, prediction and error on the mesh.

    Args:
        space: the space of the fields (2-D).
        inputs, reference, prediction: ``(n_samples, n_dofs)`` (first channel of each).
        path: the image file (PNG, PDF, ... by suffix).
        metrics: a ``metrics.jsonl`` whose training curves are added in a last row.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from skfem.visuals.matplotlib import plot as skfem_plot

    if space.dim != 2:
        raise ValueError(f"pictures need a 2-D mesh, got a {space.dim}-D one")
    curves = []
    if metrics is not None and Path(metrics).is_file():
        curves = [json.loads(line) for line in Path(metrics).read_text().splitlines() if line]
    rows = len(inputs) + (1 if curves else 0)
    figure, axes = plt.subplots(rows, 4, figsize=(13, 3 * rows), squeeze=False)
    titles = ("input", "reference", "prediction", "error")
    for row, (a, u, p) in enumerate(zip(inputs, reference, prediction, strict=True)):
        error = p - u
        largest = float(np.abs(error).max()) or 1.0
        panels = zip(titles, (a, u, p, error), strict=True)
        for col, (title, values) in enumerate(panels):
            ax = axes[row, col]
            # scikit-fem draws any element (P2 through its refined interpolation)
            # and quadrilaterals; the error gets a colour map centred on zero.
            colours = (
                {"cmap": "RdBu_r", "vmin": -largest, "vmax": largest}
                if col == 3
                else {"cmap": "viridis"}
            )
            skfem_plot(space.basis, values, ax=ax, shading="gouraud", colorbar=True, **colours)
            ax.set_aspect("equal")
            ax.set_title(f"sample {row}: {title}")
            ax.set_xticks([])
            ax.set_yticks([])
    if curves:
        ax = axes[-1, 0]
        epochs = [c["epoch"] for c in curves]
        ax.semilogy(epochs, [c["train_loss"] for c in curves], label="train loss")
        ax.semilogy(epochs, [c["test_l2"] for c in curves], label="test relative L2")
        ax.set_xlabel("epoch")
        ax.legend()
        for ax in axes[-1, 1:]:
            ax.axis("off")
    figure.tight_layout()
    path = Path(path)
    figure.savefig(path, dpi=150)
    plt.close(figure)
    return path
