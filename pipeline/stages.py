"""Stages shared by the slide composers (:mod:`pipeline.predict`, :mod:`pipeline.segment`):
where a slide's outputs go, opening a slide with the config's resolution fallbacks, the tissue
stage (computed once per slide and reused), and the fingerprint that decides whether a stored
result may be reused or a partial one resumed.

Example::

    from pipeline.config import load_config
    cfg = load_config("configs/default.yaml")
    slide = open_configured_slide("data/demo/CMU-1-Small-Region.svs", cfg)
    mask, thumbnail = tissue_stage(slide, cfg, "results/doc")
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from .config import ModelSpec, PipelineConfig
from .outputs import OutputError, disk_errors, slide_lock
from .read import Slide, open_slide, read_mpp_csv, slide_id
from .tissue import detect_tissue, mask_png_meta, render_thumbnail, save_mask_png

__all__ = ["Progress", "slide_outputs", "ensure_writable", "open_configured_slide", "tissue_stage", "run_fingerprint",
           "json_safe"]

Progress = Optional[Callable[[int, int], None]]  # (units done in this call, units to do)


def slide_outputs(out_dir: str | Path, sid: str) -> dict[str, Path]:
    """Every file the pipeline writes for slide ``sid``, all inside ``out_dir``.

    Raises:
        OutputError: when ``sid`` would lead outside ``out_dir`` (ids from :func:`slide_id`
            never do; this guards every caller).
    """
    root = Path(out_dir)
    d = root / sid
    if not sid or sid in (".", "..") or Path(sid).name != sid or not d.resolve().is_relative_to(root.resolve()):
        raise OutputError(f"{root}: slide id {sid!r} would write outside the output folder")
    return {
        "dir": d,
        "tissue_png": d / f"{sid}.tissue.png",
        "classify_zarr": d / f"{sid}.classify.ome.zarr",
        "tiles_geojson": d / f"{sid}.tiles.geojson",
        "overlay_png": d / f"{sid}.overlay.png",
        "summary_json": d / f"{sid}.summary.json",
        "nuclei_zarr": d / f"{sid}.nuclei.ome.zarr",
        "nuclei_geojson": d / f"{sid}.nuclei.geojson",
        "nuclei_summary_json": d / f"{sid}.nuclei.summary.json",
    }


def ensure_writable(d: Path) -> None:
    try:
        d.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise OutputError(f"{d}: cannot create the output folder ({err.strerror})") from None
    if not os.access(d, os.W_OK | os.X_OK):
        raise OutputError(f"{d}: output folder is not writable")


def open_configured_slide(path: str | Path, cfg: PipelineConfig) -> Slide:
    """Open a slide with the config's mpp fallbacks."""
    table = read_mpp_csv(cfg.mpp_csv) if cfg.mpp_csv else None
    return open_slide(path, mpp=cfg.mpp, mpp_csv=table)


def tissue_stage(slide: Slide, cfg: PipelineConfig, out_dir: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Detect tissue and save the mask PNG, or reuse the PNG an earlier tissue stage wrote for the
    same slide file and tissue settings (recorded in the PNG); returns ``(mask, thumbnail)`` at
    ``cfg.tissue.mask_mpp``."""
    paths = slide_outputs(out_dir, slide_id(slide.path))
    ensure_writable(paths["dir"])
    with slide_lock(paths["dir"], "tissue", wait=True), disk_errors(paths["dir"]):
        return _tissue_locked(slide, cfg, paths)


def _tissue_locked(slide: Slide, cfg: PipelineConfig, paths: dict) -> tuple[np.ndarray, np.ndarray]:
    from PIL import Image

    thumb = render_thumbnail(slide, cfg.tissue.mask_mpp)
    png = paths["tissue_png"]
    stat = slide.path.stat()
    meta = {"slide_size": stat.st_size, "slide_mtime": int(stat.st_mtime), "mpp": slide.mpp,
            "mask_mpp": cfg.tissue.mask_mpp, "min_object_um2": cfg.tissue.min_object_um2}
    if png.is_file() and mask_png_meta(png) == json_safe(meta):
        mask = np.asarray(Image.open(png)) > 127
        if mask.shape == thumb.shape[:2]:
            return mask, thumb
    mask = detect_tissue(slide, cfg.tissue.mask_mpp, cfg.tissue.min_object_um2, thumbnail=thumb)
    save_mask_png(mask, png, meta)
    return mask, thumb


def run_fingerprint(slide: Slide, spec: ModelSpec, checksum: str, cfg: PipelineConfig, device) -> dict:
    """What must be unchanged for a stored result to be reused or a partial one resumed:
    everything that changes the numbers (slide, model, settings, device type, precision, batch
    size, and the code that computes them)."""
    from .runtime import code_digest

    stat = slide.path.stat()
    dev_type = getattr(device, "type", str(device))
    return json_safe({
        "slide": str(slide.path.resolve()), "size": stat.st_size, "mtime": int(stat.st_mtime), "mpp": slide.mpp,
        "model_checksum": checksum, "spec": dataclasses.asdict(spec), "tta": cfg.run.tta,
        "tissue": dataclasses.asdict(cfg.tissue), "chunk": cfg.run.chunk_tiles, "device_type": dev_type,
        "amp": bool(cfg.run.amp and dev_type == "cuda"), "dtype": "float32", "batch_size": cfg.run.batch_size,
        "code": code_digest(),
    })


def json_safe(obj):
    """``obj`` as JSON would give it back (tuples as lists, paths as strings): comparable with stored JSON."""
    return json.loads(json.dumps(obj, default=str))
