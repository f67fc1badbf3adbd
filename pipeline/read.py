"""Read: open a slide, find its resolution, read regions at a target resolution.

OpenSlide reads svs, ndpi, mrxs, scn, generic tiled TIFF...; what it cannot open is tried
with TIAToolbox (OME-TIFF and the formats its readers add). Resolution is in micrometres per
pixel (mpp) throughout: from ``openslide.mpp-x/y``, else the TIFF resolution tags, else the
caller's per-slide override (``mpp_csv``) or default (``mpp``); with none, a
:class:`SlideError` naming the file. Coordinates are (x, y) in level-0 pixels.

Example:
    >>> slide = open_slide("data/demo/CMU-1-Small-Region.svs")
    >>> round(slide.mpp, 3), slide.dimensions
    (0.499, (2220, 2967))
    >>> read_region(slide, (0, 0), (224, 224), target_mpp=1.0).shape
    (224, 224, 3)
"""

from __future__ import annotations

import csv
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np

__all__ = ["SlideError", "Slide", "open_slide", "slide_from_array", "read_region", "read_mpp_csv", "slide_id"]

MPP_RANGE = (0.05, 200.0)  # plausible micrometres per pixel; outside it the metadata is ignored


class SlideError(ValueError):
    """A slide cannot be used; the message names the file and the problem."""


@dataclass
class Slide:
    """An open slide. Not shared across processes: each DataLoader worker opens its own.

    Attributes:
        path: the file.
        mpp: level-0 micrometres per pixel.
        mpp_source: where ``mpp`` came from (metadata key, ``mpp_csv`` or ``default``).
        level_dimensions: (width, height) of every pyramid level.
        level_downsamples: downsample of every level relative to level 0.
    """

    path: Path
    mpp: float
    mpp_source: str
    level_dimensions: tuple
    level_downsamples: tuple
    backend: str
    handle: Any = field(repr=False, default=None)

    @property
    def dimensions(self) -> tuple[int, int]:
        return tuple(self.level_dimensions[0])

    def close(self) -> None:
        if self.backend == "openslide" and self.handle is not None:
            self.handle.close()


def _stem(path: str | os.PathLike) -> str:
    name = Path(path).name
    for ext in (".ome.tiff", ".ome.tif"):
        if name.lower().endswith(ext):
            return name[: -len(ext)]
    return Path(name).stem


def slide_id(path: str | os.PathLike) -> str:
    """The slide's name without its extension(s) (``a/b/CMU-1.ome.tiff`` -> ``CMU-1``), made safe
    as a folder name: characters other than letters, digits, ``.``, ``_`` and ``-`` become ``_``,
    and leading/trailing dots are dropped, so no id is ``..`` or hidden. A name with nothing
    left gets ``slide-<hash of the file name>``.

    Example:
        >>> slide_id("a/b/CMU-1.ome.tiff"), slide_id("tumour 3 (HE).svs"), slide_id("...svs")[:6]
        ('CMU-1', 'tumour_3__HE_', 'slide-')
    """
    import hashlib
    import re

    sid = re.sub(r"[^\w.\-]", "_", _stem(path)).strip(".")
    return sid or "slide-" + hashlib.sha256(Path(path).name.encode()).hexdigest()[:8]


def read_mpp_csv(path: str | os.PathLike) -> dict[str, float]:
    """Read a ``slide,mpp`` CSV (header required) into {slide id: mpp}.

    Raises:
        ValueError: naming the file and row when a column is missing or an mpp is not a number.
    """
    table: dict[str, float] = {}
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is None or not {"slide", "mpp"} <= set(reader.fieldnames):
            raise ValueError(f"{path}: an mpp CSV needs the header 'slide,mpp', got {reader.fieldnames}")
        for row_no, row in enumerate(reader, start=2):
            try:
                table[slide_id(row["slide"])] = float(row["mpp"])
            except (TypeError, ValueError):
                raise ValueError(f"{path}: row {row_no}: mpp {row['mpp']!r} is not a number") from None
    return table


def _plausible(value: Optional[float]) -> Optional[float]:
    if value is None or not math.isfinite(value) or not MPP_RANGE[0] <= value <= MPP_RANGE[1]:
        return None
    return float(value)


def _metadata_mpp(props: dict) -> tuple[Optional[float], str]:
    try:
        mx, my = float(props["openslide.mpp-x"]), float(props["openslide.mpp-y"])
        if _plausible(mx) and _plausible(my):
            return (mx + my) / 2.0, "openslide.mpp-x/y"
    except (KeyError, ValueError):
        pass
    unit = str(props.get("tiff.ResolutionUnit", "")).lower()
    per_unit = {"inch": 25400.0, "centimeter": 10000.0, "2": 25400.0, "3": 10000.0}.get(unit)
    try:
        xres = float(props["tiff.XResolution"])
        if per_unit and xres > 0 and _plausible(per_unit / xres):
            return per_unit / xres, "tiff.XResolution"
    except (KeyError, ValueError):
        pass
    return None, ""


