"""GMR-ResNet classifiers (1D/2D/3D) and their ordinary-convolution baselines.

The architecture follows the paper's equivariant design (Du et al., 2025, Sec. S3):
stride-1 convolutions only, downsampling by average pooling followed by 1x1 convolutions,
global average pooling before the linear classifier. With ``conv_type="gmr"`` and an input
size divisible by 16 the logits are invariant to every 90-degree rotation and flip.

Example:
    >>> import torch
    >>> from gmr_models import create_model
    >>> net = create_model("gmr_resnet18", num_classes=9, base_channels=8).eval()
    >>> net(torch.randn(2, 3, 32, 32)).shape
    torch.Size([2, 9])
"""

from __future__ import annotations

from typing import Optional, Sequence

from torch import Tensor, nn

from .blocks import ConvNormAct, check_kernel_sizes
from .layers import layer_type
from .layers.factories import check_spatial_dims
from .layers.invariant import InvariantFeatures
from .registry import register_model

__all__ = ["ResNet", "BasicBlock", "Bottleneck"]


class _Shortcut(nn.Sequential):
    """Identity, or 1x1 conv + norm when the channel count changes."""

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int, norm: str) -> None:
        layers = []
        if in_channels != out_channels:
            layers = [
                layer_type("conv", spatial_dims)(in_channels, out_channels, 1, bias=False),
                layer_type(norm, spatial_dims)(out_channels, affine=True),
            ]
        super().__init__(*layers)


class BasicBlock(nn.Module):
    """Two k x k conv-norm units with a residual connection (ResNet-18/34).

    Shape:
        ``(N, in_channels, *S) -> (N, channels, *S)``.
    """

    expansion = 1

    def __init__(self, conv_type: str, spatial_dims: int, in_channels: int, channels: int, kernel_size: int, norm: str,
                 gmr_kwargs: Optional[dict] = None):
        super().__init__()
        self.body = nn.Sequential(
            ConvNormAct(conv_type, spatial_dims, in_channels, channels, kernel_size, norm, gmr_kwargs=gmr_kwargs),
            ConvNormAct(conv_type, spatial_dims, channels, channels, kernel_size, norm, act=False, gmr_kwargs=gmr_kwargs),
        )
        self.shortcut = _Shortcut(spatial_dims, in_channels, channels, norm)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.body(x) + self.shortcut(x))


class Bottleneck(nn.Module):
    """1x1 reduce, k x k, 1x1 expand (x4) with a residual connection (ResNet-50).

    Shape:
        ``(N, in_channels, *S) -> (N, 4 * channels, *S)``.
    """

    expansion = 4

    def __init__(self, conv_type: str, spatial_dims: int, in_channels: int, channels: int, kernel_size: int, norm: str,
                 gmr_kwargs: Optional[dict] = None):
        super().__init__()
        out = channels * self.expansion
        self.body = nn.Sequential(
            ConvNormAct("conv", spatial_dims, in_channels, channels, 1, norm),
            ConvNormAct(conv_type, spatial_dims, channels, channels, kernel_size, norm, gmr_kwargs=gmr_kwargs),
            ConvNormAct("conv", spatial_dims, channels, out, 1, norm, act=False),
        )
        self.shortcut = _Shortcut(spatial_dims, in_channels, out, norm)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.body(x) + self.shortcut(x))


