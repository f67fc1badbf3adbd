"""GMR U-Net for dense prediction (nuclei segmentation), 1D/2D/3D, and its baseline.

Encoder: per level two k x k conv-norm-ReLU units; between levels 2x average pooling.
Decoder: nearest-neighbour 2x upsampling (no strided transposed convolution, which breaks
symmetry), a 1x1 convolution, concatenation with the skip, two k x k units. With
``conv_type="gmr"`` and input sides divisible by ``2**(levels-1)`` the output map is exactly
equivariant to 90-degree rotations and flips.

Example:
    >>> import torch
    >>> from gmr_models import create_model
    >>> net = create_model("gmr_unet", out_channels=2, base_channels=4, kernel_sizes=(5, 5, 3, 3)).eval()
    >>> net(torch.randn(1, 3, 32, 32)).shape
    torch.Size([1, 2, 32, 32])
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from torch import Tensor, nn

from .blocks import ConvNormAct, check_kernel_sizes
from .layers import layer_type
from .layers.invariant import InvariantFeatures
from .layers.factories import check_spatial_dims
from .registry import register_model

__all__ = ["UNet"]


class _DoubleConv(nn.Sequential):
    def __init__(
        self, conv_type: str, spatial_dims: int, in_channels: int, out_channels: int, k: int, norm: str, gmr_kwargs: dict
    ):
        super().__init__(
            ConvNormAct(conv_type, spatial_dims, in_channels, out_channels, k, norm, gmr_kwargs=gmr_kwargs),
            ConvNormAct(conv_type, spatial_dims, out_channels, out_channels, k, norm, gmr_kwargs=gmr_kwargs),
        )


class UNet(nn.Module):
    """U-Net with GMR (or ordinary) convolutions.

    Args:
        spatial_dims: 1, 2 or 3.
        in_channels: input channels.
        out_channels: output channels (logits, e.g. 1 for a nuclei probability map).
        base_channels: channels of the first level; doubled at every level.
        kernel_sizes: kernel size per level; its length is the number of levels.
        conv_type: ``"gmr"`` or ``"conv"`` (baseline).
        norm: ``"batch"`` or ``"instance"``.
        num_rings: GMR rings per level (default ``k // 2 + 1``; up to ``k``: more rings give the
            radial profile more freedom at no inference cost, the kernel is built once).
        gmr_kwargs: further :class:`~gmr_models.layers.GMRConv` arguments for every GMR layer,
            e.g. ``{"sigma": "channel"}``. Both are ignored by ``conv_type="conv"``.
        invariant_scales: Gaussian scales (pixels) of an
            :class:`~gmr_models.layers.invariant.InvariantFeatures` stem that adds rotation-invariant
            gradient, Laplacian and Hessian-norm features of the input (``None``: no stem).

    Shape:
        ``(N, in_channels, *S) -> (N, out_channels, *S)`` with every side of ``S`` divisible
        by ``2 ** (len(kernel_sizes) - 1)``.
    """

    def __init__(
        self,
        spatial_dims: int = 2,
        in_channels: int = 3,
        out_channels: int = 1,
        base_channels: int = 32,
        kernel_sizes: Sequence[int] = (9, 9, 5, 5),
        conv_type: str = "gmr",
        norm: str = "batch",
        num_rings: Optional[Sequence[int]] = None,
        gmr_kwargs: Optional[dict] = None,
        invariant_scales: Optional[Sequence[float]] = None,
    ) -> None:
        super().__init__()
        spatial_dims = check_spatial_dims(spatial_dims)
        if not 1 <= len(tuple(kernel_sizes)) <= 6:
            raise ValueError(f"kernel_sizes must give 1 to 6 levels, got {kernel_sizes!r}")
        kernel_sizes = check_kernel_sizes(kernel_sizes, len(tuple(kernel_sizes)))
        for name, value in (("in_channels", in_channels), ("out_channels", out_channels), ("base_channels", base_channels)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if num_rings is not None and (
            isinstance(num_rings, (str, int)) or len(tuple(num_rings)) != len(kernel_sizes)
        ):
            raise ValueError(f"num_rings must give one int per level ({len(kernel_sizes)}), got {num_rings!r}")
        if gmr_kwargs is not None and not isinstance(gmr_kwargs, dict):
            raise ValueError(f"gmr_kwargs must be a dict of GMRConv arguments, got {gmr_kwargs!r}")
        if gmr_kwargs and "num_rings" in gmr_kwargs:
            raise ValueError("give num_rings per level through UNet(num_rings=...), not in gmr_kwargs")
        rings = tuple(num_rings) if num_rings is not None else (None,) * len(kernel_sizes)
        per_level = [{**(gmr_kwargs or {}), **({} if n is None else {"num_rings": n})} for n in rings]
        self.spatial_dims, self.levels, self.conv_type = spatial_dims, len(kernel_sizes), conv_type
        self.size_multiple = 2 ** (self.levels - 1)  # input sides must be multiples (pooling)
        conv1x1 = layer_type("conv", spatial_dims)
        widths = [base_channels * 2**i for i in range(self.levels)]
        self.down = nn.ModuleList()
        self.stem = None if invariant_scales is None else InvariantFeatures(spatial_dims, in_channels, invariant_scales)
        c_in = in_channels if self.stem is None else self.stem.out_channels
        for width, k, gmr in zip(widths, kernel_sizes, per_level):
            self.down.append(_DoubleConv(conv_type, spatial_dims, c_in, width, k, norm, gmr))
            c_in = width
        self.pool = layer_type("avgpool", spatial_dims)(2)
        self.reduce = nn.ModuleList()
        self.up = nn.ModuleList()
        for level in range(self.levels - 2, -1, -1):
            self.reduce.append(conv1x1(widths[level + 1], widths[level], 1))
            self.up.append(
                _DoubleConv(
                    conv_type, spatial_dims, 2 * widths[level], widths[level], kernel_sizes[level], norm, per_level[level]
                )
            )
        self.head = conv1x1(widths[0], out_channels, 1)
        self.kernel_sizes = tuple(kernel_sizes)

    @property
    def receptive_radius_px(self) -> int:
        """How far (input pixels) an output pixel can see: every k x k conv at level ``l`` adds
        ``(k - 1) / 2 * 2**l``, every pooling and upsampling step ``2**l``. A region segmented with
        a margin this wide gives the same values in its interior as the whole image would."""
        r = 0 if self.stem is None else max(1, math.ceil(3 * max(self.stem.scales)))
        for level, k in enumerate(self.kernel_sizes):
            twice = 2 if level == self.levels - 1 else 4  # two convs down, two more up (not at the bottom)
            r += twice * (k - 1) // 2 * 2**level
            if level < self.levels - 1:
                r += 2 * 2**level
        return r

    def forward(self, x: Tensor) -> Tensor:
        factor = self.size_multiple
        if x.dim() != self.spatial_dims + 2 or any(s % factor for s in x.shape[2:]):
            raise ValueError(
                f"expected input (N, C, *spatial) with {self.spatial_dims} spatial sides divisible by {factor}, "
                f"got shape {tuple(x.shape)}"
            )
        skips = []
        if self.stem is not None:
            x = self.stem(x)
        for level, block in enumerate(self.down):
            x = block(x if level == 0 else self.pool(x))
            skips.append(x)
        x = skips.pop()
        for reduce, block in zip(self.reduce, self.up):
            x = reduce(torch.nn.functional.interpolate(x, scale_factor=2, mode="nearest"))
            x = block(torch.cat([x, skips.pop()], dim=1))
        return self.head(x)


@register_model
def gmr_unet(**kwargs) -> UNet:
    """GMR U-Net (rotation- and flip-equivariant segmentation)."""
    return UNet(conv_type="gmr", **kwargs)


@register_model
def unet(**kwargs) -> UNet:
    """The same U-Net with ordinary convolutions (baseline; not equivariant)."""
    return UNet(conv_type="conv", **kwargs)
