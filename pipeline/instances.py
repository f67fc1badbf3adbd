"""Nuclei instances from a segmentation network's rotation-invariant output maps.

A GMR network is equivariant only for *scalar* maps, so the nuclei model predicts two of
them: the foreground probability and each nucleus's normalised distance to its own border
(1 at its centre, 0 at its edge and outside). Touching nuclei are separated by a marker
watershed: markers are the distance map's regional maxima at least ``marker_h`` high (its
h-maxima: scale-free, so small and large nuclei alike get one marker each), flooded over
``-distance`` inside the foreground. Foreground pieces without a marker keep one id each.
Both maps, and so the instances, turn with the image.

One marker height cannot serve sparse and crowded tissue alike: where nuclei crowd, the
predicted distance dips little between touching nuclei, and a height that splits them
over-splits large nuclei elsewhere. With ``marker_h_dense`` set, the height varies over the
image with the local nuclear density (the markers at ``marker_h``, smoothed by a Gaussian of
``density_sigma_um``): ``marker_h`` where it is at most ``dense_per_mm2[0]`` nuclei per mm²,
``marker_h_dense`` from ``dense_per_mm2[1]`` on, log-linear between (a variable-height
h-maxima transform). The density map is isotropic, so the instances still turn with the image.

Example:
    >>> import numpy as np
    >>> fg = np.zeros((20, 40)); fg[5:15, 3:13] = 1; fg[5:15, 12:22] = 1
    >>> dist = np.zeros_like(fg); dist[8:12, 6:10] = 1; dist[8:12, 15:19] = 1; dist[fg > 0] += 0.2
    >>> labels = instances_from_maps(fg, dist)
    >>> int(labels.max())
    2
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Optional

import numpy as np

__all__ = ["PostProcess", "PostProcessError", "postprocess_from", "instances_from_maps", "marker_heights"]


class PostProcessError(ValueError):
    """A bad post-processing rule; ``field`` names the :class:`PostProcess` field at fault (``None``:
    the rule as a whole), so a command line can name its own option for it."""

    def __init__(self, message: str, field: Optional[str] = None):
        super().__init__(message)
        self.field = field


@dataclass(frozen=True)
class PostProcess:
    """Thresholds that turn the two maps into instances (stored in a trained checkpoint).

    Attributes:
        fg_threshold: foreground probability above which a pixel is nucleus.
        marker_h: a peak of the distance map is a nucleus's marker when it rises at least this
            much above the saddle to any higher peak (h-maxima); lower splits more.
        min_area_px: objects smaller than this (pixels of the map being labelled) are dropped.
        marker_h_dense: the marker height where nuclei crowd (see the module docstring); ``None``
            (the default, and every checkpoint saved before it existed): ``marker_h`` everywhere.
        dense_per_mm2: ``(sparse, dense)`` local nuclear densities (nuclei per mm²) between which
            the height goes from ``marker_h`` to ``marker_h_dense``.
        density_sigma_um: the Gaussian radius (micrometres) over which the density is measured.
    """

    fg_threshold: float = 0.5
    marker_h: float = 0.1
    min_area_px: int = 4
    marker_h_dense: Optional[float] = None
    dense_per_mm2: tuple = (8000.0, 14000.0)
    density_sigma_um: float = 25.0

    def __post_init__(self) -> None:
        def number(value) -> bool:
            return not isinstance(value, bool) and isinstance(value, (int, float))

        for name in ("fg_threshold", "marker_h") + (("marker_h_dense",) if self.marker_h_dense is not None else ()):
            value = getattr(self, name)
            if not number(value) or not 0.0 < value < 1.0:
                raise PostProcessError(f"{name} must be a number strictly between 0 and 1, got {value!r}", name)
        if isinstance(self.min_area_px, bool) or not isinstance(self.min_area_px, int) or self.min_area_px < 0:
            raise PostProcessError(f"min_area_px must be an int >= 0, got {self.min_area_px!r}", "min_area_px")
        d = self.dense_per_mm2
        if not isinstance(d, (tuple, list)) or len(d) != 2 or not all(number(v) for v in d) or not 0 < d[0] < d[1]:
            raise PostProcessError(f"dense_per_mm2 must be two numbers 0 < sparse < dense (nuclei per mm^2), got {d!r}",
                                   "dense_per_mm2")
        object.__setattr__(self, "dense_per_mm2", (float(d[0]), float(d[1])))
        if not number(self.density_sigma_um) or not self.density_sigma_um > 0:
            raise PostProcessError(f"density_sigma_um must be a number > 0, got {self.density_sigma_um!r}", "density_sigma_um")

    def to_dict(self) -> dict:
        return asdict(self)


def postprocess_from(overrides: dict, base: dict | None = None) -> PostProcess:
    """The rule ``base`` (e.g. a checkpoint's) with ``overrides`` over it.

    Raises:
        PostProcessError: ``overrides`` is not a mapping, names an unknown field, or gives a bad value
            (a :class:`ValueError` naming the field at fault).
    """
    known = [f.name for f in fields(PostProcess)]
    if not isinstance(overrides, dict):
        raise PostProcessError(f"must be a mapping of {', '.join(known)}, got {overrides!r}")
    unknown = sorted(set(overrides) - set(known))
    if unknown:
        raise PostProcessError(f"unknown field(s) {unknown}; known: {', '.join(known)}")
    return PostProcess(**{**(base or {}), **overrides})


def marker_heights(dist: np.ndarray, post: PostProcess, mpp: float, sparse_peaks: Optional[np.ndarray] = None) -> np.ndarray:
    """The marker height at every pixel under ``post``'s density rule (see the module docstring).

    Args:
        dist: the distance map, already zero outside the foreground.
        mpp: micrometres per pixel of the maps.
        sparse_peaks: ``dist``'s h-maxima at ``post.marker_h`` when already computed.

    Shape:
        ``(H, W) -> (H, W)`` float64.
    """
    from scipy import ndimage
    from skimage.morphology import h_maxima

    if sparse_peaks is None:
        sparse_peaks = h_maxima(dist, post.marker_h).astype(bool)
    peaks, n = ndimage.label(sparse_peaks)
    weight = np.zeros(dist.shape, np.float64)
    if n:
        sizes = np.bincount(peaks.ravel())
        weight = np.where(peaks > 0, 1.0 / sizes[peaks], 0.0)  # each marker counts once, however wide
    density = ndimage.gaussian_filter(weight, post.density_sigma_um / mpp, mode="reflect") / (mpp * 1e-3) ** 2
    lo, hi = np.log(post.dense_per_mm2[0]), np.log(post.dense_per_mm2[1])
    t = np.clip((np.log(np.maximum(density, 1e-9)) - lo) / (hi - lo), 0.0, 1.0)
    # rounded, so that float noise of the filter's axis order cannot move a marker under a rotation
    return np.round(post.marker_h + t * (post.marker_h_dense - post.marker_h), 6)


def _variable_h_maxima(image: np.ndarray, h: np.ndarray) -> np.ndarray:
    """:func:`skimage.morphology.h_maxima` with a height per pixel (the same transform, Soille ch. 6)."""
    from skimage.morphology import reconstruction

    image = image.astype(np.float64)
    if np.all(h > np.ptp(image)):
        return np.zeros(image.shape, bool)
    shifted = image - h - 2 * np.finfo(np.float64).resolution * np.abs(image)
    return (image - reconstruction(shifted, image, method="dilation")) >= h


def instances_from_maps(fg_prob: np.ndarray, dist: np.ndarray | None = None, post: PostProcess = PostProcess(),
                        mpp: Optional[float] = None) -> np.ndarray:
    """Instance labels (0 = background, 1..N) from a foreground and a distance map.

    Args:
        fg_prob: foreground probability, ``(H, W)`` in [0, 1].
        dist: normalised distance to the nucleus border, ``(H, W)`` in [0, 1]; ``None`` falls
            back to connected components of the foreground.
        post: thresholds.
        mpp: micrometres per pixel of the maps; needed by a density rule (``post.marker_h_dense``).

    Shape:
        ``(H, W), (H, W) -> (H, W)`` int32.

    Raises:
        ValueError: a density rule without ``mpp``.
    """
    from scipy import ndimage
    from skimage.segmentation import relabel_sequential, watershed

    fg = np.asarray(fg_prob) > post.fg_threshold
    if dist is None:
        labels, _ = ndimage.label(fg)
    else:
        from skimage.morphology import h_maxima

        dist = np.where(fg, np.asarray(dist, dtype=np.float32), 0.0).astype(np.float32)
        if post.marker_h_dense is not None and (mpp is None or not mpp > 0):
            raise ValueError(f"a marker height that follows the nuclear density needs the maps' mpp (> 0), got {mpp!r}")
        peaks = h_maxima(dist, post.marker_h).astype(bool)
        if post.marker_h_dense is not None:
            heights = marker_heights(dist, post, mpp, peaks)
            if np.any(heights != post.marker_h):  # else sparse everywhere: the markers at marker_h, found already
                peaks = _variable_h_maxima(dist, heights)
        markers, n = ndimage.label(peaks & fg)
        labels = watershed(-dist, markers, mask=fg) if n else np.zeros(fg.shape, np.int32)
        orphans, _ = ndimage.label(fg & (labels == 0))  # foreground pieces with no marker
        labels = np.where(orphans > 0, orphans + labels.max(), labels)
    labels = labels.astype(np.int32)
    if post.min_area_px > 0 and labels.max() > 0:
        areas = np.bincount(labels.ravel())
        small = areas < post.min_area_px
        small[0] = False
        labels[small[labels]] = 0
    return relabel_sequential(labels)[0].astype(np.int32)

