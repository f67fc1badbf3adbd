"""Stain normalisation: map an image's H&E colours onto a reference's, per image or per slide.

TIAToolbox's normalisers (Macenko, Vahadane, Reinhard) re-estimate the source's stains on every
call. That is right for one crop, wrong for a slide read block by block: a block with little
tissue gives a poor estimate, and neighbouring blocks would get different colours. Here the two
halves are apart:

* :func:`stain_stats` measures an image's stains (TIAToolbox's stain-matrix extractors and
  concentrations, or Reinhard's LAB means and standard deviations), on tissue pixels only;
* :func:`stain_transfer` maps an image with the stats of its source onto a target's.

A checkpoint stores the target's stats (plain lists: ``{"method", "reference", ...}``), measured on
its reference image once at training. At inference each slide's stats are measured once, on a
low-resolution read of the whole slide (:func:`slide_stain_stats`), and every block is mapped
with them, so blocks agree. Training normalises each image with its own stats in the same way.

Example:
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> image = rng.integers(60, 230, (64, 64, 3), dtype=np.uint8)
    >>> target = stain_stats("reinhard", image)
    >>> stain_transfer(image, stain_stats("reinhard", image), target).shape
    (64, 64, 3)
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import numpy as np

from .read import Slide, read_region

__all__ = ["STAIN_METHODS", "stain_stats", "stain_transfer", "check_stain_target", "slide_stain_stats", "stain_mapper",
           "fit_stain_target", "typical_stats", "split_stain_option", "stain_option_target"]

STAIN_METHODS = ("macenko", "vahadane", "reinhard")
TISSUE_LUMINOSITY = 0.8  # pixels darker than this (LAB L / 100) are tissue, TIAToolbox's default
STATS_MAX_PX = 2048  # the long side of the read a slide's stats are measured on


def _tissue(image: np.ndarray) -> np.ndarray:
    """Boolean mask of tissue pixels (luminosity below 0.8); all pixels when under 1% are tissue."""
    import cv2

    lum = cv2.cvtColor(image, cv2.COLOR_RGB2LAB)[..., 0].astype(np.float32) / 255.0
    mask = lum < TISSUE_LUMINOSITY
    return mask if mask.mean() >= 0.01 else np.ones_like(mask)


def _check_image(image: np.ndarray, what: str) -> np.ndarray:
    if not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"{what}: expected an RGB uint8 image (H, W, 3), got "
                         f"{getattr(image, 'shape', type(image))} {getattr(image, 'dtype', '')}".rstrip())
    return image


def stain_stats(method: str, image: np.ndarray) -> dict:
    """The stain statistics of ``image`` for ``method``, as plain JSON values.

    Args:
        method: ``"macenko"``, ``"vahadane"`` or ``"reinhard"``.
        image: RGB uint8.

    Returns:
        ``{"method", "stain_matrix" (2 x 3 optical densities of H and E), "max_concentration" (2)}``
        for Macenko and Vahadane; ``{"method", "means" (3), "stds" (3)}`` of LAB for Reinhard.

    Shape:
        image ``(H, W, 3)``.

    Raises:
        ValueError: unknown method, or an image whose stains cannot be separated (blank or one colour).
    """
    if method not in STAIN_METHODS:
        raise ValueError(f"stain normalisation method must be one of {STAIN_METHODS}, got {method!r}")
    image = _check_image(image, "stain image")
    tissue = _tissue(image)
    if method == "reinhard":
        from tiatoolbox.tools.stainnorm import ReinhardNormalizer

        channels = ReinhardNormalizer.lab_split(image)
        return {"method": method, "means": [float(c[tissue].mean()) for c in channels],
                "stds": [max(float(c[tissue].std()), 1e-3) for c in channels]}
    from tiatoolbox.tools.stainextract import MacenkoExtractor, VahadaneExtractor

    extractor = MacenkoExtractor() if method == "macenko" else VahadaneExtractor()
    try:
        matrix = np.asarray(extractor.get_stain_matrix(image.copy()), np.float64)  # it edits its input in place
    except Exception as err:  # noqa: BLE001 (the extractors raise bare numpy/sklearn errors on blank images)
        raise ValueError(f"cannot separate the stains of this image ({method}): {err}") from err
    if matrix.shape != (2, 3) or not np.isfinite(matrix).all():
        raise ValueError(f"cannot separate the stains of this image ({method}): stain matrix {matrix.tolist()}")
    conc = _concentrations(image[tissue], matrix)
    max_c = np.percentile(conc, 99, axis=0)
    if not np.isfinite(max_c).all() or (max_c <= 0).any():
        raise ValueError(f"cannot separate the stains of this image ({method}): no stain concentration")
    return {"method": method, "stain_matrix": matrix.tolist(), "max_concentration": max_c.tolist()}


def _concentrations(pixels: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    """Least-squares H and E concentrations of RGB pixels ``(..., 3)`` -> ``(P, 2)``."""
    # TIAToolbox's rgb2od, without its in-place edit of the caller's pixels (0 -> 1)
    od = np.maximum(-np.log(np.maximum(pixels.reshape(-1, 3), 1) / 255.0), 1e-6)
    return od @ np.linalg.pinv(matrix)


def check_stain_target(target) -> dict:
    """``target`` if it is a stored stain target (from :func:`fit_stain_target`), else ValueError."""
    if not isinstance(target, dict) or target.get("method") not in STAIN_METHODS:
        raise ValueError(f"stain target must be a mapping with a method in {STAIN_METHODS}, got {target!r}")
    shapes = {"stain_matrix": (2, 3), "max_concentration": (2,)} if target["method"] != "reinhard" else {"means": (3,), "stds": (3,)}
    for key, shape in shapes.items():
        value = np.asarray(target.get(key, []), dtype=np.float64)
        if value.shape != shape or not np.isfinite(value).all():
            raise ValueError(f"stain target {key!r} must be {shape} finite numbers, got {target.get(key)!r}")
    return target


def stain_transfer(image: np.ndarray, source: dict, target: dict) -> np.ndarray:
    """``image`` (whose stains are ``source``) with the colours of ``target``.

    Shape:
        ``(H, W, 3)`` uint8 -> ``(H, W, 3)`` uint8.
    """
    image = _check_image(image, "stain_transfer")
    source, target = check_stain_target(source), check_stain_target(target)
    if source["method"] != target["method"]:
        raise ValueError(f"source stats are {source['method']}, target {target['method']}")
    if target["method"] == "reinhard":
        from tiatoolbox.tools.stainnorm import ReinhardNormalizer

        channels = ReinhardNormalizer.lab_split(image)
        mapped = [(c - m_s) * (s_t / s_s) + m_t for c, m_s, s_s, m_t, s_t in
                  zip(channels, source["means"], source["stds"], target["means"], target["stds"])]
        return ReinhardNormalizer.merge_back(*mapped)
    conc = _concentrations(image, np.asarray(source["stain_matrix"]))
    conc *= np.asarray(target["max_concentration"]) / np.asarray(source["max_concentration"])
    out = 255.0 * np.exp(-conc @ np.asarray(target["stain_matrix"]))
    return np.clip(out, 0, 255).reshape(image.shape).astype(np.uint8)


def fit_stain_target(method: str, reference: str) -> dict:
    """The stored target of a reference image file: its stats plus its file name.

    Raises:
        ValueError: naming the file, if it cannot be read or its stains cannot be separated.
    """
    import cv2

    bgr = cv2.imread(str(reference), cv2.IMREAD_COLOR)
    if bgr is None:
        raise ValueError(f"{reference}: cannot read the stain reference image")
    try:
        stats = stain_stats(method, cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))
    except ValueError as err:
        raise ValueError(f"{reference}: {err}") from None
    from pathlib import Path

    return {**stats, "reference": Path(reference).name}


def split_stain_option(text: str) -> tuple[str, str]:
    """``"METHOD:REFERENCE_IMAGE"`` as ``(method, reference)``; ValueError for any other form."""
    method, sep, reference = str(text).partition(":")
    method = method.strip().lower()
    if not sep or not reference:
        raise ValueError(f"stain normalisation takes 'none' or METHOD:REFERENCE_IMAGE (e.g. macenko:ref.png), got {text!r}")
    if method not in STAIN_METHODS:
        raise ValueError(f"stain normalisation method must be one of {STAIN_METHODS}, got {method!r}")
    return method, reference


def stain_option_target(text: str) -> Optional[dict]:
    """The target a ``--stain-norm`` / ``stain_norm`` option names: None for ``"none"``, else the
    fitted reference (:func:`fit_stain_target`)."""
    if str(text).strip().lower() == "none":
        return None
    return fit_stain_target(*split_stain_option(text))


def typical_stats(stats: dict) -> dict:
    """The stats of the most typical image of a set: the one whose stats are nearest (each number
    scaled by its spread over the set) to the set's median. A reference chosen by rule, not by eye.

    Args:
        stats: name -> that image's :func:`stain_stats` (measured once by the caller, which maps
            every image with them too).

    Returns:
        its stats plus ``"reference"``: its name.

    Example:
        >>> stats = {name: {"method": "reinhard", "means": [l, 0.0, 0.0], "stds": [1.0, 1.0, 1.0]}
        ...          for name, l in (("pale", 90.0), ("usual", 60.0), ("dark", 55.0))}
        >>> typical_stats(stats)["reference"]
        'usual'
    """
    if not stats:
        raise ValueError("no images to choose a stain reference from")
    keys = [k for k in ("stain_matrix", "max_concentration", "means", "stds") if k in next(iter(stats.values()))]
    vectors = np.array([np.concatenate([np.ravel(st[k]) for k in keys]) for st in stats.values()])
    spread = vectors.std(0) + 1e-9
    distance = (np.abs(vectors - np.median(vectors, 0)) / spread).sum(1)
    name = list(stats)[int(np.argmin(distance))]
    return {**stats[name], "reference": name}


def slide_stain_stats(slide: Slide, method: str, fine_mpp: float) -> dict:
    """A slide's stain stats, measured once on a read of the whole slide at most 2048 px long
    (and not finer than ``fine_mpp``), so every block is mapped the same way."""
    w0, h0 = slide.dimensions
    mpp = max(fine_mpp, slide.mpp * max(w0, h0) / STATS_MAX_PX)
    size = (max(1, math.floor(w0 * slide.mpp / mpp)), max(1, math.floor(h0 * slide.mpp / mpp)))
    try:
        return stain_stats(method, read_region(slide, (0, 0), size, mpp))
    except ValueError as err:
        raise ValueError(f"{slide.path}: {err}") from None


def stain_mapper(slide: Slide, target: Optional[dict], fine_mpp: float,
                 source: Optional[dict] = None) -> Optional[Callable[[np.ndarray], np.ndarray]]:
    """The per-block colour map of a slide onto ``target`` (None when there is no target).
    ``source``: the slide's stats when already measured (:func:`slide_stain_stats`), for
    example on the upright image of a rotated copy, so every copy is mapped the same way."""
    if not target:
        return None
    source = source if source is not None else slide_stain_stats(slide, check_stain_target(target)["method"], fine_mpp)
    return lambda window: stain_transfer(window, source, target)
