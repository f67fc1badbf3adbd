"""Building blocks shared by the GMR networks: conv-norm-act units that keep symmetry.

Every block uses stride-1 convolutions with symmetric "same" padding; downsampling is
average pooling (exactly equivariant to 90-degree rotations and flips when the input size
is divisible by the pooling factor), channel changes are 1x1 convolutions.

Example:
    >>> import torch
    >>> from gmr_models.blocks import conv_layer
    >>> conv_layer("gmr", 2, 3, 8, 5)(torch.randn(1, 3, 16, 16)).shape
    torch.Size([1, 8, 16, 16])
"""

from __future__ import annotations

from typing import Optional, Sequence

from torch import Tensor, nn

from .layers import GMRConv, layer_type
from .layers.oriented import OrientedGMRConv
from .layers.factories import check_spatial_dims

__all__ = ["CONV_TYPES", "conv_layer", "ConvNormAct", "check_kernel_sizes"]

CONV_TYPES = ("gmr", "conv")


def check_kernel_sizes(kernel_sizes: Sequence[int], stages: int) -> tuple[int, ...]:
    """Validate one odd kernel size per stage."""
    sizes = tuple(kernel_sizes)
    if len(sizes) != stages or any(not isinstance(k, int) or k < 1 or k % 2 == 0 for k in sizes):
        raise ValueError(f"kernel_sizes must be {stages} odd positive ints (one per stage), got {kernel_sizes!r}")
    return sizes


def conv_layer(
    conv_type: str,
    spatial_dims: int,
    in_channels: int,
    out_channels: int,
    kernel_size: int,
    bias: bool = False,
    gmr_kwargs: Optional[dict] = None,
) -> nn.Module:
    """A stride-1 "same" convolution: :class:`GMRConv` (``conv_type="gmr"``, with the extra
    ``gmr_kwargs`` such as ``num_rings`` or ``sigma``; with ``orders`` (and optionally ``multiplier``, ``reduction``)
    an :class:`~gmr_models.layers.oriented.OrientedGMRConv`, which adds invariant oriented energies)
    or the torch convolution of the same size (``"conv"``, the non-equivariant baseline, which
    ignores ``gmr_kwargs``)."""
    if conv_type not in CONV_TYPES:
        raise ValueError(f"conv_type must be one of {CONV_TYPES}, got {conv_type!r}")
    if conv_type == "gmr" and kernel_size > 1:
        kwargs = dict(gmr_kwargs or {})
        if {"orders", "multiplier", "reduction"} & set(kwargs):
            return OrientedGMRConv(spatial_dims, in_channels, out_channels, kernel_size, bias=bias, **kwargs)
        return GMRConv(spatial_dims, in_channels, out_channels, kernel_size, bias=bias, **kwargs)
    conv = layer_type("conv", spatial_dims)
    return conv(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=bias)


class ConvNormAct(nn.Sequential):
    """Convolution, normalisation (``"batch"`` or ``"instance"``) and optional ReLU.

    Shape:
        ``(N, in_channels, *S) -> (N, out_channels, *S)``.
    """

    def __init__(
        self,
        conv_type: str,
        spatial_dims: int,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        norm: str = "batch",
        act: bool = True,
        gmr_kwargs: Optional[dict] = None,
    ) -> None:
        spatial_dims = check_spatial_dims(spatial_dims)
        if norm not in ("batch", "instance"):
            raise ValueError(f"norm must be 'batch' or 'instance', got {norm!r}")
        layers: list[nn.Module] = [
            conv_layer(conv_type, spatial_dims, in_channels, out_channels, kernel_size, gmr_kwargs=gmr_kwargs),
            layer_type(norm, spatial_dims)(out_channels, affine=True),
        ]
        if act:
            layers.append(nn.ReLU(inplace=True))
        super().__init__(*layers)

    def forward(self, x: Tensor) -> Tensor:  # noqa: D102 (nn.Sequential's)
        return super().forward(x)
