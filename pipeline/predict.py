"""The slide flow, composed: read -> tissue -> tiles -> infer -> write.

:func:`tissue_stage` and :func:`classify_slide` are plain functions of a path and a
:class:`~pipeline.config.PipelineConfig`; nothing is kept on objects between runs. The class
heatmap is written chunk by chunk into a ``.partial`` OME-Zarr store whose ``progress.json``
records finished chunks, so a killed run resumes where it stopped; the store is renamed to
its final name only when complete, and the GeoJSON, overlay and summary follow from it.

Example::

    from pipeline.config import load_config
    cfg = load_config("configs/default.yaml")
    summary = classify_slide("data/demo/CMU-1-Small-Region.svs", cfg, "results/doc")
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Optional

import numpy as np

from .config import PipelineConfig
from .outputs import disk_errors, slide_lock
from .read import SlideError, slide_id
from .stages import Progress, ensure_writable, open_configured_slide, run_fingerprint, slide_outputs, tissue_stage
from .tiles import TileDataset, TileGrid, make_grid
from .write_geojson import polygon_feature, write_feature_collection
from .write_overlay import class_colors, write_overlay
from .write_zarr import (
    done_chunks, finalize_store, hex_color, mark_chunk_done, open_partial_store, store_matches, stored_attrs, write_label,
)

__all__ = ["classify_slide"]


def _grid_geometry(grid: TileGrid, slide_mpp: float) -> tuple[tuple, tuple]:
    scale = (grid.step_l0 * slide_mpp,) * 2
    centre = ((grid.tile_l0 - 1) / 2 * slide_mpp,) * 2
    return scale, centre


def classify_slide(path: str | Path, cfg: PipelineConfig, out_dir: str | Path, device: str | None = None,
                   progress: Progress = None, stop_after_chunks: Optional[int] = None) -> dict:
    """Tile classification of one slide: every output written, the summary returned.

    Args:
        path: the slide.
        cfg: the run's configuration (``cfg.classify`` is the model).
        out_dir: the output root; files go to ``out_dir/<slide id>/``.
        device: overrides ``cfg.run.device``.
        progress: called as ``progress(done, total)`` after every batch.
        stop_after_chunks: stop (as if killed) after this many chunks; for tests of resume.

    Raises:
        SlideError, NoTissueError, ModelError, OutputError: with the file and the problem.
    """
    from .infer import iterate_predictions, prepare_model
    from .models import load_model
    from .runtime import bound_heap_growth, resolve_device

    bound_heap_growth()
    start = time.perf_counter()
    spec = cfg.classify
    if spec is None:
        raise ValueError("the config has no classify model")
    dev = resolve_device(device or cfg.run.device)
    loaded = load_model(spec)  # fail on a bad model before reading anything
    spec = loaded.spec
    slide = open_configured_slide(path, cfg)
    sid = slide_id(slide.path)
    paths = slide_outputs(out_dir, sid)
    ensure_writable(paths["dir"])
    with slide_lock(paths["dir"], "classify"), disk_errors(paths["dir"]):
        mask, thumb = tissue_stage(slide, cfg, out_dir)
        chunk = cfg.run.chunk_tiles
        grid = make_grid(slide, mask, cfg.tissue.mask_mpp, spec.tile_px, spec.mpp, spec.step_px, cfg.tissue.min_tissue_fraction, chunk)
        if len(grid.rows) == 0:
            raise SlideError(f"{slide.path}: no tile has {cfg.tissue.min_tissue_fraction:.0%} tissue at {spec.tile_px} px, {spec.mpp} mpp")
        classes, n_cls = list(spec.classes), len(spec.classes)
        final = paths["classify_zarr"]
        fingerprint = run_fingerprint(slide, spec, loaded.checksum, cfg, dev)
        tiles_per_s = None
        if not store_matches(final, fingerprint):
            group, _ = open_partial_store(final, fingerprint)
            if "0" not in group:
                group.create_array("0", shape=(n_cls, grid.n_rows, grid.n_cols), chunks=(n_cls, chunk, chunk),
                                   dtype="float32", fill_value=0.0, dimension_names=("c", "y", "x"))
            probs_arr = group["0"]
            chunk_ids = grid.chunk_of(chunk)
            finished = done_chunks(group)
            todo = np.flatnonzero(~np.isin(chunk_ids, list(finished)))
            remaining = {int(c): int(n) for c, n in zip(*np.unique(chunk_ids[todo], return_counts=True))}
            buffers: dict[int, np.ndarray] = {}
            prepare_model(loaded, dev)
            dataset = TileDataset(slide.path, slide.mpp, grid, todo)
            done = written = 0
            t0 = time.perf_counter()
            per_row = math.ceil(grid.n_cols / chunk)
            for idx, probs in iterate_predictions(loaded, dataset, dev, cfg.run.batch_size, cfg.run.num_workers,
                                                 cfg.run.tta, cfg.run.amp, groups=chunk_ids[todo]):
                for i, p in zip(idx, probs):
                    c = int(chunk_ids[i])
                    buf = buffers.setdefault(c, np.zeros((n_cls, chunk, chunk), np.float32))
                    buf[:, grid.rows[i] % chunk, grid.cols[i] % chunk] = p
                    remaining[c] -= 1
                    if remaining[c] == 0:  # chunk complete: write it, then record it
                        r0, c0 = (c // per_row) * chunk, (c % per_row) * chunk
                        r1, c1 = min(r0 + chunk, grid.n_rows), min(c0 + chunk, grid.n_cols)
                        probs_arr[:, r0:r1, c0:c1] = buffers.pop(c)[:, : r1 - r0, : c1 - c0]
                        mark_chunk_done(group, c)
                        written += 1
                        if stop_after_chunks is not None and written >= stop_after_chunks:
                            raise KeyboardInterrupt(f"stopped after {written} chunks (test hook)")
                done += len(idx)
                if progress is not None:
                    progress(done, len(todo))
            if todo.size:
                tiles_per_s = round(len(todo) / (time.perf_counter() - t0), 2)
            _finish_classify_store(group, final, grid, slide, mask, cfg, classes, loaded, tiles_per_s, fingerprint)
        else:
            tiles_per_s = stored_attrs(final).get("tiles_per_s")
        summary = _classify_outputs(slide, grid, mask, thumb, cfg, classes, loaded, paths, dev)
        summary["run_time_s"] = round(time.perf_counter() - start, 2)
        summary["tiles_per_s"] = tiles_per_s
        if loaded.adopted:
            summary["settings_from_checkpoint"] = loaded.adopted
        from .summary import write_summary

        write_summary(summary, paths["summary_json"])
    slide.close()
    return summary


def _finish_classify_store(group, final, grid, slide, mask, cfg, classes, loaded, tiles_per_s, fingerprint) -> None:
    import dask.array as da

    colors = class_colors(classes)
    scale, centre = _grid_geometry(grid, slide.mpp)
    probs = da.from_zarr(group["0"])
    on_tissue = probs.sum(axis=0) > 0.5
    label_map = da.where(on_tissue, probs.argmax(axis=0) + 1, 0).astype("uint8")
    write_label(group, "classes", label_map, scale, centre, {i + 1: c for i, c in enumerate(colors)},
                properties=[{"label-value": i + 1, "class": n} for i, n in enumerate(classes)], n_levels=1)
    f = cfg.tissue.mask_mpp / slide.mpp
    write_label(group, "tissue", mask.astype("uint8"), (cfg.tissue.mask_mpp,) * 2, ((f - 1) / 2 * slide.mpp,) * 2,
                {1: (0, 200, 0)}, properties=[{"label-value": 1, "class": "tissue"}], n_levels=1)
    channels = [{"label": n, "color": hex_color(c), "active": True, "window": {"min": 0.0, "max": 1.0, "start": 0.0, "end": 1.0}}
                for n, c in zip(classes, colors)]
    extra = {"fingerprint": fingerprint, "model": loaded.name,
             "model_checksum": loaded.checksum, "trained": loaded.trained, "classes": classes,
             "tile_px": grid.tile_px, "tile_mpp": grid.mpp, "slide_mpp": slide.mpp, "tiles_per_s": tiles_per_s}
    finalize_store(group, final, "class_probabilities", scale, centre, channels, extra)


def _classify_outputs(slide, grid, mask, thumb, cfg, classes, loaded, paths, dev) -> dict:
    import zarr

    store = zarr.open_group(str(paths["classify_zarr"]), mode="r")
    # the grid heatmap is small (one pixel per tile); the pixel-level maps are never loaded whole
    probs = np.asarray(store["0"][:])[:, grid.rows, grid.cols].T
    label_small = np.asarray(store["labels/classes/0"][0])
    colors = class_colors(classes)
    sid = slide_id(slide.path)
    arg = probs.argmax(1)

    def features():
        for i in range(len(grid.rows)):
            x, y = grid.xy(i)
            t = grid.tile_l0
            meas = {f"prob {n}": float(probs[i, k]) for k, n in enumerate(classes)}
            meas["tissue fraction"] = float(grid.tissue_fraction[i])
            yield polygon_feature([(x, y), (x + t, y), (x + t, y + t), (x, y + t)], "tile", classes[arg[i]], colors[arg[i]],
                                  meas, f"{sid}:tile:{grid.rows[i]}:{grid.cols[i]}")

    _, n_features = write_feature_collection(features(), paths["tiles_geojson"])
    # label map over the thumbnail's field of view (the grid may stop short of the slide's edge)
    h_t, w_t = thumb.shape[:2]
    cell = grid.step_l0 / (cfg.tissue.mask_mpp / slide.mpp)  # thumbnail px per grid cell
    canvas = np.zeros((h_t, w_t), np.uint8)
    rr = np.minimum((np.arange(h_t) / cell).astype(int), label_small.shape[0] - 1)
    cc = np.minimum((np.arange(w_t) / cell).astype(int), label_small.shape[1] - 1)
    inside = (np.arange(h_t)[:, None] < label_small.shape[0] * cell) & (np.arange(w_t)[None] < label_small.shape[1] * cell)
    canvas[inside] = label_small[rr][:, cc][inside]
    title = f"{sid}: {loaded.name} ({'trained' if loaded.trained else 'untrained, random weights'}), {grid.tile_px} px @ {grid.mpp} mpp"
    write_overlay(thumb, canvas, classes, colors, paths["overlay_png"], title=title, um_per_px=cfg.tissue.mask_mpp, tissue=mask)
    counts = np.bincount(arg, minlength=len(classes)) if len(arg) else np.zeros(len(classes), int)
    return {
        "slide": sid, "path": str(slide.path), "mpp": round(slide.mpp, 5), "mpp_source": slide.mpp_source,
        "backend": slide.backend, "dimensions_px": list(slide.dimensions),
        "tissue_area_mm2": round(float(mask.sum()) * cfg.tissue.mask_mpp**2 / 1e6, 4),
        "tiles": int(len(grid.rows)), "tile_px": grid.tile_px, "tile_mpp": grid.mpp, "grid": [grid.n_rows, grid.n_cols],
        "class_fraction": {n: round(float(c) / max(len(arg), 1), 4) for n, c in zip(classes, counts)},
        "model": loaded.name, "model_checksum": loaded.checksum, "trained": loaded.trained,
        "device": str(dev), "tta": cfg.run.tta, "geojson_features": n_features,
        "outputs": {k: str(v) for k, v in paths.items() if k in ("classify_zarr", "tiles_geojson", "overlay_png", "tissue_png")},
    }
