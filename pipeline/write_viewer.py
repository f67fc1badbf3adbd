"""The slide viewer: ``OUT/<slide>/viewer/index.html``, a deep-zoom view of the slide with the class
heatmap and the nuclei on top, that opens from ``file://`` (or ``gmrpath view OUT``) with no server
and no network.

The slide is written as Deep Zoom tiles (``slide_files/<level>/<col>_<row>.jpeg``, the DZI layout) read
through :func:`pipeline.read.read_region`, so every backend the pipeline reads works (OpenSlide,
TIAToolbox, plain images); only the levels the viewer shows are written (from the one where the whole
slide fits one tile up to full resolution). Each tile is written to a temporary name and renamed, and a
killed run continues with the tiles it has; the finished tile set is marked with a fingerprint of the
slide, so a second run writes none. The layers come from the run's own GeoJSON (tile classes with their
probabilities, nuclei polygons with their measurements) and go into ``data.js`` as one JSON value
(every ``<``, ``>`` and ``&`` escaped, so no slide or class name can end the script); the page writes
names into the document as text only. OpenSeadragon (BSD-3, vendored with its licence) draws the slide;
``viewer.js`` draws the layers on a canvas above it.

Example::

    from pipeline.write_viewer import write_viewer
    write_viewer(slide, "results/demo", "CMU-1-Small-Region")   # -> results/demo/CMU-1-Small-Region/viewer/index.html
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from .outputs import OutputError
from .read import Slide, read_region
from .stages import slide_outputs

__all__ = ["write_viewer", "write_viewer_tiles", "write_viewer_page", "write_viewer_pages", "deep_zoom_levels", "viewer_data",
           "ASSETS", "OSD_VERSION", "TILE_PX", "OVERLAP_PX"]

ASSETS = Path(__file__).with_name("viewer_assets")
OSD_VERSION = "6.1.1"
TILE_PX = 254  # + 1 px overlap each side: 256 px JPEGs, the Deep Zoom default
OVERLAP_PX = 1
JPEG_QUALITY = 85


def deep_zoom_levels(width: int, height: int, tile_px: int = TILE_PX) -> tuple[int, int]:
    """``(min_level, max_level)`` of the Deep Zoom pyramid to write: ``max_level`` is full resolution
    (``ceil(log2(max side))``), ``min_level`` the finest level at which the whole slide fits one tile.

    Example:
        >>> deep_zoom_levels(2220, 2967)
        (8, 12)
    """
    side = max(width, height, 1)
    max_level = math.ceil(math.log2(side))
    one_tile = math.ceil(math.log2(side / tile_px)) if side > tile_px else 0  # halvings until one tile holds it
    return max(0, max_level - one_tile), max_level


def _fingerprint(slide: Slide) -> str:
    st = Path(slide.path).stat() if Path(slide.path).exists() else None
    key = [str(Path(slide.path).name), list(slide.dimensions), slide.mpp, TILE_PX, OVERLAP_PX, JPEG_QUALITY,
           st.st_size if st else 0, int(st.st_mtime) if st else 0]
    return hashlib.sha256(json.dumps(key).encode()).hexdigest()[:16]


def _write_tiles(slide: Slide, folder: Path, progress: Optional[Callable[[int, int], None]]) -> dict:
    """Deep Zoom tiles of ``slide`` under ``folder/slide_files``, resumable; returns the DZI description."""
    from PIL import Image

    width, height = slide.dimensions
    lo, hi = deep_zoom_levels(width, height)
    files = folder / "slide_files"
    done_mark = files / ".complete"
    fp = _fingerprint(slide)
    dzi = {"width": width, "height": height, "tile_px": TILE_PX, "overlap_px": OVERLAP_PX, "format": "jpeg",
           "min_level": lo, "max_level": hi}
    if done_mark.is_file() and done_mark.read_text().strip() == fp:
        return dzi
    if files.is_dir() and (files / ".fingerprint").is_file() and (files / ".fingerprint").read_text().strip() != fp:
        shutil.rmtree(files)  # tiles of another slide (or of other settings) under the same name
    files.mkdir(parents=True, exist_ok=True)
    (files / ".fingerprint").write_text(fp)
    jobs = []
    for level in range(lo, hi + 1):
        scale = 2 ** (hi - level)  # level-0 pixels per pixel of this level
        lw, lh = math.ceil(width / scale), math.ceil(height / scale)
        for row in range(math.ceil(lh / TILE_PX)):
            for col in range(math.ceil(lw / TILE_PX)):
                jobs.append((level, scale, lw, lh, col, row))
    for i, (level, scale, lw, lh, col, row) in enumerate(jobs):
        path = files / str(level) / f"{col}_{row}.jpeg"
        if not path.is_file():
            x0, y0 = max(0, col * TILE_PX - OVERLAP_PX), max(0, row * TILE_PX - OVERLAP_PX)
            x1, y1 = min(lw, (col + 1) * TILE_PX + OVERLAP_PX), min(lh, (row + 1) * TILE_PX + OVERLAP_PX)
            rgb = read_region(slide, (x0 * scale, y0 * scale), (x1 - x0, y1 - y0), slide.mpp * scale)
            path.parent.mkdir(exist_ok=True)
            tmp = path.with_name(f".{path.stem}.tmp.jpeg")
            try:
                Image.fromarray(np.ascontiguousarray(rgb)).save(tmp, quality=JPEG_QUALITY)
                os.replace(tmp, path)
            except OSError as err:
                tmp.unlink(missing_ok=True)
                raise OutputError(f"{path}: cannot write a viewer tile ({err.strerror or err})") from None
        if progress is not None:
            progress(i + 1, len(jobs))
    done_mark.write_text(fp)
    return dzi


def _tiles_layer(path: Path) -> Optional[dict]:
    """Tile classes from the run's tiles GeoJSON: ``[x, y, w, h, p_0 .. p_k]`` rows in level-0 pixels."""
    if not path.is_file():
        return None
    feats = json.loads(path.read_text()).get("features", [])
    classes: list[str] = []
    rows = []
    for f in feats:
        probs = {k[5:]: v for k, v in f["properties"].get("measurements", {}).items() if k.startswith("prob ")}
        if not classes:
            classes = list(probs)
        xs, ys = zip(*f["geometry"]["coordinates"][0])
        rows.append([round(min(xs), 1), round(min(ys), 1), round(max(xs) - min(xs), 1), round(max(ys) - min(ys), 1)]
                    + [round(float(probs.get(c, 0.0)), 4) for c in classes])
    return {"classes": classes, "tiles": rows}


