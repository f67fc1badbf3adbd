"""The geometry of a GMR kernel: where its rings sit, and what the ring path costs.

:func:`ring_geometry` gives every kernel pixel's distance from the centre (optionally
supersampled), its hard ring, and the ring centres ``mu_i = i * Delta`` of the paper's
equation; :data:`RING_COST` is the cost model ``impl="auto"`` decides with.

Example:
    >>> radius, index, mu, delta = ring_geometry(3, 2, 2)
    >>> index.tolist()
    [1, 1, 1, 1, 0, 1, 1, 1, 1]
"""

from __future__ import annotations

import itertools
import math

import torch

__all__ = ["ring_geometry", "RING_COST", "PROFILES", "SIGMA_MODES", "IMPLS", "PADDING_MODES"]

PROFILES = ("radius", "index", "area")
SIGMA_MODES = ("layer", "channel", "fixed", "none")
IMPLS = ("auto", "dense", "rings")
BASIS_NORMS = ("none", "unit")
PADDING_MODES = ("zeros", "reflect", "replicate", "circular")
FWHM_PER_SIGMA = 2.0 * math.sqrt(2.0 * math.log(2.0))  # 2.3548...
AREA_SUPERSAMPLE = 4  # samples per pixel and axis for profile="area"

# Cost model of the ring path relative to a dense convolution, per device type and mode, in units
# of one dense multiply-add per output pixel: (depthwise multiply-add, 1x1-mix multiply-add, one
# ring-response channel written and read back). Training on CPU: (6, 1, 0), read off
# `gmrpath benchmark conv` on a 2-core x86 CPU (128 channels, 64^2) and checked on gmr_resnet18 with
# `gmrpath benchmark network`. Inference on CPU: a least-squares fit of 70 random layer shapes
# (16-128 channels, k 3-9, 2-5 rings, 64^2-582^2 pixels) timed on the same machine; the memory
# term is what sends small-channel layers on large blocks (the nuclei U-Net) to dense, where the
# ring responses cost more to move than the dense multiply-adds they save. Checked with
# `gmrpath benchmark impl` (100 shapes of the same ranges): auto within 5% of the faster path for
# 89, worst 2.2x (16 channels, 9x9, which it sends to dense). Devices without an entry (CUDA) take
# the dense path: on an NVIDIA H200 (torch 2.11, cuDNN) the paper's gmr_resnet18 (base 64, 24 x 224^2)
# ran inference in 15.2 ms dense against 194 ms on rings (`gmrpath benchmark network --device cuda`)
# and a training step in 33.8 against 216.7 ms (`gmrpath benchmark train --options
# default,dense_path,ring_path --options-size 64,224,24`); over `gmrpath benchmark impl`'s 100 shapes
# dense was within 5% of the faster path for 85, and rings won only on layers under 0.3 ms.
RING_COST = {"cpu": {"inference": (2.0, 1.8, 120.0), "training": (6.0, 1.0, 0.0)}}


def ring_geometry(kernel_size: int, spatial_dims: int, num_rings: int, supersample: int = 1):
    """Distances, hard-ring indices and ring centres of a ``kernel_size**spatial_dims`` kernel.

    Args:
        kernel_size: odd kernel size ``k``.
        spatial_dims: 1, 2 or 3.
        num_rings: number of rings ``n``.
        supersample: sample points per pixel and axis (1 = pixel centres).

    Returns:
        ``(radius, index, mu, delta)``: ``radius`` (S, P) float64 distances of the ``S``
        sample points of each of the ``P = k**d`` pixels; ``index`` (P,) int64 hard ring of
        each pixel (ring edges ``linspace(0, k/2, n+1)``, -1 beyond the last edge); ``mu``
        (n,) ring centres; ``delta`` their spacing.

    Shape:
        radius: (S, P) with S = supersample**spatial_dims, P = kernel_size**spatial_dims.

    Example:
        >>> radius, index, mu, delta = ring_geometry(5, 2, 3)
        >>> radius.shape, mu.tolist(), delta
        (torch.Size([1, 25]), [0.0, 1.25, 2.5], 1.25)
    """
    half = kernel_size // 2
    cpu = torch.device("cpu")  # geometry is exact host arithmetic, whatever the default device (meta included)
    centres = torch.arange(-half, half + 1, dtype=torch.float64, device=cpu)
    grid = torch.stack(torch.meshgrid(*([centres] * spatial_dims), indexing="ij"), dim=-1)
    grid = grid.reshape(-1, spatial_dims)  # (P, d)
    sub = (torch.arange(supersample, dtype=torch.float64, device=cpu) + 0.5) / supersample - 0.5
    offsets = torch.tensor(list(itertools.product(sub.tolist(), repeat=spatial_dims)), dtype=torch.float64, device=cpu)
    radius = (grid[None] + offsets[:, None]).square().sum(-1).sqrt()  # (S, P)
    centre_r = grid.square().sum(-1).sqrt()
    edges = torch.linspace(0.0, kernel_size / 2.0, num_rings + 1, dtype=torch.float64, device=cpu)
    index = torch.bucketize(centre_r, edges[1:], right=True)
    index[index >= num_rings] = -1
    delta = kernel_size / (2.0 * (num_rings - 1)) if num_rings > 1 else kernel_size / 2.0
    mu = torch.arange(num_rings, dtype=torch.float64, device=cpu) * delta
    return radius, index, mu, delta
