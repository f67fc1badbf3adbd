"""Tissue: a tissue mask from a low-resolution rendering of the slide.

Tissue is what is both coloured and darker than the glass: Otsu's threshold on the HSV
saturation, dust and specks removed by size, holes filled, gaps closed. The thumbnail is read
block by block so memory stays bounded for single-level slides too.

Example:
    >>> from pipeline.read import open_slide
    >>> slide = open_slide("data/demo/CMU-1-Small-Region.svs")
    >>> mask = detect_tissue(slide, mask_mpp=8.0)
    >>> mask.dtype, bool(0 < mask.mean() < 1)
    (dtype('bool'), True)
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from .outputs import atomic_path
from .read import Slide, SlideError, read_region

__all__ = ["NoTissueError", "render_thumbnail", "detect_tissue", "save_mask_png", "mask_png_meta"]

BLOCK_PX = 512  # thumbnail pixels read per block: bounds the memory of a read


class NoTissueError(SlideError):
    """The tissue mask of a slide is empty."""


def render_thumbnail(slide: Slide, mpp: float) -> np.ndarray:
    """The whole slide at ``mpp`` (coarser than level 0), read in blocks.

    Shape:
        ``(ceil(H0 * slide.mpp / mpp), ceil(W0 * slide.mpp / mpp), 3)`` uint8.
    """
    w0, h0 = slide.dimensions
    f = mpp / slide.mpp  # level-0 pixels per thumbnail pixel
    width, height = max(1, math.ceil(w0 / f)), max(1, math.ceil(h0 / f))
    out = np.empty((height, width, 3), np.uint8)
    for ty in range(0, height, BLOCK_PX):
        for tx in range(0, width, BLOCK_PX):
            bw, bh = min(BLOCK_PX, width - tx), min(BLOCK_PX, height - ty)
            out[ty : ty + bh, tx : tx + bw] = read_region(slide, (round(tx * f), round(ty * f)), (bw, bh), mpp)
    return out


def detect_tissue(slide: Slide, mask_mpp: float = 8.0, min_object_um2: float = 5000.0, thumbnail=None) -> np.ndarray:
    """Boolean tissue mask at ``mask_mpp``.

    Raises:
        NoTissueError: nothing in the slide looks like tissue.
    """
    from skimage import color, filters, morphology
    from scipy import ndimage

    rgb = render_thumbnail(slide, mask_mpp) if thumbnail is None else thumbnail
    hsv = color.rgb2hsv(rgb)
    sat, val = hsv[..., 1], hsv[..., 2]
    if float(sat.max() - sat.min()) < 0.05:
        raise NoTissueError(f"{slide.path}: no tissue found (the slide is uniformly coloured at {mask_mpp} mpp)")
    thr = max(filters.threshold_otsu(sat), 0.05)
    mask = (sat > thr) & (val < 0.98)
    radius = max(1, round(8.0 / mask_mpp))  # close gaps of about 8 um
    mask = ndimage.binary_closing(mask, morphology.disk(radius), border_value=0)
    mask = ndimage.binary_fill_holes(mask)
    min_px = max(1, int(min_object_um2 / mask_mpp**2))
    mask = morphology.remove_small_objects(mask, max_size=min_px)
    if not mask.any():
        raise NoTissueError(f"{slide.path}: no tissue found (no piece larger than {min_object_um2:g} um^2 at {mask_mpp} mpp)")
    return mask


def save_mask_png(mask: np.ndarray, path: str | Path, meta: dict | None = None) -> Path:
    """Write a 0/255 PNG atomically; ``meta`` goes into a ``gmrpath`` text chunk (see :func:`mask_png_meta`)."""
    import json

    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    path = Path(path)
    info = PngInfo()
    if meta is not None:
        info.add_text("gmrpath", json.dumps(meta, sort_keys=True))
    with atomic_path(path, ".png") as tmp:  # unique per process: parallel stages may write it
        Image.fromarray(mask.astype(np.uint8) * 255).save(tmp, pnginfo=info)
    return path


def mask_png_meta(path: str | Path) -> dict | None:
    """The ``meta`` a mask PNG was saved with, or None."""
    import json

    from PIL import Image

    try:
        with Image.open(path) as im:
            text = im.text.get("gmrpath")
        return json.loads(text) if text else None
    except (OSError, ValueError):
        return None
