"""Pictures of predictions on the mesh, and of training curves (matplotlib, no display)."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from fenop._files import replacing
from fenop.fem import FunctionSpace


def plot_predictions(
    space: FunctionSpace,
    inputs: np.ndarray,
    reference: np.ndarray,
    prediction: np.ndarray,
    path: str | os.PathLike,
    *,
    metrics: str | os.PathLike | None = None,
    names: tuple[str, str] = ("input", "output"),
    samples: Sequence[int] | None = None,
    errors: Sequence[float] | None = None,
) -> Path:
    """Save a figure: per sample, input, reference, prediction and error on the mesh
    (any element: scikit-fem draws P2 and quadrilaterals), the error in a colour map
    centred on zero; 150 dpi.

    Args:
        space: the space of the fields (2-D).
        inputs, reference, prediction: ``(n_samples, n_dofs)`` (first channel of each).
        path: the image file (PNG, PDF, ... by suffix).
        metrics: a ``metrics.jsonl`` whose training curves are added in a last row.
        names: the input and output fields' names, for the titles (e.g. ``("a", "u")``).
        samples: the samples' indices in their store, for the titles (default 0, 1, ...).
        errors: each sample's relative error, shown in its error panel's title.
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
    samples = range(len(inputs)) if samples is None else samples
    rows = len(inputs) + (1 if curves else 0)
    figure = plt.figure(figsize=(13, 3 * rows))
    grid = figure.add_gridspec(rows, 4)
    field, output = names
    titles = (field, f"{output} (reference)", f"{output} (prediction)", "error")
    for row, (a, u, p) in enumerate(zip(inputs, reference, prediction, strict=True)):
        error = p - u
        largest = float(np.abs(error).max()) or 1.0
        for col, (title, values) in enumerate(zip(titles, (a, u, p, error), strict=True)):
            ax = figure.add_subplot(grid[row, col])
            colours = (
                {"cmap": "RdBu_r", "vmin": -largest, "vmax": largest}
                if col == 3
                else {"cmap": "viridis"}
            )
            skfem_plot(space.basis, values, ax=ax, shading="gouraud", colorbar=True, **colours)
            ax.set_aspect("equal")
            if col == 3 and errors is not None:
                title = f"error, relative L2 {errors[row]:.4f}"
            # two lines: one line of this length runs into the colour bars beside it
            ax.set_title(f"sample {samples[row]}\n{title}", fontsize=10)
            ax.set_xticks([])
            ax.set_yticks([])
    if curves:  # the whole last row
        ax = figure.add_subplot(grid[-1, :])
        epochs = [c["epoch"] for c in curves]
        ax.semilogy(epochs, [c["train_loss"] for c in curves], label="train loss")
        ax.semilogy(epochs, [c["test_l2"] for c in curves], label="test relative L2")
        ax.set_xlabel("epoch")
        ax.set_title("training")
        ax.legend()
    figure.tight_layout()
    path = Path(path)
    try:  # all of the picture or nothing, even if interrupted while writing
        with replacing(path) as staging:
            figure.savefig(staging, dpi=150, format=path.suffix[1:].lower())
    finally:
        plt.close(figure)
    return path


def plot_rollout_errors(evaluation, path: str | os.PathLike) -> Path:
    """Save a figure of a stepper's relative L2 error against time: the mean over the
    trajectories, free-running and teacher-forced, with the free-running spread
    (the 10th to 90th percentile) shaded and the 10 % line drawn.

    Args:
        evaluation: a :class:`~fenop.train.trajectories.RolloutEvaluation`.
        path: the image file (PNG, PDF, ... by suffix).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    times = evaluation.times
    figure, ax = plt.subplots(figsize=(7, 4))
    low, high = np.percentile(evaluation.free_l2, [10, 90], axis=0)
    ax.fill_between(times, low, high, alpha=0.25, label="free-running, 10-90 %")
    ax.plot(times, evaluation.free_l2.mean(axis=0), label="free-running, mean")
    ax.plot(times, evaluation.forced_l2.mean(axis=0), "--", label="teacher-forced, mean")
    ax.axhline(0.1, color="grey", linewidth=0.8)
    ax.set_yscale("log")
    ax.set_xlabel("time")
    ax.set_ylabel("relative L2 error")
    ax.set_title(f"{len(evaluation.samples)} trajectories of {Path(evaluation.path).name}")
    ax.legend()
    figure.tight_layout()
    path = Path(path)
    try:
        with replacing(path) as staging:
            figure.savefig(staging, dpi=150, format=path.suffix[1:].lower())
    finally:
        plt.close(figure)
    return path


def animate_rollout(
    space: FunctionSpace,
    reference: np.ndarray,
    prediction: np.ndarray,
    times: Sequence[float],
    path: str | os.PathLike,
    *,
    fps: int = 8,
) -> Path:
    """Save an animated GIF of a rollout beside the FE solution: per frame the
    reference, the prediction (on the reference's colour scale) and their difference.

    Args:
        space: the space of the states (2-D).
        reference, prediction: ``(T, n_dofs)`` states at ``times``.
        times: ``(T,)`` the time of each frame, for the titles.
        path: a ``.gif`` file.
        fps: frames per second.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.animation import FuncAnimation, PillowWriter
    from skfem.visuals.matplotlib import plot as skfem_plot

    path = Path(path)
    if path.suffix.lower() != ".gif":
        raise ValueError(f"{path}: an animation is written as .gif")
    if space.dim != 2:
        raise ValueError(f"animations need a 2-D mesh, got a {space.dim}-D one")
    low, high = float(reference.min()), float(reference.max())
    largest = float(np.abs(prediction - reference).max()) or 1.0
    figure, axes = plt.subplots(1, 3, figsize=(11, 3.6))

    def frame(t: int):
        for ax in axes:
            ax.clear()
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_aspect("equal")
        for ax, values, title, colours in (
            (axes[0], reference[t], "FE solution", {"vmin": low, "vmax": high}),
            (axes[1], prediction[t], "rollout", {"vmin": low, "vmax": high}),
            (
                axes[2],
                prediction[t] - reference[t],
                "rollout - FE",
                {"cmap": "RdBu_r", "vmin": -largest, "vmax": largest},
            ),
        ):
            skfem_plot(space.basis, values, ax=ax, shading="gouraud", **colours)
            ax.set_title(f"{title}, t = {times[t]:.4g}", fontsize=10)
        return list(axes)

    animation = FuncAnimation(figure, frame, frames=len(times), blit=False)
    try:
        with replacing(path) as staging:
            animation.save(staging, writer=PillowWriter(fps=fps))
    finally:
        plt.close(figure)
    return path


def plot_format_problem(path: Path) -> str | None:
    """Why matplotlib cannot save a picture at ``path`` (its suffix names no format
    it writes), or ``None``."""
    from matplotlib.backend_bases import FigureCanvasBase

    formats = FigureCanvasBase.get_supported_filetypes()
    if path.suffix[1:].lower() not in formats:
        return f"not a picture format matplotlib writes; use one of .{', .'.join(sorted(formats))}"
    return None
