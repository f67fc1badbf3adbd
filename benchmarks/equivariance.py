"""Equivariance error of single convolution layers under arbitrary rotations.

For angles 0..90 degrees, the relative error ``|conv(rot(x)) - rot(conv(x))| / |rot(conv(x))|``
inside the central disc (so that no pixel rotated in from outside the image counts), on a
smooth random image, for GMRConv (``profile`` radius/index/area), hard rings
(``sigma="none"``), GMRConv plus oriented ring energies (``OrientedGMRConv``), the authors'
``GMR_Conv2d`` when installed, and a dense random kernel.
Run with ``gmrpath benchmark equivariance``.

Example:
    >>> import torch
    >>> from benchmarks.equivariance import rotation_error, smooth_image
    >>> from gmr_models import GMRConv
    >>> x = smooth_image(1, 2, 33)
    >>> rotation_error(GMRConv(2, 2, 2, 5).double(), x, 90.0) < 1e-12
    True
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gmr_models import GMRConv
from gmr_models.layers.oriented import OrientedGMRConv

from .conv import reference_conv

__all__ = ["smooth_image", "rotate", "rotation_error", "run_equivariance_benchmark", "plot_equivariance"]


def smooth_image(n: int, c: int, size: int, blur_sigma: float = 2.0, seed: int = 0) -> Tensor:
    """Gaussian-blurred white noise, unit standard deviation, float64.

    Shape:
        ``(n, c, size, size)``.
    """
    gen = torch.Generator().manual_seed(seed)
    half = int(3 * blur_sigma)
    t = torch.arange(-half, half + 1, dtype=torch.float64)
    g = torch.exp(-0.5 * (t / blur_sigma) ** 2)
    g = g / g.sum()
    noise = torch.randn(n * c, 1, size + 2 * half, size + 2 * half, generator=gen, dtype=torch.float64)
    img = F.conv2d(F.conv2d(noise, g.view(1, 1, 1, -1)), g.view(1, 1, -1, 1)).view(n, c, size, size)
    return img / img.std()


def rotate(x: Tensor, angle_deg: float) -> Tensor:
    """Rotate the image counter-clockwise about its centre (bilinear, zeros outside).

    Shape:
        ``(N, C, H, W) -> (N, C, H, W)``.
    """
    a = math.radians(angle_deg)
    theta = torch.tensor([[math.cos(a), -math.sin(a), 0.0], [math.sin(a), math.cos(a), 0.0]], dtype=x.dtype)
    grid = F.affine_grid(theta.expand(x.shape[0], 2, 3), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def _disc(size: int, radius: float, dtype) -> Tensor:
    c = (size - 1) / 2.0
    yy, xx = torch.meshgrid(torch.arange(size, dtype=dtype), torch.arange(size, dtype=dtype), indexing="ij")
    return (((yy - c) ** 2 + (xx - c) ** 2) <= radius**2).to(dtype)


def rotation_error(conv: nn.Module, x: Tensor, angle_deg: float, margin: int = 12) -> float:
    """Relative equivariance error of ``conv`` at ``angle_deg`` inside the central disc of
    radius ``size/2 - margin``."""
    with torch.no_grad():
        a = conv(rotate(x, angle_deg))
        b = rotate(conv(x), angle_deg)
    mask = _disc(x.shape[-1], x.shape[-1] / 2.0 - margin, x.dtype)
    return float(((a - b) * mask).norm() / (b * mask).norm())


def _variants(cin: int, cout: int, k: int) -> dict[str, nn.Module]:
    mods: dict[str, nn.Module] = {
        "gmr_radius": GMRConv(2, cin, cout, k, bias=False),
        "gmr_area": GMRConv(2, cin, cout, k, bias=False, profile="area"),
        "gmr_index": GMRConv(2, cin, cout, k, bias=False, profile="index"),
        "hard_rings": GMRConv(2, cin, cout, k, bias=False, sigma="none"),
        "gmr_oriented": OrientedGMRConv(2, cin, cout, k, bias=False),
        "dense": nn.Conv2d(cin, cout, k, padding=k // 2, bias=False),
    }
    ref = reference_conv(cin, cout, k)
    if ref is not None:
        mods["gmr_conv_pkg"] = ref.eval()
    return mods


def run_equivariance_benchmark(
    kernel_sizes: Sequence[int] = (3, 5, 7, 9, 11),
    angles: Sequence[float] = tuple(range(0, 95, 5)),
    size: int = 97,
    channels: int = 8,
    seeds: int = 3,
    progress=None,
    variants: Sequence[str] = (),
) -> dict:
    """Mean (over ``seeds`` weight draws) rotation error per variant (``variants``: only these), kernel size and angle.

    Returns:
        ``{"angles": [...], "curves": {variant: {k: [error per angle]}}, "mean_off_grid": {variant: {k: e}}}``
        where ``mean_off_grid`` averages the angles that are not multiples of 90 degrees.
    """
    x = smooth_image(1, channels, size)
    curves: dict[str, dict[int, list[float]]] = {}
    for k in kernel_sizes:
        sums: dict[str, list[float]] = {}
        for seed in range(seeds):
            torch.manual_seed(seed)
            for name, conv in _variants(channels, channels, k).items():
                if variants and name not in variants:
                    continue
                conv = conv.double().eval()
                errs = [rotation_error(conv, x, a) for a in angles]
                acc = sums.setdefault(name, [0.0] * len(angles))
                sums[name] = [s + e / seeds for s, e in zip(acc, errs)]
        for name, errs in sums.items():
            curves.setdefault(name, {})[k] = errs
        if progress is not None:
            progress(k)
    off = [i for i, a in enumerate(angles) if a % 90 != 0]
    mean_off = {n: {k: sum(c[i] for i in off) / max(len(off), 1) for k, c in per_k.items()} for n, per_k in curves.items()}
    return {
        "benchmark": "equivariance",
        "angles": list(angles),
        "size": size,
        "channels": channels,
        "seeds": seeds,
        "curves": curves,
        "mean_off_grid": mean_off,
    }


def plot_equivariance(result: dict, path: Path) -> Path:
    """Two panels: error against angle at the largest k, and mean off-grid error against k."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    k_show = max(next(iter(result["curves"].values())))
    for name, per_k in result["curves"].items():
        left.plot(result["angles"], per_k[k_show], marker=".", label=name)
        ks = sorted(per_k)
        right.plot(ks, [result["mean_off_grid"][name][k] for k in ks], marker="o", label=name)
    left.set(xlabel="rotation angle (degrees)", ylabel="relative error (central disc)", yscale="log", title=f"k = {k_show}")
    right.set(xlabel="kernel size k", ylabel="mean error, angles not multiples of 90", yscale="log", title="by kernel size")
    left.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)
    return path
