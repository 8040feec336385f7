"""Training, checkpoints and loading models (shipped or saved)."""

import os
from pathlib import Path

import torch

from fenop.train.checkpoint import CheckpointError, load_checkpoint, read_config, save_checkpoint
from fenop.train.models import (
    PROCESSORS,
    DescriptionError,
    ModelDescription,
    build_model,
    describe_model,
)
from fenop.train.trainer import Trainer, resolve_device

PRETRAINED = Path(__file__).resolve().parent.parent / "pretrained"


def pretrained_names() -> list[str]:
    """Names of the models shipped in ``fenop/pretrained/`` (e.g. ``"darcy-fno"``)."""
    return sorted(p.name for p in PRETRAINED.iterdir() if (p / "config.json").is_file())


def load_model(name_or_path: str | os.PathLike, *, device: str | torch.device = "cpu"):
    """A ready :class:`~fenop.operators.FEOperator`: a shipped name or a checkpoint directory.

    >>> load_model("darcy-fno").space_in
    FunctionSpace(P1 on MeshTri1, 1089 DOFs, 128 Dirichlet)
    """
    path = Path(name_or_path)
    if path.is_dir():
        return load_checkpoint(path, device=device)
    if str(name_or_path) in pretrained_names():
        return load_checkpoint(PRETRAINED / str(name_or_path), device=device)
    shipped = ", ".join(pretrained_names())
    raise CheckpointError(
        path, f"neither a checkpoint directory nor a shipped model; shipped: {shipped}"
    )


__all__ = [
    "PRETRAINED",
    "PROCESSORS",
    "CheckpointError",
    "DescriptionError",
    "ModelDescription",
    "Trainer",
    "build_model",
    "describe_model",
    "load_checkpoint",
    "load_model",
    "pretrained_names",
    "read_config",
    "resolve_device",
    "save_checkpoint",
]
