"""The rotation protocol for nuclei: a dataset image segmented upright or rotated, by the same
code path as ``gmrpath segment`` (:func:`pipeline.nuclei.segment_image`), and scored on the
image's own pixel grid.

An image is rotated about its centre (multiples of 90 degrees: an exact pixel permutation),
segmented exactly as ``gmrpath segment`` would segment it saved as a file at its resolution,
the instance ids put back on the native pixel grid (the geometry of the GeoJSON polygons) and
rotated back. Rotated scores are taken inside the central disc, inside the image at every
angle. Post-processing thresholds can be tuned on validation images without running the
network again for each setting.

Example::

    labels, valid = evaluate_nuclei_image(module, sample, model_mpp=0.5, device=torch.device("cpu"),
                                          post=PostProcess(), angle=30)
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import numpy as np

from pipeline.instances import PostProcess
from pipeline.nuclei import image_block_maps, labels_from_block_maps, labels_to_native, margin_px, probability_from_block_maps

__all__ = ["rotate_image", "central_disc", "upright_stain_stats", "nuclei_block_maps", "native_labels", "evaluate_nuclei_image", "nuclei_probability",
           "tune_postprocess", "postprocess_grid", "TUNE_FG", "TUNE_H"]

MEAN, STD = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
TUNE_FG = (0.4, 0.5, 0.6)
TUNE_H = (0.02, 0.05, 0.1, 0.15, 0.2, 0.3)


def rotate_image(image: np.ndarray, angle: float, nearest: bool = False, border: str = "reflect") -> np.ndarray:
    """An image (or map, or label image with ``nearest``) rotated by ``angle`` degrees
    counter-clockwise about its centre; multiples of 90 are exact pixel permutations.

    Args:
        border: how pixels from outside are filled: ``reflect``, ``replicate`` or ``constant`` (0).

    Shape:
        ``(H, W[, C]) -> (H, W[, C])``.
    """
    import cv2

    a = angle % 360
    if a % 90 == 0:
        return np.ascontiguousarray(np.rot90(image, int(a // 90)))
    h, w = image.shape[:2]
    m = cv2.getRotationMatrix2D(((w - 1) / 2, (h - 1) / 2), a, 1.0)
    borders = {"reflect": cv2.BORDER_REFLECT_101, "replicate": cv2.BORDER_REPLICATE, "constant": cv2.BORDER_CONSTANT}
    src = image.astype(np.float32) if image.dtype not in (np.uint8, np.float32) else image
    out = cv2.warpAffine(src, m, (w, h), flags=cv2.INTER_NEAREST if nearest else cv2.INTER_LINEAR, borderMode=borders[border])
    return out.astype(image.dtype, copy=False)


def central_disc(shape) -> np.ndarray:
    """The disc inscribed in an image: inside it at every rotation angle."""
    h, w = shape[:2]
    yy, xx = np.mgrid[:h, :w]
    return (yy - (h - 1) / 2) ** 2 + (xx - (w - 1) / 2) ** 2 <= (min(h, w) / 2 - 1) ** 2


def upright_stain_stats(sample, stain_target: Optional[dict], model_mpp: float) -> Optional[dict]:
    """The stain stats of a sample's upright image (None without a target): measure them once per
    image and pass them as ``stain_source``, so every rotated copy is mapped the same way."""
    if not stain_target:
        return None
    from pipeline.read import slide_from_array
    from pipeline.stain import check_stain_target, slide_stain_stats

    return slide_stain_stats(slide_from_array(sample.native_image, sample.native_mpp), check_stain_target(stain_target)["method"],
                             model_mpp)


def nuclei_block_maps(module, sample, model_mpp: float, device, angle: float = 0.0, amp: bool = True,
                      mean=MEAN, std=STD, stain_target: Optional[dict] = None, stain_source: Optional[dict] = None) -> list[tuple]:
    """The network's block maps of one (rotated) sample, as ``gmrpath segment`` computes them. With a
    ``stain_target``, every rotated copy is mapped with the upright image's stain stats
    (``stain_source``, from :func:`upright_stain_stats`; measured here when not given)."""
    if stain_target and stain_source is None:
        stain_source = upright_stain_stats(sample, stain_target, model_mpp)
    img = rotate_image(sample.native_image, angle)
    return list(image_block_maps(module, mean, std, img, sample.native_mpp, model_mpp, device, amp, stain_target=stain_target,
                                 stain_source=stain_source))


def _upright_native(image: np.ndarray, sample, model_mpp: float, angle: float, nearest: bool) -> np.ndarray:
    """A model-pixel map of the sample rotated by ``angle``, put on the native grid and turned back upright."""
    h, w = sample.native_image.shape[:2]
    turned = (angle % 360) % 180 == 90  # a quarter turn swaps the sides; other angles keep the frame
    native = labels_to_native(image, (w, h) if turned else (h, w), model_mpp / sample.native_mpp)
    return native if angle % 360 == 0 else rotate_image(native, -angle, nearest=nearest, border="constant")


def native_labels(blocks: list[tuple], post: PostProcess, module, sample, model_mpp: float, angle: float) -> np.ndarray:
    """Instances of :func:`nuclei_block_maps`' blocks (of the sample rotated by ``angle``) on the
    sample's native pixel grid, turned back upright.

    Shape:
        returns ``(H, W)`` int32 (the sample's native image size).
    """
    from skimage.segmentation import relabel_sequential

    labels = relabel_sequential(labels_from_block_maps(blocks, post, margin_px(module), model_mpp).astype(np.int64))[0].astype(np.int32)
    return _upright_native(labels, sample, model_mpp, angle, nearest=True)


def evaluate_nuclei_image(module, sample, model_mpp: float, device, post: PostProcess, angle: float = 0.0,
                          amp: bool = True, mean=MEAN, std=STD, stain_target: Optional[dict] = None,
                          stain_source: Optional[dict] = None) -> tuple[np.ndarray, np.ndarray]:
    """Instances predicted for one nuclei sample on its native pixel grid, optionally rotated.

    Returns ``(instances, valid)``: ``valid`` is the central disc, inside the image at every
    angle (score there when comparing angles).

    Shape:
        sample image ``(H, W, 3)`` -> ``(H, W)`` int32 labels and ``(H, W)`` bool.
    """
    blocks = nuclei_block_maps(module, sample, model_mpp, device, angle, amp, mean, std, stain_target, stain_source)
    return native_labels(blocks, post, module, sample, model_mpp, angle), central_disc(sample.native_image.shape)


def nuclei_probability(module, sample, model_mpp: float, device, angle: float = 0.0, amp: bool = True,
                       mean=MEAN, std=STD, stain_target: Optional[dict] = None,
                       stain_source: Optional[dict] = None) -> tuple[np.ndarray, np.ndarray]:
    """The foreground probability (x255, as ``gmrpath segment`` writes it) of one (rotated) sample
    on its native pixel grid, rotated back; with the central disc (see :func:`evaluate_nuclei_image`).

    Shape:
        sample image ``(H, W, 3)`` -> ``(H, W)`` uint8 and ``(H, W)`` bool.
    """
    blocks = nuclei_block_maps(module, sample, model_mpp, device, angle, amp, mean, std, stain_target, stain_source)
    prob = probability_from_block_maps(blocks, margin_px(module))
    return _upright_native(prob, sample, model_mpp, angle, nearest=angle % 90 == 0), central_disc(sample.native_image.shape)


def postprocess_grid(module, samples, model_mpp: float, device, amp: bool = True, progress=None,
                     stain_target: Optional[dict] = None, mean=MEAN, std=STD, full: bool = False,
                     maps: Optional[Sequence[list]] = None, base: Optional[PostProcess] = None) -> list[dict]:
    """Mean scores of every ``TUNE_FG`` x ``TUNE_H`` post-processing on ``samples``, upright; the network
    runs once per image. ``full``: Dice, AJI and PQ (a sensitivity table), else AJI only.

    Args:
        base: the rule whose threshold and (sparse-tissue) marker height the grid varies, the rest
            kept (a checkpoint's density rule); default :class:`PostProcess`'s defaults.
        progress: called as ``progress(done, total)`` after each image's maps and each setting.
        maps: each sample's upright block maps (:func:`nuclei_block_maps`) when already computed:
            the network is not run again.
    """
    from gmr_models import freeze_kernels

    from .metrics import aji, segmentation_scores

    freeze_kernels(module.eval())
    total = len(samples) + len(TUNE_FG) * len(TUNE_H)
    if maps is None:
        maps = []
        for s in samples:
            maps.append(nuclei_block_maps(module, s, model_mpp, device, 0.0, amp, mean, std, stain_target=stain_target))
            if progress is not None:
                progress(len(maps), total)
    elif len(maps) != len(samples):
        raise ValueError(f"maps: {len(maps)} block-map lists for {len(samples)} samples")
    rows = []
    for fg in TUNE_FG:
        for h in TUNE_H:
            post = dataclasses.replace(base or PostProcess(), fg_threshold=fg, marker_h=h)
            labels = [(s.native_labels, native_labels(m, post, module, s, model_mpp, 0.0)) for s, m in zip(samples, maps)]
            if full:
                scores = [segmentation_scores(t, p) for t, p in labels]
                row = {k: float(np.mean([sc[k] for sc in scores])) for k in ("dice", "aji", "pq")}
            else:
                row = {"aji": float(np.mean([aji(t, p) for t, p in labels]))}
            rows.append({"fg_threshold": fg, "marker_h": h, **row})
            if progress is not None:
                progress(len(samples) + len(rows), total)
    return rows


def tune_postprocess(module, samples, model_mpp: float, device, amp: bool = True, progress=None,
                     stain_target: Optional[dict] = None) -> tuple[PostProcess, list[dict]]:
    """The foreground threshold and marker height that give the best mean AJI on ``samples``
    (your own validation images: never the images you report as unseen).

    Args:
        progress: called as ``progress(done, total)`` after each image's maps and each setting.
    """
    rows = [{"fg_threshold": r["fg_threshold"], "marker_h": r["marker_h"], "val_aji": r["aji"]}
            for r in postprocess_grid(module, samples, model_mpp, device, amp, progress, stain_target)]
    best = max(rows, key=lambda r: r["val_aji"])
    return PostProcess(fg_threshold=best["fg_threshold"], marker_h=best["marker_h"]), rows
