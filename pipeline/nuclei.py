"""Nuclei inference, one path for slides, crops and dataset images.

``gmrpath segment``, training validation and ``gmrpath evaluate`` all run these functions, so
the numbers evaluation reports are the numbers of what ``segment`` writes. An image at the
model's resolution is cut into square blocks of ``block_px``; each block is read with a margin
(the network's receptive radius) on every side, the part of the margin beyond the image is
filled by reflecting the image (a crop's edge is not white paper), the network runs once on
the window, instances come from the maps of the whole window (marker watershed, see
:mod:`pipeline.instances`) and the block's core is kept. A nucleus's id is ``1 + y * width + x``
of its centroid pixel, so two blocks that see a nucleus on their shared edge give it one id.

Coordinates in this module are pixels at the model's resolution (``model_mpp``); ``f`` is the
number of level-0 pixels per model pixel.

Example:
    >>> import numpy as np
    >>> from gmr_models import create_model
    >>> net = create_model("gmr_unet", spatial_dims=2, in_channels=3, out_channels=2, base_channels=4).eval()
    >>> image = np.full((40, 50, 3), 200, np.uint8)
    >>> labels = segment_image(net, (0.5,) * 3, (0.5,) * 3, image, image_mpp=0.5, model_mpp=0.5)
    >>> labels.shape, labels.dtype
    ((40, 50), dtype('uint64'))
"""

from __future__ import annotations

import math
from typing import Callable, Iterator, Optional, Sequence

import numpy as np

from .instances import PostProcess
from .read import Slide, read_region, slide_from_array

__all__ = ["margin_px", "block_origins", "block_tissue", "read_block", "block_maps", "block_probability", "block_instances", "segment_block",
           "image_block_maps", "labels_from_block_maps", "probability_from_block_maps", "segment_image", "labels_to_native"]


def margin_px(module, overlap_px: int = 0) -> int:
    """The block margin: the network's receptive radius (or ``overlap_px`` when larger)."""
    return max(int(getattr(module, "receptive_radius_px", 0)), int(overlap_px))


def model_extent(slide: Slide, model_mpp: float) -> tuple[int, int, float]:
    """``(width, height, f)``: the slide's size in model pixels and level-0 pixels per model pixel."""
    f = model_mpp / slide.mpp
    w0, h0 = slide.dimensions
    return math.ceil(w0 / f), math.ceil(h0 / f), f


def block_origins(width: int, height: int, block_px: int) -> list[tuple[int, int]]:
    """Top-left ``(x, y)`` of every block, row by row; block ``k`` of this list has chunk id ``k``."""
    return [(x, y) for y in range(0, height, block_px) for x in range(0, width, block_px)]


def block_tissue(mask: np.ndarray, origin_xy: tuple[int, int], block_px: int, px_per_mask_px: float) -> np.ndarray:
    """The tissue-mask pixels under the block at ``origin_xy`` (model pixels); never empty: a thin last
    block may start inside the mask's last pixel.

    Shape:
        mask ``(Hm, Wm)`` bool -> ``(h, w)`` bool, h, w >= 1.
    """
    x0, y0 = origin_xy
    my, mx = mask.shape[0] - 1, mask.shape[1] - 1
    return mask[min(int(y0 / px_per_mask_px), my): math.ceil((y0 + block_px) / px_per_mask_px),
                min(int(x0 / px_per_mask_px), mx): math.ceil((x0 + block_px) / px_per_mask_px)]


def read_block(slide: Slide, origin_xy: tuple[int, int], size_wh: tuple[int, int], margin: int, model_mpp: float) -> np.ndarray:
    """A block with ``margin`` pixels around it; beyond the image the image is reflected.

    Shape:
        returns ``(h + 2 * margin, w + 2 * margin, 3)`` uint8.
    """
    width, height, f = model_extent(slide, model_mpp)
    (x0, y0), (w, h) = origin_xy, size_wh
    xs, ys = max(x0 - margin, 0), max(y0 - margin, 0)
    xe, ye = min(x0 + w + margin, width), min(y0 + h + margin, height)
    region = read_region(slide, (round(xs * f), round(ys * f)), (xe - xs, ye - ys), model_mpp)
    pads = ((ys - (y0 - margin), (y0 + h + margin) - ye), (xs - (x0 - margin), (x0 + w + margin) - xe), (0, 0))
    if not any(p for pair in pads for p in pair):
        return region
    mode = "reflect" if min(region.shape[:2]) > 1 else "edge"
    return np.pad(region, pads, mode=mode)