def _tiff_tag_mpp(path: Path) -> tuple[Optional[float], str]:
    """The resolution a plain TIFF records (crops exported from QuPath or Fiji): ``XResolution`` with
    ``ResolutionUnit`` inch or centimetre, or ImageJ's ``unit=micron`` with no unit tag."""
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            page = tif.pages[0]
            tags = page.tags
            if "XResolution" not in tags:
                return None, ""
            num, den = tags["XResolution"].value
            px_per_unit = num / den if den else 0.0
            unit = int(tags["ResolutionUnit"].value) if "ResolutionUnit" in tags else 1
            description = str(tags["ImageDescription"].value) if "ImageDescription" in tags else ""
    except Exception:  # noqa: BLE001 - not a TIFF tifffile reads: the readers below decide
        return None, ""
    if px_per_unit <= 0:
        return None, ""
    if unit in (2, 3):
        return _plausible({2: 25400.0, 3: 10000.0}[unit] / px_per_unit), "tiff.XResolution (tifffile)"
    if unit == 1 and any(f"unit={u}" in description for u in ("micron", "um", "\\u00B5m", "µm")):
        return _plausible(1.0 / px_per_unit), "ImageJ unit=micron"
    return None, ""


def open_slide(path: str | os.PathLike, mpp: Optional[float] = None, mpp_csv: Optional[dict[str, float]] = None) -> Slide:
    """Open ``path`` with OpenSlide (TIAToolbox for what OpenSlide cannot read).

    Args:
        path: the slide file.
        mpp: fallback level-0 mpp when the file has none.
        mpp_csv: per-slide fallback mpp by slide id (see :func:`read_mpp_csv`); wins over ``mpp``.

    Raises:
        SlideError: missing file, a file no reader can open, or no mpp anywhere.
    """
    path = Path(path)
    if not path.is_file():
        raise SlideError(f"{path}: no such file")
    import openslide

    table = mpp_csv or {}
    fallback = table.get(slide_id(path), table.get(_stem(path)))
    try:
        handle = openslide.OpenSlide(str(path))
        props = dict(handle.properties)
        dims, downs, backend = handle.level_dimensions, handle.level_downsamples, "openslide"
        meta_mpp, source = _metadata_mpp(props)
    except (openslide.OpenSlideUnsupportedFormatError, openslide.OpenSlideError) as err:
        tag_mpp, tag_source = _tiff_tag_mpp(path) if path.suffix.lower() in (".tif", ".tiff") else (None, "")
        if tag_mpp is None and mpp is None and fallback is None and _plain_image(path):
            _raise_no_mpp(path)  # before loading TIAToolbox (seconds): nothing it reads would give one
        handle, dims, downs, meta_mpp, source = _open_tiatoolbox(path, err)
        if meta_mpp is None and tag_mpp is not None:
            meta_mpp, source = tag_mpp, tag_source
        backend = "tiatoolbox"
    if meta_mpp is None:
        if fallback is not None:
            meta_mpp, source = fallback, "mpp_csv"
        elif mpp is not None:
            meta_mpp, source = float(mpp), "default (--mpp)"
        else:
            _raise_no_mpp(path)
    if not _plausible(meta_mpp):
        raise SlideError(f"{path}: mpp {meta_mpp} is outside the plausible range {MPP_RANGE}")
    return Slide(path, float(meta_mpp), source, tuple(map(tuple, dims)), tuple(downs), backend, handle)


def _raise_no_mpp(path: Path) -> None:
    raise SlideError(
        f"{path}: the file records no resolution (no openslide.mpp-x/y, no TIFF resolution tags); "
        "give it with --mpp or a slide,mpp CSV (mpp_csv in the config)"
    )


