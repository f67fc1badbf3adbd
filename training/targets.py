"""Training targets for nuclei: rotation-invariant scalar maps from an instance mask.

Two maps, both turning with the image (so a GMR U-Net can predict them exactly
equivariantly): the foreground, and each nucleus's Euclidean distance to its own border,
divided by its own maximum (1 at the centre of every nucleus, large or small). HoVer-Net's
horizontal/vertical maps or StarDist's rays would turn *and change value* under rotation.

Example:
    >>> import numpy as np
    >>> lab = np.zeros((9, 9), np.int32); lab[2:7, 2:7] = 1
    >>> fg, dist = nuclei_targets(lab)
    >>> float(fg.sum()), float(dist.max()), float(dist[0, 0])
    (25.0, 1.0, 0.0)
"""

from __future__ import annotations

import numpy as np

__all__ = ["nuclei_targets", "resize_labels"]


def nuclei_targets(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Foreground and per-nucleus normalised distance maps.

    Shape:
        ``(H, W)`` int instance mask -> two ``(H, W)`` float32 maps in [0, 1].
    """
    from scipy import ndimage

    labels = np.asarray(labels)
    fg = (labels > 0).astype(np.float32)
    dist = np.zeros(labels.shape, np.float32)
    for value, sl in enumerate(ndimage.find_objects(labels), start=1):
        if sl is None:
            continue
        sl = tuple(slice(max(s.start - 1, 0), s.stop + 1) for s in sl)
        inside = labels[sl] == value
        d = ndimage.distance_transform_edt(np.pad(inside, 1))[1:-1, 1:-1]
        peak = d[inside].max()
        dist[sl][inside] = (d[inside] / peak).astype(np.float32)
    return fg, dist


def resize_labels(labels: np.ndarray, size_hw: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize of an instance mask (labels are never blended).

    Shape:
        ``(H, W) -> size_hw``.
    """
    import cv2

    h, w = size_hw
    if labels.shape == (h, w):
        return labels
    return cv2.resize(labels.astype(np.int32), (w, h), interpolation=cv2.INTER_NEAREST)
