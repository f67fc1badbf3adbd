"""Nuclei segmentation of a slide or image: probability, instance labels, detections.

The slide at the model's resolution is cut into square blocks (``block_px``). Each block on
tissue is segmented by :func:`pipeline.nuclei.segment_block` (the one nuclei inference path,
which evaluation runs too: read with a margin of the network's receptive radius, reflected
beyond the slide's edge, one forward pass, marker-watershed instances, cropped to the core),
written to the ``.partial`` OME-Zarr store and recorded as done: a killed run resumes at the
next block and memory does not grow with the slide. A nucleus's id is ``1 + y * width + x`` of
its centroid pixel (at the model's mpp), so the two blocks that see a nucleus on their shared
edge give it the same id, and a rerun writes the same ids.

Example::

    from pipeline.config import load_config
    cfg = load_config("configs/default.yaml", {"segment": {"preset": "nuclei"}})
    summary = segment_slide("data/demo/CMU-1-Small-Region.svs", cfg, "results/doc")
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

import numpy as np

from .nuclei import block_origins, block_tissue, margin_px, model_extent, segment_block
from .stain import stain_mapper, stain_option_target
from .outputs import disk_errors, slide_lock
from .read import slide_id
from .tissue import NoTissueError
from .stages import Progress, ensure_writable, json_safe, open_configured_slide, run_fingerprint, slide_outputs, tissue_stage
from .write_geojson import pixel_pieces, polygon_feature, write_feature_collection
from .write_zarr import done_chunks, finalize_store, mark_chunk_done, open_partial_store, store_matches, stored_attrs, write_label

__all__ = ["segment_slide", "model_margin_px", "is_field_of_view", "FIELD_OF_VIEW_MAX_PX"]

FIELD_OF_VIEW_MAX_PX = 2048 * 2048  # a one-level image this small is a crop someone chose: segmented whole


def segment_stain_target(spec, loaded) -> Optional[dict]:
    """The stain target a run maps slides onto: the config's ``stain_norm`` (``"none"``: no mapping),
    else the checkpoint's own, else None."""
    if spec.stain_norm:
        return stain_option_target(spec.stain_norm)
    return loaded.meta.get("stain_norm") or None


def is_field_of_view(slide) -> bool:
    """A crop (exported from QuPath or Fiji, a dataset image), not a slide: one pyramid level and at
    most :data:`FIELD_OF_VIEW_MAX_PX` pixels. It is tissue by intent, so it is segmented whole."""
    w0, h0 = slide.dimensions
    return len(slide.level_dimensions) == 1 and w0 * h0 <= FIELD_OF_VIEW_MAX_PX


def model_margin_px(loaded) -> int:
    """The block margin of a loaded model: its receptive radius, or the spec's overlap when larger."""
    return margin_px(loaded.module, loaded.spec.overlap_px)