def _nuclei_layer(path: Path) -> Optional[dict]:
    """Nuclei from the run's GeoJSON: outer rings as flat ``[x0, y0, x1, y1, ...]`` (level-0 pixels) and
    their area in µm²."""
    if not path.is_file():
        return None
    polys, areas = [], []
    for f in json.loads(path.read_text()).get("features", []):
        geom = f["geometry"]
        ring = geom["coordinates"][0] if geom["type"] == "Polygon" else geom["coordinates"][0][0]
        polys.append([round(v, 1) for xy in ring for v in xy])
        areas.append(round(float(f["properties"].get("measurements", {}).get("area um^2", 0.0)), 2))
    return {"polygons": polys, "area_um2": areas}


def viewer_data(meta: dict, sid: str, out_dir: str | Path) -> dict:
    """What ``viewer.js`` draws: the slide (``meta``: name, mpp, Deep Zoom description, as
    :func:`write_viewer_tiles` recorded it), the class tiles and the nuclei of this run."""
    from .write_overlay import class_colors

    paths = slide_outputs(out_dir, sid)
    data = {"slide": sid, "file": meta["file"], "mpp": meta["mpp"], "dzi": meta["dzi"], "osd_version": OSD_VERSION}
    tiles = _tiles_layer(paths["tiles_geojson"])
    summary = json.loads(paths["summary_json"].read_text()) if paths["summary_json"].is_file() else {}
    if tiles is not None and tiles["tiles"]:
        tiles["colors"] = [list(c) for c in class_colors(tiles["classes"])]
        tiles["trained"] = bool(summary.get("trained", True))
        tiles["model"] = str(summary.get("model", ""))
        data["classify"] = tiles
    nuclei = _nuclei_layer(paths["nuclei_geojson"])
    if nuclei is not None:
        nsum = json.loads(paths["nuclei_summary_json"].read_text()) if paths["nuclei_summary_json"].is_file() else {}
        nuclei["trained"] = bool(nsum.get("trained", True))
        nuclei["model"] = str(nsum.get("model", ""))
        data["nuclei"] = nuclei
    return data


