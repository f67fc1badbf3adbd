"""GMR-Path models: the GMRConv layer and rotation-equivariant networks built from it.

Example:
    >>> from gmr_models import GMRConv, create_model, list_models
    >>> model = create_model("gmr_resnet18", num_classes=9)
"""

from .layers import GMRConv, GMRConv1d, GMRConv2d, GMRConv3d, freeze_kernels
from .registry import create_model, list_models, register_model
from . import resnet, unet  # noqa: F401  (register the entry points)

__all__ = ["GMRConv", "GMRConv1d", "GMRConv2d", "GMRConv3d", "freeze_kernels", "create_model", "list_models", "register_model"]
