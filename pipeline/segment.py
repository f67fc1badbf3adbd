"""Nuclei segmentation of a slide: U-Net probability and instance labels, block by block.

The slide at the model's resolution is cut into square blocks (``block_px``); each block on
tissue is read with a margin, segmented by MONAI's sliding-window inference with Gaussian
blending, cropped, thresholded and labelled (connected components), then written to the
``.partial`` OME-Zarr store and recorded as done: a killed run resumes at the next block and
memory does not grow with the slide. Label ids are ``block * 65536 + k``: unique and the same
on every run. A nucleus cut by a block edge gets one id on each side (kept simple on purpose).

Example::

    from pipeline.config import load_config
    cfg = load_config("configs/default.yaml", {"segment": {"preset": "nuclei"}})
    summary = segment_slide("data/demo/CMU-1-Small-Region.svs", cfg, "results/doc")
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Optional

import numpy as np

from .predict import OutputError, Progress, json_safe, open_configured_slide, run_fingerprint, slide_outputs, tissue_stage
from .read import read_region, slide_id
from .write_geojson import polygon_feature, write_feature_collection
from .write_zarr import done_chunks, finalize_store, mark_chunk_done, open_partial_store, store_matches, stored_attrs, write_label

__all__ = ["segment_slide", "BLOCK_STRIDE_LABELS"]

BLOCK_STRIDE_LABELS = 65536


def segment_slide(path: str | Path, cfg, out_dir: str | Path, device: Optional[str] = None, progress: Progress = None,
                  block_px: int = 1024, threshold: float = 0.5, stop_after_blocks: Optional[int] = None) -> dict:
    """Nuclei of one slide: OME-Zarr probability + label pyramid, detections GeoJSON, summary.

    Raises:
        SlideError, NoTissueError, ModelError, OutputError: with the file and the problem.
    """
    import torch
    import zarr

    from .infer import prepare_model, segment_logits
    from .models import load_model
    from .runtime import bound_heap_growth, resolve_device
    from .summary import write_summary

    bound_heap_growth()
    start = time.perf_counter()
    if cfg.segment is None:
        raise ValueError("the config has no segment model")
    dev = resolve_device(device or cfg.run.device)
    loaded = load_model(cfg.segment)
    spec = loaded.spec
    slide = open_configured_slide(path, cfg)
    sid = slide_id(slide.path)
    paths = slide_outputs(out_dir, sid)
    mask, _ = tissue_stage(slide, cfg, out_dir)
    w0, h0 = slide.dimensions
    f = spec.mpp / slide.mpp  # level-0 px per output px
    width, height = math.ceil(w0 / f), math.ceil(h0 / f)
    n_bx, n_by = math.ceil(width / block_px), math.ceil(height / block_px)
    m = cfg.tissue.mask_mpp / spec.mpp  # output px per mask px
    blocks = [(by, bx) for by in range(n_by) for bx in range(n_bx)
              if mask[int(by * block_px / m): math.ceil((by + 1) * block_px / m), int(bx * block_px / m): math.ceil((bx + 1) * block_px / m)].any()]
    final = paths["nuclei_zarr"]
    fingerprint = json_safe({**run_fingerprint(slide, spec, loaded.checksum, cfg), "block_px": block_px, "threshold": threshold})
    blocks_per_s = None
    if not store_matches(final, fingerprint):
        group, _ = open_partial_store(final, fingerprint)
        if "0" not in group:
            group.create_array("0", shape=(1, height, width), chunks=(1, block_px, block_px), dtype="uint8", fill_value=0,
                               dimension_names=("c", "y", "x"))
            group.create_array("_labels", shape=(height, width), chunks=(block_px, block_px), dtype="uint32", fill_value=0)
        finished = done_chunks(group)
        todo = [(by, bx) for by, bx in blocks if by * n_bx + bx not in finished]
        prepare_model(loaded, dev)
        margin = spec.overlap_px
        t0 = time.perf_counter()
        for k, (by, bx) in enumerate(todo):
            bid = by * n_bx + bx
            x0, y0 = bx * block_px, by * block_px
            bw, bh = min(block_px, width - x0), min(block_px, height - y0)
            rx, ry = x0 - margin, y0 - margin
            size = (max(bw + 2 * margin, spec.tile_px), max(bh + 2 * margin, spec.tile_px))
            region = torch.from_numpy(read_region(slide, (round(rx * f), round(ry * f)), size, spec.mpp))
            prob = segment_logits(loaded, region, dev, spec.tile_px, spec.overlap_px, cfg.run.batch_size, cfg.run.tta, cfg.run.amp)
            prob = prob.numpy()[margin: margin + bh, margin: margin + bw]
            labels = _instances(prob > threshold, bid)
            group["0"][0, y0: y0 + bh, x0: x0 + bw] = np.round(prob * 255).astype(np.uint8)
            group["_labels"][y0: y0 + bh, x0: x0 + bw] = labels
            mark_chunk_done(group, bid)
            if progress is not None:
                progress(k + 1, len(todo))
            if stop_after_blocks is not None and k + 1 >= stop_after_blocks:
                raise KeyboardInterrupt(f"stopped after {k + 1} blocks (test hook)")
        if todo:
            blocks_per_s = round(len(todo) / (time.perf_counter() - t0), 3)
        _finish_nuclei_store(group, final, slide, spec, f, fingerprint, loaded, blocks_per_s)
    else:
        blocks_per_s = stored_attrs(final).get("blocks_per_s")
    store = zarr.open_group(str(final), mode="r")
    n_features = _write_nuclei_geojson(store, paths["nuclei_geojson"], sid, f, block_px, spec.mpp)
    tissue_mm2 = float(mask.sum()) * cfg.tissue.mask_mpp**2 / 1e6
    summary = {
        "slide": sid, "mpp": round(slide.mpp, 5), "seg_mpp": spec.mpp, "model": loaded.name,
        "model_checksum": loaded.checksum, "trained": loaded.trained, "device": str(dev),
        "nuclei_count": n_features, "nuclei_per_mm2": round(n_features / tissue_mm2, 2) if tissue_mm2 else None,
        "blocks": len(blocks), "block_px": block_px, "blocks_per_s": blocks_per_s,
        "run_time_s": round(time.perf_counter() - start, 2),
        "outputs": {"nuclei_zarr": str(final), "nuclei_geojson": str(paths["nuclei_geojson"])},
    }
    write_summary(summary, paths["nuclei_summary_json"])
    slide.close()
    return summary


def _instances(foreground: np.ndarray, block_id: int) -> np.ndarray:
    from skimage import measure

    labels = measure.label(foreground, connectivity=1).astype(np.uint32)
    if labels.max() >= BLOCK_STRIDE_LABELS:
        raise OutputError(f"block {block_id}: more than {BLOCK_STRIDE_LABELS - 1} nuclei in one block")
    return np.where(labels > 0, labels + np.uint32(block_id * BLOCK_STRIDE_LABELS), 0).astype(np.uint32)


def _finish_nuclei_store(group, final, slide, spec, f, fingerprint, loaded, blocks_per_s) -> None:
    import dask.array as da

    scale = (spec.mpp,) * 2
    centre = ((f - 1) / 2 * slide.mpp,) * 2
    from .write_zarr import pyramid_levels, write_pyramid

    n_levels = pyramid_levels(group["_labels"].shape)
    write_pyramid(group, group["0"], n_levels)  # the probability image gets the labels' levels
    write_label(group, "nuclei", da.from_zarr(group["_labels"]), scale, centre, {}, chunks=1024, n_levels=n_levels)
    del group["_labels"]
    channels = [{"label": "nucleus probability (x255)", "color": "FF00FF", "active": True,
                 "window": {"min": 0, "max": 255, "start": 0, "end": 255}}]
    extra = {"fingerprint": fingerprint, "model": loaded.name, "model_checksum": loaded.checksum, "trained": loaded.trained,
             "seg_mpp": spec.mpp, "slide_mpp": slide.mpp, "blocks_per_s": blocks_per_s}
    finalize_store(group, final, "nuclei_probability", scale, centre, channels, extra, n_levels=n_levels)


def _write_nuclei_geojson(store, path: Path, sid: str, f: float, block_px: int, mpp: float) -> int:
    """Outline every labelled nucleus as a QuPath detection, one label block at a time."""
    import cv2
    from scipy import ndimage

    arr = store["labels/nuclei/0"]
    _, height, width = arr.shape

    def features():
        for y0 in range(0, height, block_px):
            for x0 in range(0, width, block_px):
                block = np.asarray(arr[0, y0: y0 + block_px, x0: x0 + block_px])
                if not block.any():
                    continue
                for value, sl in zip(*_objects(block, ndimage)):
                    crop = (block[sl] == value).astype(np.uint8)
                    contours, _ = cv2.findContours(np.pad(crop, 1), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
                    if not contours:
                        continue
                    c = max(contours, key=cv2.contourArea)[:, 0, :].astype(np.float64) - 1.0
                    if len(c) < 3:  # a one- or two-pixel object: use its pixel square
                        ys, xs = np.nonzero(crop)
                        c = np.array([[xs.min(), ys.min()], [xs.max() + 1, ys.min()], [xs.max() + 1, ys.max() + 1], [xs.min(), ys.max() + 1]], float)
                    ring = [((x0 + sl[1].start + px) * f, (y0 + sl[0].start + py) * f) for px, py in c]
                    area_px = float(crop.sum())
                    yield polygon_feature(ring, "detection", "Nucleus", (255, 0, 255),
                                          {"area px": area_px, "area um^2": area_px * mpp**2}, f"{sid}:nucleus:{int(value)}")

    _, count = write_feature_collection(features(), path)
    return count


def _objects(block: np.ndarray, ndimage):
    values = np.unique(block)
    values = values[values > 0]
    compact = np.searchsorted(values, block) + 1
    compact[block == 0] = 0
    slices = ndimage.find_objects(compact)
    return values, slices
