"""The device a command or a Trainer runs on."""

from __future__ import annotations

import torch

from fenop._errors import InputError


class DeviceError(InputError):
    """A device that cannot be used here (unknown, or absent on this machine)."""


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """``device`` as a ``torch.device``; ``None`` or ``"auto"``: CUDA when present,
    else the CPU. A ValueError says why a device cannot be used here.

    >>> resolve_device("cpu")
    device(type='cpu')
    """
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError):
        raise DeviceError(f"unknown device {device!r}; expected cpu, cuda or cuda:N") from None
    if resolved.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            build = "" if torch.version.cuda else f" (torch {torch.__version__} is a CPU build)"
            raise DeviceError(f"device {device!r}: no CUDA device here{build}")
        if resolved.index is not None and resolved.index >= count:
            raise DeviceError(f"device {device!r}: only {count} CUDA device(s) here")
    return resolved