def block_maps(module, mean, std, window: np.ndarray, device, amp: bool = True, tta: str = "none") -> np.ndarray:
    """The network's maps of one window (one forward pass, see :func:`pipeline.infer.segment_maps`).

    Shape:
        ``(H, W, 3)`` uint8 -> ``(C, H, W)`` float32.
    """
    import torch

    from .infer import segment_maps

    return segment_maps(module, torch.from_numpy(np.ascontiguousarray(window)), mean, std, device, amp=amp, tta=tta)


def block_probability(maps: np.ndarray, margin: int, core_hw: tuple[int, int]) -> np.ndarray:
    """The foreground probability of a window's core, x255 as the OME-Zarr stores it.

    Shape:
        maps ``(C, h + 2m, w + 2m)`` -> ``(h, w)`` uint8.
    """
    h, w = core_hw
    return np.round(maps[0, margin: margin + h, margin: margin + w] * 255).astype(np.uint8)


def block_instances(maps: np.ndarray, post: PostProcess, margin: int, core_hw: tuple[int, int], origin_xy: tuple[int, int],
                    width: int, mpp: Optional[float] = None) -> np.ndarray:
    """Instances of a window read with ``margin``, cropped to its core, with global centroid ids.

    Shape:
        maps ``(C, h + 2m, w + 2m)`` -> ``(h, w)`` uint64 (0 = background).
    """
    from scipy import ndimage

    from .instances import instances_from_maps

    labels = instances_from_maps(maps[0], maps[1] if len(maps) > 1 else None, post, mpp)
    n = int(labels.max())
    h, w = core_hw
    if n == 0:
        return np.zeros((h, w), np.uint64)
    index = np.arange(1, n + 1)
    cy, cx = (np.asarray(c) for c in zip(*ndimage.center_of_mass(np.ones_like(labels), labels, index)))
    gy = np.clip(np.round(cy).astype(np.int64) + origin_xy[1] - margin, 0, None)
    gx = np.clip(np.round(cx).astype(np.int64) + origin_xy[0] - margin, 0, width - 1)
    lut = np.zeros(n + 1, np.uint64)
    lut[1:] = (gy * width + gx + 1).astype(np.uint64)
    return lut[labels[margin: margin + h, margin: margin + w]]


def segment_block(module, mean, std, slide: Slide, origin_xy: tuple[int, int], size_wh: tuple[int, int], margin: int,
                  model_mpp: float, post: PostProcess, device, amp: bool = True, tta: str = "none",
                  stain: Optional[Callable[[np.ndarray], np.ndarray]] = None) -> tuple[np.ndarray, np.ndarray]:
    """Probability (x255) and instance ids of one block: what ``gmrpath segment`` writes for it.
    ``stain`` maps the window's colours first (:func:`pipeline.stain.stain_mapper`).

    Shape:
        returns ``(h, w)`` uint8 and ``(h, w)`` uint64.
    """
    (x0, y0), (w, h) = origin_xy, size_wh
    window = read_block(slide, origin_xy, size_wh, margin, model_mpp)
    maps = block_maps(module, mean, std, window if stain is None else stain(window), device, amp, tta)
    width, _, _ = model_extent(slide, model_mpp)
    return block_probability(maps, margin, (h, w)), block_instances(maps, post, margin, (h, w), (x0, y0), width, model_mpp)


