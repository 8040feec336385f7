"""Checkpoints: a directory with ``model.safetensors`` and ``config.json``.

Weights are stored with safetensors (no pickle: loading never runs code from the
file). ``config.json`` holds everything needed to rebuild the model: fenop
version, checkpoint format, the processor and its options, the FE space and its
mesh (vertices and cells), the normalisation statistics, and whatever the caller
adds (training data, test error). A checkpoint written by a newer format is
refused, never guessed at.

Writing is atomic: files go to a temporary sibling directory that is renamed into
place, so an interrupted save never leaves a half-written checkpoint.

>>> import tempfile, pathlib, torch
>>> from fenop.fem import FunctionSpace, unit_square
>>> from fenop.operators import FEOperator, MgNO
>>> space = FunctionSpace(unit_square(9), dirichlet="boundary")
>>> model = FEOperator(space, space, MgNO(4, 1, grid=(8, 8), width=4, n_layers=1), resolution=8)
>>> folder = pathlib.Path(tempfile.mkdtemp()) / "ckpt"
>>> _ = save_checkpoint(folder, model, extra={"test_error": 0.1})
>>> loaded = load_checkpoint(folder)
>>> x = torch.randn(1, 1, space.n_dofs)
>>> torch.equal(loaded(x), model(x))
True
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from fenop._errors import InputError
from fenop._files import replacing
from fenop.operators import FEOperator
from fenop.train.models import ModelDescription, build_model, describe_model

FORMAT_VERSION = 1
PRETRAINED = Path(__file__).resolve().parent.parent / "pretrained"


class CheckpointError(InputError):
    """A checkpoint that cannot be used; the message names it and the problem."""

    def __init__(self, path: str | os.PathLike, problem: str):
        super().__init__(f"{os.fspath(path)}: {problem}")


def save_checkpoint(
    directory: str | os.PathLike,
    model: FEOperator,
    *,
    extra: dict | None = None,
    attach: Callable[[Path], None] | None = None,
) -> Path:
    """Write ``model`` to ``directory`` atomically (replacing a checkpoint already there).

    Args:
        directory: the checkpoint directory.
        model: the model.
        extra: further JSON for ``config.json`` (data description, test error, ...).
        attach: writes further files into the (staging) directory before it is
            renamed into place, so they appear together with the weights.
    """
    from fenop import __version__

    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    config = {
        "fenop_version": __version__,
        "format_version": FORMAT_VERSION,
        "model": describe_model(model).to_json(),
        **(extra or {}),
    }
    with replacing(directory, folder=True) as staging:
        # Tensors only: neuraloperator adds its constructor arguments as "_metadata".
        state = {
            k: v.detach().cpu().contiguous()
            for k, v in model.state_dict().items()
            if isinstance(v, torch.Tensor)
        }
        save_file(state, staging / "model.safetensors")
        (staging / "config.json").write_text(json.dumps(config, indent=1))
        if attach is not None:
            attach(staging)
    return directory


def read_config(directory: str | os.PathLike) -> dict:
    """A checkpoint's ``config.json``, after checking that this fenop can read it."""
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(directory, "no such checkpoint directory")
    for name in ("config.json", "model.safetensors"):
        if not (directory / name).is_file():
            raise CheckpointError(directory, f"missing {name}")
    try:
        config = json.loads((directory / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(directory, f"config.json is not readable JSON: {exc}") from None
    if not isinstance(config, dict):
        raise CheckpointError(directory, "config.json does not hold a JSON object")
    version = config.get("format_version")
    if not isinstance(version, int):
        raise CheckpointError(directory, "config.json has no format_version")
    if version > FORMAT_VERSION:
        raise CheckpointError(
            directory,
            f"written in checkpoint format {version} by fenop {config.get('fenop_version')}; "
            f"this fenop reads format {FORMAT_VERSION}: upgrade fenop",
        )
    return config


def load_checkpoint(
    directory: str | os.PathLike, *, device: str | torch.device = "cpu"
) -> FEOperator:
    """The model saved in ``directory``, ready for use (in evaluation mode)."""
    config = read_config(directory)
    if not isinstance(config.get("model"), dict):
        raise CheckpointError(directory, "config.json has no model description ('model')")
    try:
        model = build_model(ModelDescription.from_json(config["model"]))
    except (KeyError, TypeError, ValueError) as exc:
        # the description's values refused by the model's own checks, too
        detail = f"lacks {exc}" if isinstance(exc, KeyError) else str(exc)
        raise CheckpointError(directory, f"config.json: {detail}") from None
    try:
        state = load_file(Path(directory) / "model.safetensors")
    except Exception as exc:  # safetensors raises its own error types for bad files
        raise CheckpointError(directory, f"model.safetensors is not readable: {exc}") from None
    count, names = non_finite(state.items())
    if count:
        raise CheckpointError(
            directory, f"model.safetensors holds NaN or Inf in {count} tensors ({names})"
        )
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise CheckpointError(directory, f"weights do not fit the described model: {exc}") from None
    return model.to(device).eval()


def non_finite(named: Iterable[tuple[str, torch.Tensor]]) -> tuple[int, str]:
    """How many of the ``(name, tensor)`` pairs hold NaN or Inf, and their names (the
    first three, and how many more): what a diverged model's weights are told by."""
    with torch.no_grad():
        bad = [name for name, tensor in named if not torch.isfinite(tensor).all()]
    shown = ", ".join(bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
    return len(bad), shown


def pretrained_names() -> list[str]:
    """Names of the models shipped in ``fenop/pretrained/`` (e.g. ``"darcy-fno"``)."""
    return sorted(p.name for p in PRETRAINED.iterdir() if (p / "config.json").is_file())


def checkpoint_path(name_or_path: str | os.PathLike) -> Path:
    """The checkpoint directory of a shipped model's name or of a path.

    >>> checkpoint_path("darcy-fno").name
    'darcy-fno'
    """
    path = Path(name_or_path)
    if path.is_dir():
        return path
    if str(name_or_path) in pretrained_names():
        return PRETRAINED / str(name_or_path)
    shipped = ", ".join(pretrained_names())
    raise CheckpointError(
        path, f"neither a checkpoint directory nor a shipped model; shipped: {shipped}"
    )


def load_model(name_or_path: str | os.PathLike, *, device: str | torch.device = "cpu"):
    """A ready :class:`~fenop.operators.FEOperator`: a shipped name or a checkpoint directory.

    >>> load_model("darcy-fno").space_in
    FunctionSpace(P1 on MeshTri1, 1089 DOFs, 128 Dirichlet)
    """
    return load_checkpoint(checkpoint_path(name_or_path), device=device)
