"""Training, model descriptions, checkpoints, and running models over stores."""

from fenop.train.checkpoint import (
    PRETRAINED,
    CheckpointError,
    checkpoint_path,
    load_checkpoint,
    load_model,
    pretrained_names,
    read_config,
    save_checkpoint,
)
from fenop.train.device import DeviceError, resolve_device
from fenop.train.inference import Evaluation, evaluate_store, predict_store
from fenop.train.models import (
    PROCESSORS,
    DescriptionError,
    ModelDescription,
    build_model,
    describe_model,
)
from fenop.train.rollout import rollout
from fenop.train.trainer import Trainer, saved_epoch

__all__ = [
    "PRETRAINED",
    "PROCESSORS",
    "CheckpointError",
    "DescriptionError",
    "DeviceError",
    "Evaluation",
    "ModelDescription",
    "Trainer",
    "build_model",
    "checkpoint_path",
    "describe_model",
    "evaluate_store",
    "load_checkpoint",
    "load_model",
    "predict_store",
    "pretrained_names",
    "read_config",
    "resolve_device",
    "rollout",
    "save_checkpoint",
    "saved_epoch",
]