def _script_json(value) -> str:
    """JSON safe inside a ``<script>`` element and a JS file: ``<``, ``>``, ``&`` and the line separators escaped."""
    text = json.dumps(value, separators=(",", ":"), allow_nan=False)
    for ch, esc in (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026"), ("\u2028", "\\u2028"), ("\u2029", "\\u2029")):
        text = text.replace(ch, esc)
    return text


def _viewer_folder(out_dir: str | Path, sid: str) -> Path:
    folder = slide_outputs(out_dir, sid)["dir"] / "viewer"
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise OutputError(f"{folder}: cannot create the viewer folder ({err.strerror})") from None
    return folder


def _atomic_write(target: Path, text: Optional[str] = None, source: Optional[Path] = None) -> None:
    tmp = target.with_name(f".{target.name}.tmp")
    try:
        if source is not None:
            shutil.copyfile(source, tmp)
        else:
            tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, target)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise OutputError(f"{target}: cannot write the viewer ({err.strerror or err})") from None


def write_viewer_tiles(slide: Slide, out_dir: str | Path, sid: str, progress: Optional[Callable[[int, int], None]] = None) -> Path:
    """The slide's Deep Zoom tiles (once, resumably) and ``viewer/slide.json`` (name, mpp, pyramid), all
    the page needs of the slide; returns ``slide.json``.

    Raises:
        OutputError: a tile cannot be written (full disk, permissions), naming it.
        SlideError: the slide cannot be read.
    """
    folder = _viewer_folder(out_dir, sid)
    dzi = _write_tiles(slide, folder, progress)
    meta = {"file": Path(slide.path).name, "mpp": slide.mpp, "dzi": dzi}
    _atomic_write(folder / "slide.json", json.dumps(meta))
    return folder / "slide.json"


def write_viewer_page(out_dir: str | Path, sid: str) -> Path:
    """``data.js`` from the run's current outputs, the page and its scripts (each atomically,
    ``index.html`` last); needs :func:`write_viewer_tiles` first. Cheap: no slide is opened.

    Raises:
        OutputError: the tiles were never written, or the folder cannot be written.
    """
    folder = _viewer_folder(out_dir, sid)
    meta_path = folder / "slide.json"
    if not meta_path.is_file() or not (folder / "slide_files" / ".complete").is_file():
        raise OutputError(f"{folder}: the slide's viewer tiles are not written yet (gmrpath viewer SLIDE writes them)")
    data = viewer_data(json.loads(meta_path.read_text()), sid, out_dir)
    _atomic_write(folder / "openseadragon.min.js", source=ASSETS / "openseadragon.min.js")
    _atomic_write(folder / "LICENSE-openseadragon.txt", source=ASSETS / "LICENSE-openseadragon.txt")
    _atomic_write(folder / "viewer.js", source=ASSETS / "viewer.js")
    _atomic_write(folder / "data.js", f"window.GMR_VIEWER = {_script_json(data)};\n")
    _atomic_write(folder / "index.html", source=ASSETS / "index.html")
    return folder / "index.html"


def write_viewer(slide: Slide, out_dir: str | Path, sid: str, progress: Optional[Callable[[int, int], None]] = None) -> Path:
    """Write (or bring up to date) ``OUT/<sid>/viewer/``: the tiles once, then the page from the run's
    current outputs (so a viewer written after ``predict`` gains the nuclei after ``segment``); returns
    its ``index.html``.

    Raises:
        OutputError: the viewer folder cannot be written (full disk, permissions), naming the file.
        SlideError: the slide cannot be read.
    """
    write_viewer_tiles(slide, out_dir, sid, progress)
    return write_viewer_page(out_dir, sid)


def write_viewer_pages(out_dir: str | Path) -> list[Path]:
    """Rewrite the page of every slide under ``out_dir`` whose tiles are written (the workflow's cohort
    step does this, so each viewer shows all of the run's layers)."""
    out = []
    for meta in sorted(Path(out_dir).glob("*/viewer/slide.json")):
        if (meta.parent / "slide_files" / ".complete").is_file():
            out.append(write_viewer_page(out_dir, meta.parent.parent.name))
    return out
