"""Training, checkpoints and loading models."""

from fenop.train.checkpoint import (
    CheckpointError,
    build_model,
    load_checkpoint,
    read_config,
    save_checkpoint,
)
from fenop.train.trainer import Trainer


def load_model(name_or_path, *, device="cpu"):
    """A ready :class:`~fenop.operators.FEOperator` from a checkpoint directory.

    Shipped pretrained names are not available yet; a name that is not a directory
    is refused with the list of what is known.
    """
    from pathlib import Path

    path = Path(name_or_path)
    if path.is_dir():
        return load_checkpoint(path, device=device)
    raise CheckpointError(
        path, "no such checkpoint directory (no pretrained models are shipped yet)"
    )


__all__ = [
    "CheckpointError",
    "Trainer",
    "build_model",
    "load_checkpoint",
    "load_model",
    "read_config",
    "save_checkpoint",
]
