"""The viewer's cost beside inference: seconds and disk per megapixel of writing a slide's Deep Zoom
tiles, against classifying the same slide, in one run. Slides are the demo and mosaics of its tissue
(2x2 = 4x the area, ...). Run with ``gmrpath benchmark viewer``.

Example::

    result = run_viewer_benchmark("data/demo/CMU-1-Small-Region.svs", "/tmp/bv", repeats=(1,))
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Callable, Optional

__all__ = ["run_viewer_benchmark"]


def _folder_mb(folder: Path) -> float:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) / 2**20


def run_viewer_benchmark(slide: str | Path, root: str | Path, repeats=(1, 2), config: Optional[str] = None,
                         progress: Optional[Callable[[str], None]] = None) -> dict:
    """Per slide size: viewer tiles (s, s/Mpx, MiB/Mpx, s when already written) and classification (s) of
    the same slide with the config's model; ``viewer_vs_classify`` is the ratio of the two times.

    Args:
        repeats: mosaic sides of the demo tissue (1: the slide itself; 2: 2x2 copies, 4x the area).
    """
    import dataclasses

    from benchmarks.synthetic import mosaic_tiff, read_demo_tissue
    from pipeline.config import config_from_dict, load_config
    from pipeline.predict import classify_slide
    from pipeline.read import open_slide, slide_id
    from pipeline.write_viewer import write_viewer

    log = progress or (lambda s: None)
    root = Path(root)
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    cfg = load_config(config, need_slides=False) if config else config_from_dict({"slides": str(slide)})
    cfg = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, num_workers=0, viewer=False))
    rows = []
    for k in repeats:
        path = Path(slide) if k == 1 else mosaic_tiff(root / f"mosaic{k}x{k}.tif", read_demo_tissue(slide), k)
        s = open_slide(path)
        mpx = s.dimensions[0] * s.dimensions[1] / 1e6
        out = root / f"out{k}"
        log(f"{path.name}: classify ({mpx:.1f} Mpx)")
        t0 = time.perf_counter()
        classify_slide(path, cfg, out)
        classify_s = time.perf_counter() - t0
        log(f"{path.name}: viewer tiles")
        t0 = time.perf_counter()
        index = write_viewer(s, out, slide_id(path))
        viewer_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        write_viewer(s, out, slide_id(path))
        again_s = time.perf_counter() - t0
        s.close()
        mb = _folder_mb(index.parent / "slide_files")
        rows.append({"slide": path.name, "megapixels": round(mpx, 2), "viewer_s": round(viewer_s, 2),
                     "viewer_s_per_mpx": round(viewer_s / mpx, 3), "disk_mib": round(mb, 2), "disk_mib_per_mpx": round(mb / mpx, 3),
                     "viewer_again_s": round(again_s, 3), "classify_s": round(classify_s, 2),
                     "viewer_vs_classify": round(viewer_s / classify_s, 3)})
    return {"model": cfg.classify.model if cfg.classify else None, "rows": rows}