def segment_slide(path: str | Path, cfg, out_dir: str | Path, device: Optional[str] = None, progress: Progress = None,
                  block_px: int = 1024, stop_after_blocks: Optional[int] = None) -> dict:
    """Nuclei of one slide: OME-Zarr probability + label pyramid, detections GeoJSON, summary.

    Raises:
        SlideError, NoTissueError, ModelError, OutputError: with the file and the problem.
    """
    import zarr

    from .infer import prepare_model
    from .instances import postprocess_from
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
    post = postprocess_from(cfg.segment.postprocess, loaded.meta.get("postprocess", {}))  # the config's over the checkpoint's
    slide = open_configured_slide(path, cfg)
    sid = slide_id(slide.path)
    paths = slide_outputs(out_dir, sid)
    ensure_writable(paths["dir"])
    with slide_lock(paths["dir"], "segment"), disk_errors(paths["dir"]):
        whole = is_field_of_view(slide)
        try:
            mask, _ = tissue_stage(slide, cfg, out_dir)
        except NoTissueError:
            if not whole:
                raise
            mask = np.zeros((1, 1), bool)  # a pale crop: no tissue found, segmented whole all the same
        width, height, f = model_extent(slide, spec.mpp)  # f: level-0 px per output px
        m = cfg.tissue.mask_mpp / spec.mpp  # output px per mask px
        blocks = [(k, x0, y0) for k, (x0, y0) in enumerate(block_origins(width, height, block_px))
                  if whole or block_tissue(mask, (x0, y0), block_px, m).any()]
        final = paths["nuclei_zarr"]
        margin = model_margin_px(loaded)
        stain_target = segment_stain_target(spec, loaded)
        fingerprint = json_safe({**run_fingerprint(slide, spec, loaded.checksum, cfg, dev), "block_px": block_px,
                                 "postprocess": post.to_dict(), "margin_px": margin, "stain_norm": stain_target})
        blocks_per_s = None
        if not store_matches(final, fingerprint):
            group, _ = open_partial_store(final, fingerprint)
            if "0" not in group:
                group.create_array("0", shape=(1, height, width), chunks=(1, block_px, block_px), dtype="uint8", fill_value=0,
                                   dimension_names=("c", "y", "x"))
                group.create_array("_labels", shape=(height, width), chunks=(block_px, block_px), dtype="uint64", fill_value=0)
            finished = done_chunks(group)
            todo = [(c, x0, y0) for c, x0, y0 in blocks if c not in finished]
            prepare_model(loaded, dev)
            stain = stain_mapper(slide, stain_target, spec.mpp) if todo else None
            t0 = time.perf_counter()
            for k, (c, x0, y0) in enumerate(todo):
                bw, bh = min(block_px, width - x0), min(block_px, height - y0)
                prob, labels = segment_block(loaded.module, loaded.mean, loaded.std, slide, (x0, y0), (bw, bh), margin, spec.mpp,
                                             post, dev, cfg.run.amp, cfg.run.tta, stain)
                group["0"][0, y0: y0 + bh, x0: x0 + bw] = prob
                group["_labels"][y0: y0 + bh, x0: x0 + bw] = labels
                mark_chunk_done(group, c)
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
        if whole:  # the whole crop was segmented: its density is per image area
            tissue_mm2 = slide.dimensions[0] * slide.dimensions[1] * slide.mpp**2 / 1e6
        summary = {
            "slide": sid, "mpp": round(slide.mpp, 5), "seg_mpp": spec.mpp, "model": loaded.name,
            "model_checksum": loaded.checksum, "trained": loaded.trained, "device": str(dev),
            "nuclei_count": n_features, "nuclei_per_mm2": round(n_features / tissue_mm2, 2) if tissue_mm2 else None,
            "segmented": "whole image (a field of view)" if whole else "tissue blocks", "blocks": len(blocks), "block_px": block_px, "margin_px": margin, "blocks_per_s": blocks_per_s,
            "megapixels_per_s": round(blocks_per_s * block_px**2 / 1e6, 4) if blocks_per_s else None,
            "run_time_s": round(time.perf_counter() - start, 2),
            "postprocess": post.to_dict(),
            "stain_norm": f"{stain_target['method']} onto {stain_target.get('reference', 'a reference')}" if stain_target else None,
            "outputs": {"nuclei_zarr": str(final), "nuclei_geojson": str(paths["nuclei_geojson"])},
        }
        write_summary(summary, paths["nuclei_summary_json"])
    slide.close()
    return summary


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
    """Outline every nucleus as a QuPath detection along its pixel edges.

    Two passes over the label blocks: the first records each id's bounding box, the second
    writes each nucleus once, whole, from its own box, block by block (the block holding the
    box's top-left corner owns it; one read per block covers its nuclei), so a nucleus on a
    block edge is one detection.
    """
    from scipy import ndimage

    arr = store["labels/nuclei/0"]
    _, height, width = arr.shape
    boxes: dict[int, list[int]] = {}
    for y0 in range(0, height, block_px):
        for x0 in range(0, width, block_px):
            block = np.asarray(arr[0, y0: y0 + block_px, x0: x0 + block_px])
            if not block.any():
                continue
            for value, sl in zip(*_objects(block, ndimage)):
                box = [y0 + sl[0].start, x0 + sl[1].start, y0 + sl[0].stop, x0 + sl[1].stop]
                old = boxes.setdefault(int(value), box)
                if old is not box:
                    boxes[int(value)] = [min(old[0], box[0]), min(old[1], box[1]), max(old[2], box[2]), max(old[3], box[3])]
    owners: dict[tuple[int, int], list[int]] = {}
    for v in sorted(boxes):
        owners.setdefault((boxes[v][0] // block_px, boxes[v][1] // block_px), []).append(v)

    def features():
        for key in sorted(owners):
            owned = owners[key]
            wy0, wx0 = min(boxes[v][0] for v in owned), min(boxes[v][1] for v in owned)
            wy1, wx1 = max(boxes[v][2] for v in owned), max(boxes[v][3] for v in owned)
            window = np.asarray(arr[0, wy0:wy1, wx0:wx1])  # one read per block, not one per nucleus
            for value in owned:
                ya, xa, yb, xb = boxes[value]
                crop = window[ya - wy0: yb - wy0, xa - wx0: xb - wx0] == value
                (ext, holes), *more = pixel_pieces(crop)

                def to_slide(ring, ya=ya, xa=xa):
                    return [((xa + px) * f, (ya + py) * f) for px, py in ring]

                area_px = float(crop.sum())
                yield polygon_feature(to_slide(ext), "detection", "Nucleus", (255, 0, 255),
                                      {"area px": area_px, "area um^2": area_px * mpp**2}, f"{sid}:nucleus:{value}",
                                      holes=[to_slide(h) for h in holes],
                                      more=[(to_slide(r), [to_slide(h) for h in hs]) for r, hs in more])

    _, count = write_feature_collection(features(), path)
    return count


def _objects(block: np.ndarray, ndimage):
    values = np.unique(block)
    values = values[values > 0]
    compact = np.searchsorted(values, block) + 1
    compact[block == 0] = 0
    slices = ndimage.find_objects(compact)
    return values, slices
