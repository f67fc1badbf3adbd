"""Layer factories: one name and a ``spatial_dims`` pick the 1D/2D/3D torch type.

MONAI's ``monai.networks.layers.factories`` does the same job, but importing it pulls in
all of ``monai.networks`` (23 s here, measured with ``python -X importtime``), so the
model package keeps this small torch-only table and stays quick to import.

Example:
    >>> from gmr_models.layers.factories import layer_type
    >>> layer_type("avgpool", 3)
    <class 'torch.nn.modules.pooling.AvgPool3d'>
"""

from __future__ import annotations

from typing import Callable

import torch.nn.functional as F
from torch import nn

__all__ = ["CONV_FUNCTIONS", "layer_type", "check_spatial_dims", "single_int"]

CONV_FUNCTIONS: dict[int, Callable] = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}

_LAYERS: dict[str, tuple[type[nn.Module], type[nn.Module], type[nn.Module]]] = {
    "conv": (nn.Conv1d, nn.Conv2d, nn.Conv3d),
    "avgpool": (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d),
    "adaptiveavgpool": (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d),
    "batch": (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d),
    "instance": (nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d),
}


def check_spatial_dims(spatial_dims: int) -> int:
    """Return ``spatial_dims`` if it is 1, 2 or 3, else raise ValueError."""
    if isinstance(spatial_dims, bool) or spatial_dims not in (1, 2, 3):
        raise ValueError(f"spatial_dims must be 1, 2 or 3, got {spatial_dims!r}")
    return int(spatial_dims)


def layer_type(name: str, spatial_dims: int) -> type[nn.Module]:
    """The torch layer class called ``name`` for ``spatial_dims`` (1, 2 or 3).

    Args:
        name: one of ``conv``, ``avgpool``, ``adaptiveavgpool``, ``batch``, ``instance``.
        spatial_dims: number of spatial dimensions.

    Raises:
        ValueError: for an unknown name or spatial_dims outside 1..3.
    """
    key = name.lower()
    if key not in _LAYERS:
        raise ValueError(f"unknown layer type {name!r}; choose one of {sorted(_LAYERS)}")
    return _LAYERS[key][check_spatial_dims(spatial_dims) - 1]


def single_int(name: str, value) -> int:
    """Accept an int, or a tuple of equal ints (the kernel is isotropic)."""
    if isinstance(value, (tuple, list)):
        if len(set(value)) != 1:
            raise ValueError(f"{name} must be the same along every axis (GMR kernels are isotropic), got {value!r}")
        value = value[0]
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an int, got {value!r}")
    return value