def _plain_image(path: Path) -> bool:
    """A one-image file PIL reads (PNG, JPEG, a plain TIFF): TIAToolbox reads it without finding an mpp."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            return getattr(im, "n_frames", 1) == 1
    except Exception:  # noqa: BLE001 - not an image PIL knows: leave it to the slide readers
        return False


def _drop_tiatoolbox_records(record: logging.LogRecord) -> bool:
    return "tiatoolbox" not in record.pathname


def _tiatoolbox_reader():
    """TIAToolbox's ``WSIReader``, imported without letting TIAToolbox take over logging.

    TIAToolbox installs ``[WARNING]`` handlers on the root logger at import, routes Python
    warnings through them and logs through the root logger: its lines would interleave with
    ours (and break one-line errors in logs). Its handlers are removed, warnings are given back,
    and its own records are dropped; what matters (a slide it cannot read) reaches the user as
    our one-line error.
    """
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    from tiatoolbox.wsicore.wsireader import WSIReader

    for handler in list(root.handlers):
        if handler not in handlers:
            root.removeHandler(handler)
    root.setLevel(level)
    logging.captureWarnings(False)
    if _drop_tiatoolbox_records not in root.filters:
        root.addFilter(_drop_tiatoolbox_records)
    return WSIReader


def _open_tiatoolbox(path: Path, openslide_error: Exception):
    try:
        WSIReader = _tiatoolbox_reader()
        reader = WSIReader.open(str(path))
        info = reader.info
        dims = [tuple(int(v) for v in d) for d in info.level_dimensions]
        mpp = info.mpp
        meta = _plausible(float(np.mean(mpp))) if mpp is not None else None
        return reader, dims, tuple(float(d) for d in info.level_downsamples), meta, "tiatoolbox mpp"
    except Exception as err:  # noqa: BLE001 - any reader failure means "not a slide we can read"
        raise SlideError(
            f"{path}: not a readable slide (OpenSlide: {openslide_error}; TIAToolbox: {type(err).__name__}: {err})"
        ) from None


def slide_from_array(image: np.ndarray, mpp: float, name: str = "image") -> Slide:
    """An in-memory RGB image as a one-level :class:`Slide`, read by :func:`read_region` like a file
    (evaluation runs the slide code path on dataset images this way).

    Shape:
        image ``(H, W, 3)`` uint8.
    """
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] < 3 or image.dtype != np.uint8:
        raise ValueError(f"{name}: expected an (H, W, 3) uint8 image, got {image.shape} {image.dtype}")
    if not (isinstance(mpp, (int, float)) and math.isfinite(mpp) and mpp > 0):
        raise ValueError(f"{name}: mpp must be a positive number, got {mpp!r}")
    h, w = image.shape[:2]
    return Slide(Path(name), float(mpp), "array", ((w, h),), (1.0,), "array", image[..., :3])


def best_level(slide: Slide, target_mpp: float) -> int:
    """The coarsest level whose resolution is at least as fine as ``target_mpp``."""
    level = 0
    for i, ds in enumerate(slide.level_downsamples):
        if slide.mpp * ds <= target_mpp * 1.001:
            level = i
    return level


def read_region(slide: Slide, location: tuple[int, int], size: tuple[int, int], target_mpp: float) -> np.ndarray:
    """Read ``size`` = (width, height) pixels at ``target_mpp`` whose top-left is level-0 ``location``.

    Reads from the nearest level at least as fine as the target and resamples (area averaging
    when shrinking). Pixels beyond the slide or transparent in it come back white.

    Shape:
        returns ``(height, width, 3)`` uint8 RGB.

    Raises:
        SlideError: the file fails while reading (corrupt tile data, unreadable level).
    """
    import cv2

    level = best_level(slide, target_mpp)
    ds = slide.level_downsamples[level]
    scale = target_mpp / slide.mpp  # level-0 pixels per output pixel
    w_lvl = max(1, int(math.ceil(size[0] * scale / ds)))
    h_lvl = max(1, int(math.ceil(size[1] * scale / ds)))
    x, y = int(location[0]), int(location[1])
    try:
        if slide.backend == "array":
            rgb = np.full((h_lvl, w_lvl, 3), 255, np.uint8)  # white beyond the image, as OpenSlide gives
            src = slide.handle[max(y, 0): max(y + h_lvl, 0), max(x, 0): max(x + w_lvl, 0)]
            rgb[max(-y, 0): max(-y, 0) + src.shape[0], max(-x, 0): max(-x, 0) + src.shape[1]] = src
        elif slide.backend == "openslide":
            rgba = np.asarray(slide.handle.read_region((x, y), level, (w_lvl, h_lvl)))
            rgb = rgba[..., :3]
            if rgba[..., 3].min() < 255:  # beyond the slide or in an empty region: composite over white
                alpha = rgba[..., 3:4].astype(np.uint16)
                rgb = ((rgb * alpha + 255 * (255 - alpha) + 127) // 255).astype(np.uint8)
        else:
            rgb = np.asarray(slide.handle.read_rect((x, y), (w_lvl, h_lvl), resolution=level, units="level"))[..., :3]
    except Exception as err:  # noqa: BLE001 - surface as a named, per-file error
        raise SlideError(f"{slide.path}: cannot read level {level} at (x={x}, y={y}): {type(err).__name__}: {err}") from None
    # the exact extent in level pixels is size*scale/ds; crop to it before resampling
    w_exact, h_exact = size[0] * scale / ds, size[1] * scale / ds
    if (w_lvl, h_lvl) != tuple(size) or abs(w_exact - size[0]) > 1e-6:
        crop = rgb[: max(1, round(h_exact)), : max(1, round(w_exact))]
        interp = cv2.INTER_AREA if w_exact > size[0] else cv2.INTER_LINEAR
        rgb = cv2.resize(np.ascontiguousarray(crop), tuple(int(s) for s in size), interpolation=interp)
    return np.ascontiguousarray(rgb)
