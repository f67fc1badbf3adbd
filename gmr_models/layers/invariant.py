"""Invariant differential features: orientation information a radial kernel cannot see.

A GMR kernel is radially symmetric, so it cannot respond to an edge's direction. The paper
calls this its information loss. :class:`InvariantFeatures` restores part of it without
losing equivariance. For every input channel and Gaussian scale ``s`` it computes three
scale-normalised Gaussian-derivative responses that do not change when the image turns:

* gradient magnitude ``s * |grad(G_s * x)|``: edge strength, whatever the edge's direction;
* Laplacian ``s^2 * trace(H)``: blob response (the LoG);
* Hessian norm ``s^2 * ||H||_F``: curvature, whatever its orientation.

The sampled derivative kernels map onto each other under every permutation and sign change
of the axes, and each feature is a symmetric function of them. So the features are exactly
invariant to the grid symmetries (90-degree rotations and flips in 2D, the 48 symmetries of
the cube in 3D) and nearly so at other angles. One implementation serves 1D, 2D and 3D. The
layer has no parameters: it adds features, and the network learns what to do with them.

Example:
    >>> import torch
    >>> feats = InvariantFeatures(2, in_channels=3, scales=(1.0, 2.0))
    >>> feats(torch.randn(1, 3, 32, 32)).shape   # 3 inputs + 3 channels x 2 scales x 3 features
    torch.Size([1, 21, 32, 32])
"""

from __future__ import annotations

import itertools
import math
from typing import Sequence

import torch
from torch import Tensor, nn

from .factories import CONV_FUNCTIONS, check_spatial_dims

__all__ = ["InvariantFeatures"]


def _gaussian_derivatives(scale: float, dtype=torch.float64) -> tuple[Tensor, Tensor, Tensor]:
    """Sampled 1D Gaussian and its first and second derivatives (radius ``ceil(3 * scale)``)."""
    r = max(1, math.ceil(3 * scale))
    x = torch.arange(-r, r + 1, dtype=dtype)
    g0 = torch.exp(-0.5 * (x / scale) ** 2)
    g0 = g0 / g0.sum()
    g1 = -x / scale**2 * g0
    g1 = g1 / -(x * g1).sum()  # a unit ramp gives exactly 1 despite the truncation
    g2 = (x**2 / scale**4 - 1 / scale**2) * g0
    g2 = g2 - g2.mean()  # no response to a constant image
    g2 = g2 / (0.5 * x**2 * g2).sum()  # x^2 / 2 gives exactly 1
    return g0, g1, g2


class InvariantFeatures(nn.Module):
    """The input followed by its grid-invariant Gaussian-derivative features.

    Args:
        spatial_dims: 1, 2 or 3.
        in_channels: input channels.
        scales: Gaussian scales in pixels (each at least 0.5).

    Shape:
        ``(N, C, *S) -> (N, C * (1 + 3 * len(scales)), *S)``.
    """

    def __init__(self, spatial_dims: int, in_channels: int, scales: Sequence[float] = (1.0, 2.0)) -> None:
        super().__init__()
        self.spatial_dims = check_spatial_dims(spatial_dims)
        if not isinstance(in_channels, int) or isinstance(in_channels, bool) or in_channels < 1:
            raise ValueError(f"in_channels must be a positive int, got {in_channels!r}")
        scales = tuple(scales) if isinstance(scales, (list, tuple)) else None
        if not scales or any(isinstance(s, bool) or not isinstance(s, (int, float)) or not 0.5 <= s <= 16 for s in scales):
            raise ValueError(f"scales must be a non-empty list of numbers in [0.5, 16], got {scales!r}")
        self.in_channels, self.scales = in_channels, tuple(float(s) for s in scales)
        self.out_channels = in_channels * (1 + 3 * len(scales))
        d = self.spatial_dims
        pairs = list(itertools.combinations_with_replacement(range(d), 2))
        for i, s in enumerate(self.scales):
            g = _gaussian_derivatives(s)
            kernels = [self._separable([g[1] if a == axis else g[0] for a in range(d)]) * s for axis in range(d)]
            kernels += [self._separable([g[2] if a == p == q else g[1] if a in (p, q) else g[0] for a in range(d)]) * s**2
                        for p, q in pairs]
            bank = torch.stack(kernels)[:, None].repeat(in_channels, 1, *([1] * d))  # (C * n_k, 1, *k)
            self.register_buffer(f"bank{i}", bank.to(torch.get_default_dtype()), persistent=False)
        self._n_first, self._pairs = d, pairs

    @staticmethod
    def _separable(factors: list[Tensor]) -> Tensor:
        out = factors[0]
        for f in factors[1:]:
            out = out[..., None] * f
        return out

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != self.spatial_dims + 2 or x.shape[1] != self.in_channels:
            raise ValueError(f"expected (N, {self.in_channels}, *spatial) with {self.spatial_dims} spatial dims, got {tuple(x.shape)}")
        n, c, d = x.shape[0], self.in_channels, self.spatial_dims
        feats = [x]
        for i in range(len(self.scales)):
            bank = getattr(self, f"bank{i}").to(x.dtype)
            r = bank.shape[-1] // 2
            y = CONV_FUNCTIONS[d](x, bank, padding=r, groups=c).view(n, c, -1, *x.shape[2:])
            first, second = y[:, :, : self._n_first], y[:, :, self._n_first:]
            diag = torch.stack([second[:, :, j] for j, (p, q) in enumerate(self._pairs) if p == q], 2)
            cross = torch.stack([second[:, :, j] for j, (p, q) in enumerate(self._pairs) if p != q], 2) if d > 1 else None
            frob = diag.square().sum(2) + (2 * cross.square().sum(2) if cross is not None else 0)
            feats += [first.square().sum(2).add(1e-12).sqrt(), diag.sum(2), frob.add(1e-12).sqrt()]
        return torch.cat(feats, 1)

    def extra_repr(self) -> str:
        return f"spatial_dims={self.spatial_dims}, in_channels={self.in_channels}, scales={self.scales}"
