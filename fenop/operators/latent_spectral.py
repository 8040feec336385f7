"""LSM: the latent spectral model of Wu et al. (ICML 2023), on 2-D grids.

A U-Net-like hierarchy (convolutions, max-pooling down, bilinear up-sampling) whose
skip connections pass through *neural spectral blocks*. A block cuts its input
into patches; in each patch a few learned latent tokens gather the pixels by
attention; each token channel is then transformed by a learned combination of
sine and cosine basis functions of its value (the "latent spectral" operator);
finally the pixels read the tokens back by attention. Attention per patch keeps
the cost linear in the number of pixels.

Differences from the reference code, which only builds on CUDA: it runs on any
device and grid size (inputs are padded to whole patches and cropped back), and
GroupNorm replaces BatchNorm so that evaluation does not depend on batch statistics.

>>> import torch
>>> lsm = LSM(3, 1, width=8, depth=3, patch_size=4)
>>> lsm(torch.randn(2, 3, 37, 30)).shape
torch.Size([2, 1, 37, 30])
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from fenop._checks import check_counts
from fenop.operators.processor import Processor


def _double_conv(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
        nn.GroupNorm(1, out_channels),
        nn.GELU(),
        nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False),
        nn.GroupNorm(1, out_channels),
        nn.GELU(),
    )


class NeuralSpectralBlock(nn.Module):
    """Patchwise attention to latent tokens, a spectral map on them, attention back.

    Args:
        channels: feature channels (divisible by ``heads``).
        n_basis: sine/cosine basis functions per token channel.
        n_tokens: latent tokens per patch.
        patch_size: side of the square patches.
        heads: attention heads.

    Shapes:
        ``(B, C, H, W)`` -> ``(B, C, H, W)``.
    """

    def __init__(
        self,
        channels: int,
        *,
        n_basis: int = 12,
        n_tokens: int = 4,
        patch_size: int = 4,
        heads: int = 8,
    ):
        super().__init__()
        heads = math.gcd(heads, channels)  # narrow layers get fewer heads
        self.channels, self.heads, self.patch_size = channels, heads, patch_size
        self.tokens = nn.Parameter(torch.rand(heads, n_tokens, channels // heads) / channels)
        self.to_keys_values = nn.Conv2d(channels, 2 * channels, 1)
        self.to_queries = nn.Conv2d(channels, channels, 1)
        self.register_buffer("frequencies", torch.arange(n_basis) / n_basis, persistent=False)
        self.spectral_weights = nn.Parameter(torch.rand(channels, 2 * n_basis) / channels)

    @staticmethod
    def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return torch.softmax(q @ k.transpose(-1, -2), dim=-1) @ v

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        p = min(self.patch_size, h, w)
        pad_h, pad_w = -h % p, -w % p
        padded = F.pad(x, (0, pad_w, 0, pad_h))
        nh, nw = (h + pad_h) // p, (w + pad_w) // p
        patches = (
            padded.reshape(b, c, nh, p, nw, p)
            .permute(0, 2, 4, 1, 3, 5)
            .reshape(b * nh * nw, c, p, p)
        )
        n, heads, d = patches.shape[0], self.heads, c // self.heads

        def split_heads(t: torch.Tensor) -> torch.Tensor:  # (n, c, p, p) -> (n, heads, p*p, d)
            return t.reshape(n, heads, d, p * p).transpose(-1, -2)

        keys, values = self.to_keys_values(patches).chunk(2, dim=1)
        tokens = self.tokens.to(x.dtype).expand(n, -1, -1, -1)
        tokens = tokens + self._attend(tokens, split_heads(keys), split_heads(values))
        # Latent spectral map: each token channel through a learned sin/cos series of its value.
        latent = tokens.transpose(-1, -2).reshape(n, c, -1)  # (n, c, n_tokens)
        angles = math.pi * latent[..., None] * self.frequencies.to(x.dtype)
        basis = torch.cat([torch.sin(angles), torch.cos(angles)], dim=-1)
        latent = latent + torch.einsum("nctm,cm->nct", basis, self.spectral_weights.to(x.dtype))
        tokens = latent.reshape(n, heads, d, -1).transpose(-1, -2)
        read = self._attend(split_heads(self.to_queries(patches)), tokens, tokens)
        patches = patches + read.transpose(-1, -2).reshape(n, c, p, p)
        out = (
            patches.reshape(b, nh, nw, c, p, p)
            .permute(0, 3, 1, 4, 2, 5)
            .reshape(b, c, nh * p, nw * p)
        )
        return out[..., :h, :w]


class LSM(Processor):
    """Latent spectral model on ``(B, C, H, W)`` tensors.

    Args:
        in_channels, out_channels: channels of input and output.
        width: channels at the finest level (doubling at each coarser one).
        depth: levels of the hierarchy (``depth - 1`` poolings).
        n_basis, n_tokens, patch_size, heads: options of the spectral blocks.

    Shapes:
        ``(B, in_channels, H, W)`` -> ``(B, out_channels, H, W)``; H, W at least
        ``2 ** (depth - 1)``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        *,
        width: int = 32,
        depth: int = 5,
        n_basis: int = 12,
        n_tokens: int = 4,
        patch_size: int = 4,
        heads: int = 8,
    ):
        super().__init__()
        check_counts(
            "LSM",
            in_channels=(in_channels, 1),
            out_channels=(out_channels, 1),
            width=(width, 1),
            depth=(depth, 1),
            n_basis=(n_basis, 1),
            n_tokens=(n_tokens, 1),
            patch_size=(patch_size, 1),
            heads=(heads, 1),
        )
        self.in_channels, self.out_channels, self.depth = in_channels, out_channels, depth
        widths = [width * 2**level for level in range(depth)]
        self.lift = nn.Conv2d(in_channels, width, 1)
        self.down = nn.ModuleList(
            [_double_conv(width, width)]
            + [_double_conv(widths[i - 1], widths[i]) for i in range(1, depth)]
        )
        block = dict(n_basis=n_basis, n_tokens=n_tokens, patch_size=patch_size, heads=heads)
        self.spectral = nn.ModuleList(NeuralSpectralBlock(c, **block) for c in widths)
        self.up = nn.ModuleList(
            _double_conv(widths[i] + widths[i + 1], widths[i]) for i in range(depth - 1)
        )
        self.project = nn.Sequential(
            nn.Conv2d(width, 128, 1), nn.GELU(), nn.Conv2d(128, out_channels, 1)
        )

    def check_grid(self, grid: tuple[int, ...]) -> None:
        """Raise a ValueError if the hierarchy cannot pool a grid of shape ``grid``
        ``(H, W)`` down its ``depth - 1`` levels."""
        if min(grid) < 2 ** (self.depth - 1):
            raise ValueError(
                f"LSM of depth {self.depth} needs at least {2 ** (self.depth - 1)} grid points "
                f"per axis, got a grid {grid}: use a finer grid or a smaller depth"
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"input must have shape (batch, {self.in_channels}, H, W), got {tuple(x.shape)}"
            )
        self.check_grid(tuple(x.shape[2:]))
        features = []
        u = self.lift(x)
        for level, conv in enumerate(self.down):
            u = conv(u if level == 0 else F.max_pool2d(u, 2))
            features.append(u)
        u = self.spectral[-1](features[-1])
        for level in range(self.depth - 2, -1, -1):
            skip = self.spectral[level](features[level])
            u = F.interpolate(u, size=skip.shape[2:], mode="bilinear", align_corners=True)
            u = self.up[level](torch.cat([skip, u], dim=1))
        return self.project(u)