class ResNet(nn.Module):
    """Residual classifier with GMR (or ordinary) convolutions, for 1D, 2D or 3D input.

    Args:
        block: ``"basic"`` or ``"bottleneck"``.
        layers: blocks per stage (4 stages).
        spatial_dims: 1, 2 or 3.
        in_channels: input channels (3 for RGB tiles).
        num_classes: output logits (9 for NCT-CRC, 2 for PCam).
        base_channels: channels of the stem and the first stage; doubled every stage.
        kernel_sizes: kernel size of each stage's k x k convolutions (the stem uses the first).
        conv_type: ``"gmr"`` (equivariant) or ``"conv"`` (ordinary baseline).
        norm: ``"batch"`` or ``"instance"``.
        dropout: dropout before the classifier.
        gmr_kwargs: further :class:`~gmr_models.layers.GMRConv` arguments for every GMR layer
            (``{"orders": [1, 2]}``: oriented ring energies, :mod:`gmr_models.layers.oriented`).
        invariant_scales: Gaussian scales (pixels) of an
            :class:`~gmr_models.layers.invariant.InvariantFeatures` stem (``None``: none).

    Shape:
        ``(N, in_channels, *S) -> (N, num_classes)``; every side of ``S`` divisible by 16
        keeps the logits exactly invariant (the stem and stages 2-4 halve the size).
    """

    def __init__(
        self,
        block: str = "basic",
        layers: Sequence[int] = (2, 2, 2, 2),
        spatial_dims: int = 2,
        in_channels: int = 3,
        num_classes: int = 9,
        base_channels: int = 64,
        kernel_sizes: Sequence[int] = (9, 9, 5, 5),
        conv_type: str = "gmr",
        norm: str = "batch",
        dropout: float = 0.0,
        gmr_kwargs: Optional[dict] = None,
        invariant_scales: Optional[Sequence[float]] = None,
    ) -> None:
        super().__init__()
        spatial_dims = check_spatial_dims(spatial_dims)
        blocks = {"basic": BasicBlock, "bottleneck": Bottleneck}
        if block not in blocks:
            raise ValueError(f"block must be 'basic' or 'bottleneck', got {block!r}")
        if len(layers) != 4 or any(not isinstance(n, int) or n < 1 for n in layers):
            raise ValueError(f"layers must be 4 positive ints, got {layers!r}")
        kernel_sizes = check_kernel_sizes(kernel_sizes, 4)
        for name, value in (("in_channels", in_channels), ("num_classes", num_classes), ("base_channels", base_channels)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        block_cls = blocks[block]
        pool = layer_type("avgpool", spatial_dims)
        self.spatial_dims, self.num_classes, self.conv_type = spatial_dims, num_classes, conv_type
        self.size_multiple = 16  # input sides divisible by this keep GMR logits exactly D4-invariant
        if gmr_kwargs is not None and not isinstance(gmr_kwargs, dict):
            raise ValueError(f"gmr_kwargs must be a dict of GMRConv arguments, got {gmr_kwargs!r}")
        features = [] if invariant_scales is None else [InvariantFeatures(spatial_dims, in_channels, invariant_scales)]
        c_stem = in_channels if not features else features[0].out_channels
        self.stem = nn.Sequential(
            *features, ConvNormAct(conv_type, spatial_dims, c_stem, base_channels, kernel_sizes[0], norm, gmr_kwargs=gmr_kwargs),
            pool(2),
        )
        stages, channels_in = [], base_channels
        for stage, (n_blocks, k) in enumerate(zip(layers, kernel_sizes)):
            channels = base_channels * 2**stage
            units: list[nn.Module] = [pool(2)] if stage > 0 else []
            for _ in range(n_blocks):
                units.append(block_cls(conv_type, spatial_dims, channels_in, channels, k, norm, gmr_kwargs))
                channels_in = channels * block_cls.expansion
            stages.append(nn.Sequential(*units))
        self.stages = nn.Sequential(*stages)
        self.head = nn.Sequential(
            layer_type("adaptiveavgpool", spatial_dims)(1), nn.Flatten(1), nn.Dropout(dropout), nn.Linear(channels_in, num_classes)
        )
        self.num_features = channels_in

    def forward_features(self, x: Tensor) -> Tensor:
        """Feature map before global pooling. Shape: ``(N, num_features, *S/16)``."""
        return self.stages(self.stem(x))

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != self.spatial_dims + 2:
            raise ValueError(f"expected a {self.spatial_dims + 2}D input (N, C, *spatial), got shape {tuple(x.shape)}")
        return self.head(self.forward_features(x))


def _resnet(block: str, layers: Sequence[int], conv_type: str, **kwargs) -> ResNet:
    return ResNet(block=block, layers=layers, conv_type=conv_type, **kwargs)


@register_model
def gmr_resnet18(**kwargs) -> ResNet:
    """GMR-ResNet-18 (paper kernels [9, 9, 5, 5]); rotation- and flip-invariant logits."""
    return _resnet("basic", (2, 2, 2, 2), "gmr", **kwargs)


@register_model
def gmr_resnet50(**kwargs) -> ResNet:
    """GMR-ResNet-50 with bottleneck blocks; the k x k middle convolution of each block is GMR."""
    return _resnet("bottleneck", (3, 4, 6, 3), "gmr", **kwargs)


@register_model
def resnet18(**kwargs) -> ResNet:
    """The same ResNet-18 with ordinary convolutions (baseline; not invariant)."""
    return _resnet("basic", (2, 2, 2, 2), "conv", **kwargs)


@register_model
def resnet50(**kwargs) -> ResNet:
    """The same ResNet-50 with ordinary convolutions (baseline; not invariant)."""
    return _resnet("bottleneck", (3, 4, 6, 3), "conv", **kwargs)
