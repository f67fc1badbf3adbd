"""Write: a PNG of the slide thumbnail with the class map overlaid, the tissue outline, a scale
bar and a legend.

Colours come from the Okabe-Ito palette (distinguishable with the common colour-vision
deficiencies), without its red and magenta hues, which vanish on eosin pink.

Example:
    >>> import numpy as np
    >>> path = write_overlay(np.full((40, 30, 3), 230, np.uint8), np.zeros((4, 3), np.int64), ["a"], [(0, 114, 178)],
    ...                      "/tmp/overlay_doc.png", title="demo", um_per_px=8.0)
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from .outputs import atomic_path

__all__ = ["class_colors", "write_overlay"]

# Okabe & Ito (2008), "Color Universal Design", without its vermillion and reddish purple (lost on
# eosin pink), then grey, a dark brown and a dark teal for more classes (no white: invisible on the
# slide's background and washes tissue out); yellow is kept for tumour. Every colour stays at least
# 20 CIELAB units from white, eosin pink and haematoxylin purple (tested).
_PALETTE = [
    (0, 114, 178), (230, 159, 0), (0, 158, 115), (86, 180, 233), (0, 0, 0),
    (128, 128, 128), (140, 70, 20), (0, 70, 90), (240, 228, 66),
]
_TUMOUR = (240, 228, 66)
_NICE_UM = (10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000)


def class_colors(classes: Sequence[str]) -> list[tuple[int, int, int]]:
    """A stable, colour-blind-safe colour per class (yellow where a class is called TUM/tumour)."""
    others = [c for c in _PALETTE if c != _TUMOUR]
    colors, k = [], 0
    for name in classes:
        if name.lower() in ("tum", "tumour", "tumor"):
            colors.append(_TUMOUR)
        else:
            colors.append(others[k % len(others)])
            k += 1
    return colors


def _scale_bar_um(width_um: float) -> float:
    """The largest round length at most a fifth of the image width."""
    fitting = [v for v in _NICE_UM if v <= width_um / 5]
    return float(fitting[-1] if fitting else _NICE_UM[0])


def write_overlay(thumbnail: np.ndarray, label_map: np.ndarray, classes: Sequence[str], colors: Sequence[Sequence[int]],
                  path: str | Path, confidence: Optional[np.ndarray] = None, title: str = "",
                  um_per_px: Optional[float] = None, tissue: Optional[np.ndarray] = None) -> Path:
    """Blend ``label_map`` (0 = nothing, i = class i-1), resized to the thumbnail, over it.

    Args:
        thumbnail: ``(H, W, 3)`` uint8.
        label_map: ``(h, w)`` integer map covering the same field of view.
        confidence: optional ``(h, w)`` in [0, 1] scaling the overlay's opacity.
        um_per_px: the thumbnail's micrometres per pixel: draws a scale bar.
        tissue: optional ``(H, W)`` tissue mask: its outline is drawn.

    Shape:
        The PNG is drawn at about one figure pixel per thumbnail pixel (at least 1000 px wide).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch
    from mpl_toolkits.axes_grid1.anchored_artists import AnchoredSizeBar
    from PIL import Image

    h, w = thumbnail.shape[:2]
    lut = np.array([(0, 0, 0)] + [tuple(c[:3]) for c in colors], np.uint8)
    rgb = lut[np.clip(label_map, 0, len(lut) - 1)]
    alpha = (label_map > 0).astype(np.float32) * 0.5
    if confidence is not None:
        alpha *= 0.4 + 0.6 * np.clip(confidence, 0, 1)
    rgb = np.asarray(Image.fromarray(rgb).resize((w, h), Image.NEAREST), np.float32)
    alpha = np.asarray(Image.fromarray(alpha).resize((w, h), Image.NEAREST), np.float32)[..., None]
    blended = (thumbnail.astype(np.float32) * (1 - alpha) + rgb * alpha).astype(np.uint8)
    dpi = 100
    fig_w = min(max(w, 1000), 2400) / dpi + 2.0  # room for the legend
    fig, ax = plt.subplots(figsize=(fig_w, (fig_w - 2.0) * h / w + 0.8), dpi=dpi)
    ax.imshow(blended, interpolation="nearest")
    if tissue is not None and tissue.any():
        ax.contour(tissue.astype(np.float32), levels=[0.5], colors=["#000000"], linewidths=1.0)
    if um_per_px:
        length_um = _scale_bar_um(w * um_per_px)
        label = f"{length_um / 1000:g} mm" if length_um >= 1000 else f"{length_um:g} µm"
        ax.add_artist(AnchoredSizeBar(ax.transData, length_um / um_per_px, label, "lower right", pad=0.6, color="black",
                                      frameon=True, size_vertical=max(h / 150, 1), fontproperties={"size": 11}))
    ax.set_axis_off()
    if title:
        ax.set_title(title, fontsize=11)
    present = sorted(set(np.unique(label_map).tolist()) - {0})
    handles = [Patch(color=np.array(colors[v - 1][:3]) / 255, label=classes[v - 1]) for v in present]
    if tissue is not None:
        handles.append(Patch(facecolor="none", edgecolor="black", label="tissue outline"))
    if handles:
        ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=11, frameon=False)
    fig.tight_layout()
    path = Path(path)
    try:
        with atomic_path(path, ".png") as tmp:
            fig.savefig(tmp, dpi=dpi, bbox_inches="tight")
    finally:
        plt.close(fig)
    return path
