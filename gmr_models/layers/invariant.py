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
        # derivative order along each axis of every response: the d first derivatives, then the Hessian's pairs
        self._orders = [tuple(int(a == axis) for a in range(d)) for axis in range(d)]
        self._orders += [tuple(int(a == p) + int(a == q) for a in range(d)) for p, q in pairs]
        self._norms: list[list[float]] = []
        for i, s in enumerate(self.scales):
            g = _gaussian_derivatives(s)
            norm = [s ** sum(o) for o in self._orders]  # scale normalisation: s per derivative
            kernels = [self._separable([g[k] for k in o]) * n for o, n in zip(self._orders, norm)]
            bank = torch.stack(kernels)[:, None].repeat(in_channels, 1, *([1] * d))  # (C * n_k, 1, *k): the naive path
            self.register_buffer(f"bank{i}", bank.to(torch.get_default_dtype()), persistent=False)
            self.register_buffer(f"factors{i}", torch.stack(g).to(torch.get_default_dtype()), persistent=False)
            self._norms.append(norm)
        self._n_first, self._pairs = d, pairs

    @staticmethod
    def _separable(factors: list[Tensor]) -> Tensor:
        out = factors[0]
        for f in factors[1:]:
            out = out[..., None] * f
        return out

    def responses(self, x: Tensor, i: int, separable: bool = True) -> Tensor:
        """The Gaussian-derivative responses at scale ``i``: ``separable`` runs one 1D convolution per
        axis (``d * (2r + 1)`` taps); otherwise the full ``(2r + 1)^d`` kernels (the naive path, for tests).

        Shape:
            ``(N, C, *S) -> (N, C, K, *S)``, ``K = d + d (d + 1) / 2``.
        """
        n, c, d = x.shape[0], self.in_channels, self.spatial_dims
        if not separable:
            bank = getattr(self, f"bank{i}").to(x.dtype)
            return CONV_FUNCTIONS[d](x, bank, padding=bank.shape[-1] // 2, groups=c).view(n, c, -1, *x.shape[2:])
        g = getattr(self, f"factors{i}").to(x.dtype)  # (3, L): order 0, 1, 2
        r = g.shape[-1] // 2
        outs = []
        for orders, norm in zip(self._orders, self._norms[i]):
            y = x
            for axis, order in enumerate(orders):
                shape = [1] * d
                shape[axis] = g.shape[-1]
                pad = [0] * d
                pad[axis] = r
                weight = g[order].reshape(1, 1, *shape).expand(c, 1, *shape)
                y = CONV_FUNCTIONS[d](y, weight, padding=tuple(pad), groups=c)
            outs.append(y * norm)
        return torch.stack(outs, 2)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != self.spatial_dims + 2 or x.shape[1] != self.in_channels:
            raise ValueError(f"expected (N, {self.in_channels}, *spatial) with {self.spatial_dims} spatial dims, got {tuple(x.shape)}")
        feats = [x]
        for i in range(len(self.scales)):
            y = self.responses(x, i)
            first, second = y[:, :, : self._n_first], y[:, :, self._n_first:]
            diag = torch.stack([second[:, :, j] for j, (p, q) in enumerate(self._pairs) if p == q], 2)
            cross = torch.stack([second[:, :, j] for j, (p, q) in enumerate(self._pairs) if p != q], 2) if self.spatial_dims > 1 else None
            frob = diag.square().sum(2) + (2 * cross.square().sum(2) if cross is not None else 0)
            feats += [first.square().sum(2).add(1e-12).sqrt(), diag.sum(2), frob.add(1e-12).sqrt()]
        return torch.cat(feats, 1)

    def extra_repr(self) -> str:
        return f"spatial_dims={self.spatial_dims}, in_channels={self.in_channels}, scales={self.scales}"
