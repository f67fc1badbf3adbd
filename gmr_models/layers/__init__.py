"""Layers: :class:`GMRConv` and the per-dimension layer factory."""

from .factories import layer_type
from .gmr_conv import GMRConv, GMRConv1d, GMRConv2d, GMRConv3d, freeze_kernels, ring_geometry

__all__ = ["GMRConv", "GMRConv1d", "GMRConv2d", "GMRConv3d", "freeze_kernels", "layer_type", "ring_geometry"]
