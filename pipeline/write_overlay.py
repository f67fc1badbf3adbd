"""Write: a PNG of the slide thumbnail with the class map (or nuclei) overlaid, and a legend.

Example:
    >>> import numpy as np
    >>> path = write_overlay(np.full((40, 30, 3), 230, np.uint8), np.zeros((4, 3), np.int64), ["a"], [(255, 0, 0)],
    ...                      "/tmp/overlay_doc.png", title="demo")
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import numpy as np

__all__ = ["class_colors", "write_overlay"]

_PALETTE = [
    (255, 215, 0), (200, 200, 200), (140, 86, 75), (31, 119, 180), (148, 103, 189),
    (255, 127, 14), (44, 160, 44), (227, 119, 194), (214, 39, 40), (23, 190, 207),
]


def class_colors(classes: Sequence[str]) -> list[tuple[int, int, int]]:
    """A stable colour per class (tumour red where a class is called TUM/tumour)."""
    colors = []
    for i, name in enumerate(classes):
        colors.append((214, 39, 40) if name.lower() in ("tum", "tumour", "tumor") else _PALETTE[i % len(_PALETTE)])
    return colors


def write_overlay(thumbnail: np.ndarray, label_map: np.ndarray, classes: Sequence[str], colors: Sequence[Sequence[int]],
                  path: str | Path, confidence: Optional[np.ndarray] = None, title: str = "") -> Path:
    """Blend ``label_map`` (0 = nothing, i = class i-1), resized to the thumbnail, over it.

    Args:
        thumbnail: ``(H, W, 3)`` uint8.
        label_map: ``(h, w)`` integer map covering the same field of view.
        confidence: optional ``(h, w)`` in [0, 1] scaling the overlay's opacity.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch
    from PIL import Image

    h, w = thumbnail.shape[:2]
    lut = np.array([(0, 0, 0)] + [tuple(c[:3]) for c in colors], np.uint8)
    rgb = lut[np.clip(label_map, 0, len(lut) - 1)]
    alpha = (label_map > 0).astype(np.float32) * 0.45
    if confidence is not None:
        alpha *= 0.4 + 0.6 * np.clip(confidence, 0, 1)
    rgb = np.asarray(Image.fromarray(rgb).resize((w, h), Image.NEAREST), np.float32)
    alpha = np.asarray(Image.fromarray(alpha).resize((w, h), Image.NEAREST), np.float32)[..., None]
    blended = (thumbnail.astype(np.float32) * (1 - alpha) + rgb * alpha).astype(np.uint8)
    fig_w = 8.0
    fig, ax = plt.subplots(figsize=(fig_w, fig_w * h / w * 0.8 + 0.6))
    ax.imshow(blended)
    ax.set_axis_off()
    if title:
        ax.set_title(title, fontsize=9)
    present = sorted(set(np.unique(label_map).tolist()) - {0})
    handles = [Patch(color=np.array(colors[v - 1][:3]) / 255, label=classes[v - 1]) for v in present]
    if handles:
        ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
    fig.tight_layout()
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(path)
    return path
