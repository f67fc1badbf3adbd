"""Model registry: networks are created by name, as in timm.

Entry points are plain functions decorated with :func:`register_model` in the module that
defines the architecture (``resnet.py``, ``unet.py``); :func:`create_model` looks them up.

Example:
    >>> from gmr_models import create_model, list_models
    >>> "gmr_resnet18" in list_models()
    True
    >>> model = create_model("gmr_resnet18", spatial_dims=2, in_channels=3, num_classes=9)
"""

from __future__ import annotations

import fnmatch
from typing import Callable

from torch import nn

__all__ = ["register_model", "create_model", "list_models", "model_entrypoint"]

_ENTRYPOINTS: dict[str, Callable[..., nn.Module]] = {}


def register_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Register ``fn`` under its ``__name__``; a second registration of a name is an error."""
    name = fn.__name__
    if name in _ENTRYPOINTS and _ENTRYPOINTS[name] is not fn:
        raise ValueError(f"a model called {name!r} is already registered")
    _ENTRYPOINTS[name] = fn
    return fn


def list_models(pattern: str = "*") -> list[str]:
    """Sorted names of the registered models matching the shell-style ``pattern``."""
    return sorted(n for n in _ENTRYPOINTS if fnmatch.fnmatch(n, pattern))


def model_entrypoint(name: str) -> Callable[..., nn.Module]:
    """The function that builds model ``name``; ValueError listing the known names otherwise."""
    if name not in _ENTRYPOINTS:
        raise ValueError(f"unknown model {name!r}; registered models: {', '.join(list_models())}")
    return _ENTRYPOINTS[name]


def create_model(name: str, **kwargs) -> nn.Module:
    """Build the registered model ``name`` with ``kwargs`` (``spatial_dims``, ``in_channels``,
    ``num_classes`` or ``out_channels``, ``base_channels``, ``kernel_sizes``, ...).

    Raises:
        ValueError: for an unknown name or arguments the architecture rejects.
    """
    return model_entrypoint(name)(**kwargs)
