"""FNO: a thin adapter over ``neuralop.models.FNO`` for fenop's grid layout.

The network is neuraloperator's own; the adapter fixes fenop's conventions
(``(B, C, *grid)`` tensors, keyword-only options, no positional embedding by
default because :class:`~fenop.fem.GridEncoder` supplies coordinates) and makes
it run in float64.

float64: neuraloperator builds its spectral weights and output buffer as
complex64 whatever the input, so a float64 FNO fails. It accepts another
convolution class through ``conv_module``; :class:`SpectralConv64` is that class:
for float32 input it *is* neuraloperator's ``SpectralConv``; for float64 input it
runs the same Fourier-space product in complex128 (the weights, stored complex64,
are promoted).

>>> import torch
>>> fno = FNO(3, 1, n_modes=(8, 8), hidden_channels=16)
>>> fno(torch.randn(2, 3, 24, 24)).shape
torch.Size([2, 1, 24, 24])
>>> fno.double()(torch.randn(1, 3, 24, 24, dtype=torch.float64)).dtype
torch.float64
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence

import torch
from neuralop.layers.spectral_convolution import SpectralConv
from neuralop.models import FNO as _NeuralopFNO

from fenop._checks import check_counts
from fenop.operators.processor import Processor


class SpectralConv64(SpectralConv):
    """neuraloperator's ``SpectralConv`` that also runs in float64.

    Only the dense, non-separable, full-precision configuration (neuraloperator's
    default) has the float64 path; others raise for float64 input.
    """

    def forward(self, x: torch.Tensor, output_shape: Sequence[int] | None = None) -> torch.Tensor:
        if x.dtype != torch.float64:
            return super().forward(x, output_shape)
        if self.complex_data or self.separable or self.fno_block_precision != "full":
            raise TypeError(
                "float64 input needs a real, non-separable, full-precision SpectralConv"
            )
        sizes = list(x.shape[2:])
        dims = list(range(-self.order, 0))
        spectrum = torch.fft.rfftn(x, norm=self.fft_norm, dim=dims)
        if self.order > 1:
            spectrum = torch.fft.fftshift(spectrum, dim=dims[:-1])
        out = spectrum.new_zeros((x.shape[0], self.out_channels, *spectrum.shape[2:]))
        # The weight holds the kept modes, centred (fft-shifted) on all but the last
        # axis, as in neuraloperator; select as many of them as the input has.
        weight = self.weight.to_tensor() if hasattr(self.weight, "to_tensor") else self.weight
        kept_x, kept_w = [slice(None)] * 2, [slice(None)] * 2
        for axis, size in enumerate(spectrum.shape[2:]):
            modes = min(size, self.n_modes[axis])
            if axis == self.order - 1:  # the half spectrum of the real transform
                kept_x.append(slice(0, modes))
                kept_w.append(slice(0, modes))
            else:
                centre_x, centre_w = size // 2, weight.shape[2 + axis] // 2
                low, high = modes // 2, modes // 2 + modes % 2
                kept_x.append(slice(centre_x - low, centre_x + high))
                kept_w.append(slice(centre_w - low, centre_w + high))
        block = weight[tuple(kept_w)].to(torch.complex128)
        out[tuple(kept_x)] = torch.einsum("bi...,io...->bo...", spectrum[tuple(kept_x)], block)
        if self.order > 1:
            # fftshift, not ifftshift, as neuraloperator does: for odd sizes the two
            # differ, and the float64 path must compute what the float32 path does.
            out = torch.fft.fftshift(out, dim=dims[:-1])
        if output_shape is not None:
            sizes = list(output_shape)
        y = torch.fft.irfftn(out, s=sizes, dim=dims, norm=self.fft_norm)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y


class FNO(Processor):
    """The Fourier Neural Operator of neuraloperator on ``(B, C, *grid)`` tensors.

    Args:
        in_channels, out_channels: channels of input and output.
        n_modes: Fourier modes kept per axis (its length sets the dimension).
        hidden_channels: width of the Fourier layers.
        n_layers: number of Fourier layers.
        positional_embedding: neuraloperator's option; ``None`` by default, as the
            FE encoder provides coordinate channels.
        **options: passed on to ``neuralop.models.FNO`` (e.g. ``domain_padding``,
            ``factorization``, ``norm``).

    Shapes:
        ``(B, in_channels, *grid)`` -> ``(B, out_channels, *grid)``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        *,
        n_modes: Sequence[int] = (16, 16),
        hidden_channels: int = 32,
        n_layers: int = 4,
        positional_embedding: str | None = None,
        **options,
    ):
        super().__init__()
        # Checked here, so that the error lists what neuraloperator's FNO accepts.
        theirs = inspect.signature(_NeuralopFNO).parameters
        unknown = [key for key in options if key not in theirs]
        if unknown:
            own = ["n_modes", "hidden_channels", "n_layers", "positional_embedding"]
            fixed = {*own, "in_channels", "out_channels"}
            accepted = own + [key for key in theirs if key not in fixed]
            raise TypeError(
                f"FNO has no option {', '.join(map(repr, unknown))}; its options: "
                f"{', '.join(accepted)}"
            )
        modes = list(n_modes) if isinstance(n_modes, list | tuple) else [n_modes]
        check_counts(
            "FNO",
            in_channels=(in_channels, 1),
            out_channels=(out_channels, 1),
            hidden_channels=(hidden_channels, 1),
            n_layers=(n_layers, 1),
            **{f"n_modes[{i}]": (m, 1) for i, m in enumerate(modes)},
        )
        options.setdefault("conv_module", SpectralConv64)
        self.in_channels, self.out_channels = in_channels, out_channels
        self.net = _NeuralopFNO(
            n_modes=tuple(n_modes),
            in_channels=in_channels,
            out_channels=out_channels,
            hidden_channels=hidden_channels,
            n_layers=n_layers,
            positional_embedding=positional_embedding,
            **options,
        )
        self.dim = len(tuple(n_modes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 2 + self.dim:
            raise ValueError(
                f"input must have shape (batch, channels, {self.dim} grid axes), "
                f"got {tuple(x.shape)}"
            )
        return self.net(x)
