"""Nuclei instances from a segmentation network's rotation-invariant output maps.

A GMR network is equivariant only for *scalar* maps, so the nuclei model predicts two of
them: the foreground probability and each nucleus's normalised distance to its own border
(1 at its centre, 0 at its edge and outside). Touching nuclei are separated by a marker
watershed: markers are the distance map's regional maxima at least ``marker_h`` high (its
h-maxima: scale-free, so small and large nuclei alike get one marker each), flooded over
``-distance`` inside the foreground. Foreground pieces without a marker keep one id each.
Both maps, and so the instances, turn with the image.

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

import numpy as np

__all__ = ["PostProcess", "postprocess_from", "instances_from_maps"]


@dataclass(frozen=True)
class PostProcess:
    """Thresholds that turn the two maps into instances (stored in a trained checkpoint).

    Attributes:
        fg_threshold: foreground probability above which a pixel is nucleus.
        marker_h: a peak of the distance map is a nucleus's marker when it rises at least this
            much above the saddle to any higher peak (h-maxima); lower splits more.
        min_area_px: objects smaller than this (pixels of the map being labelled) are dropped.
    """

    fg_threshold: float = 0.5
    marker_h: float = 0.1
    min_area_px: int = 4

    def __post_init__(self) -> None:
        for name in ("fg_threshold", "marker_h"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < value < 1.0:
                raise ValueError(f"{name} must be a number strictly between 0 and 1, got {value!r}")
        if isinstance(self.min_area_px, bool) or not isinstance(self.min_area_px, int) or self.min_area_px < 0:
            raise ValueError(f"min_area_px must be an int >= 0, got {self.min_area_px!r}")

    def to_dict(self) -> dict:
        return asdict(self)


def postprocess_from(overrides: dict, base: dict | None = None) -> PostProcess:
    """The rule ``base`` (e.g. a checkpoint's) with ``overrides`` over it.

    Raises:
        ValueError: ``overrides`` is not a mapping, names an unknown field, or gives a bad value.
    """
    known = [f.name for f in fields(PostProcess)]
    if not isinstance(overrides, dict):
        raise ValueError(f"must be a mapping of {', '.join(known)}, got {overrides!r}")
    unknown = sorted(set(overrides) - set(known))
    if unknown:
        raise ValueError(f"unknown field(s) {unknown}; known: {', '.join(known)}")
    return PostProcess(**{**(base or {}), **overrides})


def instances_from_maps(fg_prob: np.ndarray, dist: np.ndarray | None = None, post: PostProcess = PostProcess()) -> np.ndarray:
    """Instance labels (0 = background, 1..N) from a foreground and a distance map.

    Args:
        fg_prob: foreground probability, ``(H, W)`` in [0, 1].
        dist: normalised distance to the nucleus border, ``(H, W)`` in [0, 1]; ``None`` falls
            back to connected components of the foreground.
        post: thresholds.

    Shape:
        ``(H, W), (H, W) -> (H, W)`` int32.
    """
    from scipy import ndimage
    from skimage.segmentation import relabel_sequential, watershed

    fg = np.asarray(fg_prob) > post.fg_threshold
    if dist is None:
        labels, _ = ndimage.label(fg)
    else:
        from skimage.morphology import h_maxima

        dist = np.where(fg, np.asarray(dist, dtype=np.float32), 0.0).astype(np.float32)
        markers, n = ndimage.label(h_maxima(dist, post.marker_h).astype(bool) & fg)
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