def image_block_maps(module, mean, std, image: np.ndarray, image_mpp: float, model_mpp: float, device, amp: bool = True,
                     tta: str = "none", block_px: int = 1024, margin: Optional[int] = None,
                     stain_target: Optional[dict] = None, stain_source: Optional[dict] = None) -> Iterator[tuple]:
    """``(origin_xy, size_wh, maps)`` of every block of an in-memory image, read as a slide is
    (with ``stain_target``, its colours mapped onto the target's as a slide's are; from
    ``stain_source``, the image's stain stats, when they were measured already).

    Keep the maps to try several post-processings without running the network again
    (:func:`labels_from_block_maps`).
    """
    from .stain import stain_mapper

    slide = slide_from_array(image, image_mpp)
    stain = stain_mapper(slide, stain_target, model_mpp, stain_source)
    margin = margin_px(module) if margin is None else margin
    width, height, _ = model_extent(slide, model_mpp)
    for x0, y0 in block_origins(width, height, block_px):
        size = (min(block_px, width - x0), min(block_px, height - y0))
        window = read_block(slide, (x0, y0), size, margin, model_mpp)
        yield (x0, y0), size, block_maps(module, mean, std, window if stain is None else stain(window), device, amp, tta)


def _assemble(blocks: Sequence[tuple], dtype, core) -> np.ndarray:
    """The whole image from :func:`image_block_maps`' blocks, each block's core from ``core(maps, (h, w), (x0, y0), width)``."""
    width = max(x + w for (x, _), (w, _), _ in blocks)
    height = max(y + h for (_, y), (_, h), _ in blocks)
    out = np.zeros((height, width), dtype)
    for (x0, y0), (w, h), maps in blocks:
        out[y0: y0 + h, x0: x0 + w] = core(maps, (h, w), (x0, y0), width)
    return out


def labels_from_block_maps(blocks: Sequence[tuple], post: PostProcess, margin: int, mpp: Optional[float] = None) -> np.ndarray:
    """The instance image (model pixels) assembled from :func:`image_block_maps`' blocks
    (``mpp``: the model's, needed by a density rule, see :mod:`pipeline.instances`).

    Shape:
        returns ``(height, width)`` uint64.
    """
    return _assemble(blocks, np.uint64, lambda maps, hw, xy, width: block_instances(maps, post, margin, hw, xy, width, mpp))


def probability_from_block_maps(blocks: Sequence[tuple], margin: int) -> np.ndarray:
    """The foreground probability image (model pixels, x255) assembled from :func:`image_block_maps`' blocks.

    Shape:
        returns ``(height, width)`` uint8.
    """
    return _assemble(blocks, np.uint8, lambda maps, hw, xy, width: block_probability(maps, margin, hw))


def segment_image(module, mean, std, image: np.ndarray, image_mpp: float, model_mpp: float,
                  post: PostProcess = PostProcess(), device=None, amp: bool = True, tta: str = "none", block_px: int = 1024,
                  margin: Optional[int] = None, stain_target: Optional[dict] = None) -> np.ndarray:
    """Nuclei of an in-memory image, exactly as ``gmrpath segment`` finds them in the same image
    saved as a file (same blocks, margin, reflection, maps and post-processing).

    Shape:
        ``(H, W, 3)`` uint8 at ``image_mpp`` -> ``(h, w)`` uint64 ids at ``model_mpp``.
    """
    import torch

    device = torch.device("cpu") if device is None else device
    margin = margin_px(module) if margin is None else margin
    blocks = list(image_block_maps(module, mean, std, image, image_mpp, model_mpp, device, amp, tta, block_px, margin,
                                   stain_target))
    return labels_from_block_maps(blocks, post, margin, model_mpp)


def labels_to_native(labels: np.ndarray, native_hw: tuple[int, int], f: float) -> np.ndarray:
    """Model-pixel labels on the native pixel grid: native pixel ``(y, x)`` takes model pixel
    ``(floor(y / f), floor(x / f))``, the geometry of the GeoJSON polygons (scaled by ``f``).

    Shape:
        ``(h, w)`` -> ``native_hw``.
    """
    rows = np.minimum((np.arange(native_hw[0]) / f).astype(np.int64), labels.shape[0] - 1)
    cols = np.minimum((np.arange(native_hw[1]) / f).astype(np.int64), labels.shape[1] - 1)
    return labels[rows][:, cols]
