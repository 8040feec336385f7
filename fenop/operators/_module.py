"""A Module base whose ``.to(dtype)`` keeps complex parameters complex."""

from __future__ import annotations

import torch
from torch import nn


class KeepsComplexModule(nn.Module):
    """``nn.Module`` whose ``.to(dtype)`` gives complex tensors the complex dtype of that precision.

    PyTorch's ``Module.to(torch.float32)`` casts complex parameters to the real
    dtype, silently dropping their imaginary parts, which are half of an FNO's
    spectral weights. Here ``.to(torch.float64)`` makes real tensors float64 and
    complex ones complex128; everything else ``.to`` does is unchanged.
    """

    def to(self, *args, **kwargs):
        # The argument parser that nn.Module.to itself uses: the same signatures.
        device, dtype, non_blocking, memory_format = torch._C._nn._parse_to(*args, **kwargs)
        if dtype is None or not dtype.is_floating_point or memory_format is not None:
            return super().to(*args, **kwargs)
        complex_dtype = dtype.to_complex()

        def convert(t: torch.Tensor) -> torch.Tensor:
            if t.is_complex():
                return t.to(device, complex_dtype, non_blocking)
            return t.to(device, dtype if t.is_floating_point() else None, non_blocking)

        return self._apply(convert)
