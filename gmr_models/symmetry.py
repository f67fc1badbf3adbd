"""The symmetries of the pixel/voxel grid: axis permutations combined with axis flips.

In ``d`` spatial dimensions these form the hyperoctahedral group of order ``d! * 2**d``:
2 elements in 1D, 8 in 2D (the dihedral group D4: 4 rotations by 90 degrees, each with or
without a mirror) and 48 in 3D. GMR convolutions commute with every one of them exactly.

Example:
    >>> import torch
    >>> from gmr_models.symmetry import grid_symmetries, apply_symmetry, invert_symmetry
    >>> len(grid_symmetries(2)), len(grid_symmetries(3))
    (8, 48)
    >>> x = torch.randn(1, 1, 4, 5)
    >>> g = grid_symmetries(2)[3]
    >>> torch.equal(invert_symmetry(apply_symmetry(x, g), g), x)
    True
"""

from __future__ import annotations

import itertools
from typing import NamedTuple

from torch import Tensor

__all__ = ["GridSymmetry", "grid_symmetries", "apply_symmetry", "invert_symmetry"]


class GridSymmetry(NamedTuple):
    """Permute the spatial axes by ``perm`` (output axis i takes input axis ``perm[i]``),
    then flip the axes listed in ``flips`` (spatial axis indices, 0-based)."""

    perm: tuple[int, ...]
    flips: tuple[int, ...]


def grid_symmetries(spatial_dims: int) -> list[GridSymmetry]:
    """All ``spatial_dims! * 2**spatial_dims`` symmetries, identity first."""
    axes = range(spatial_dims)
    flip_sets = [tuple(a for a, f in zip(axes, bits) if f) for bits in itertools.product((0, 1), repeat=spatial_dims)]
    return [GridSymmetry(tuple(p), f) for p in itertools.permutations(axes) for f in flip_sets]


def apply_symmetry(x: Tensor, g: GridSymmetry) -> Tensor:
    """Apply ``g`` to the trailing ``len(g.perm)`` (spatial) axes of ``x``.

    Shape:
        ``(..., *S) -> (..., *S permuted by g.perm)``.
    """
    lead = x.dim() - len(g.perm)
    x = x.permute(*range(lead), *(lead + p for p in g.perm))
    return x.flip([lead + a for a in g.flips]) if g.flips else x


def invert_symmetry(x: Tensor, g: GridSymmetry) -> Tensor:
    """Undo :func:`apply_symmetry` (``invert_symmetry(apply_symmetry(x, g), g) == x``)."""
    lead = x.dim() - len(g.perm)
    if g.flips:
        x = x.flip([lead + a for a in g.flips])
    inverse = sorted(range(len(g.perm)), key=lambda i: g.perm[i])
    return x.permute(*range(lead), *(lead + p for p in inverse))
