"""Nuclei segmentation speed at slide scale. Run with ``gmrpath benchmark segment [SLIDE]``.

In one run on one slide: the model alone (one block of ``block_px`` plus its margin, best of
``repeats`` forward passes) for each candidate, in megapixels per second *of output* at the
model's resolution, and ``segment_slide`` end to end (tissue, reading, model, watershed,
OME-Zarr, GeoJSON) for the first candidate, the pipeline's default. The previous default
(``gmr_unet``, base 32, kernels 9/9/5/5, random weights) is measured alongside.

Post-processing (the maps -> instances step, on the CPU whatever the device) is timed apart, on
the first candidate's maps of the slide's most tissue-filled blocks: under the checkpoint's own
rule and under the same rule with one marker height (``marker_h_dense`` off), so the cost of a
density rule is one ratio measured in one run (:func:`postprocess_timing`).

Example::

    result = run_segment_benchmark("data/demo/CMU-1-Small-Region.svs", repeats=2)
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from .common import device_name, interleaved_best_ms

__all__ = ["run_segment_benchmark", "postprocess_timing", "PREVIOUS_DEFAULT"]

PREVIOUS_DEFAULT = {"model": "gmr_unet", "model_kwargs": {"base_channels": 32, "kernel_sizes": [9, 9, 5, 5]}}


def run_segment_benchmark(slide: str | Path, models: Optional[Sequence[str]] = None, device: str = "auto", repeats: int = 2,
                          block_px: int = 1024, end_to_end: bool = True, progress=None, postprocess_blocks: int = 4,
                          mpp: Optional[float] = None) -> dict:
    """Mpx/s of the model alone per candidate, the first one's post-processing under its rule and
    under one height on up to ``postprocess_blocks`` blocks (0: not timed), and the default's
    end-to-end time on ``slide`` (``mpp``: the slide's, where the file has none)."""
    import dataclasses

    from pipeline.config import PRESETS, ModelSpec, config_from_dict
    from pipeline.infer import prepare_model, segment_maps
    from pipeline.models import load_model
    from pipeline.runtime import resolve_device
    from pipeline.segment import model_margin_px, segment_slide

    dev = resolve_device(device)
    base = ModelSpec(**PRESETS["nuclei"])
    specs = {_label(m, models or [base.model]): dataclasses.replace(base, model=m) for m in (models or [base.model])}
    specs["previous default (gmr_unet b32 9/9/5/5)"] = dataclasses.replace(base, **PREVIOUS_DEFAULT)
    rng = np.random.default_rng(0)
    fns, margins, models_loaded = {}, {}, {}
    for name, spec in specs.items():
        loaded = models_loaded[name] = prepare_model(load_model(spec, check=False), dev)
        m = model_margin_px(loaded)
        region = torch.from_numpy(rng.integers(0, 255, (block_px + 2 * m, block_px + 2 * m, 3), dtype=np.uint8))
        fns[name] = lambda lm=loaded, r=region: segment_maps(lm.module, r, lm.mean, lm.std, dev)
        margins[name] = m
    if progress:
        progress("model alone")
    best = interleaved_best_ms(fns, dev, repeats, warmup=1)
    result = {"device": device_name(dev), "block_px": block_px, "repeats": repeats, "model_alone": {
        n: {"margin_px": margins[n], "block_ms": round(best[n], 1), "megapixels_per_s": round(block_px**2 / best[n] / 1e3, 3)}
        for n in fns}}
    first = next(iter(specs))
    if postprocess_blocks > 0:
        from pipeline.read import open_slide

        if progress:
            progress(f"post-processing with {first}")
        result["postprocess"] = {"model": first, **postprocess_timing(open_slide(slide, mpp=mpp), models_loaded[first], dev,
                                                                      repeats, block_px, postprocess_blocks)}
    if end_to_end:
        if progress:
            progress(f"segment_slide end to end with {first}")
        with tempfile.TemporaryDirectory() as tmp:
            cfg = config_from_dict({"slides": str(slide), "out": tmp, "classify": None,
                                    "segment": {**PRESETS["nuclei"], "model": specs[first].model},
                                    **({"mpp": mpp} if mpp is not None else {})})
            start = time.perf_counter()
            summary = segment_slide(slide, cfg, tmp, device=device, block_px=block_px)
            wall = time.perf_counter() - start
        result["end_to_end"] = {"model": first, "wall_s": round(wall, 2), "nuclei": summary["nuclei_count"],
                                "blocks": summary["blocks"], "megapixels": round(summary["blocks"] * block_px**2 / 1e6, 2)}
        result["end_to_end"]["megapixels_per_s"] = round(result["end_to_end"]["megapixels"] / wall, 3)
    return result


def postprocess_timing(slide, loaded, device, repeats: int = 2, block_px: int = 1024, max_blocks: int = 4) -> dict:
    """Best-of-``repeats`` time of turning maps into instances, under ``loaded``'s rule and under
    the same rule with one marker height, on the maps of ``slide``'s ``max_blocks`` blocks with the
    most tissue (all blocks, first first, where no tissue is found). The network runs once per block.

    Returns:
        ``{"blocks", "block_px", "rules": {name: {"rule", "ms", "ms_per_block", "nuclei"}},
        "ratio"}``: ``nuclei`` counts the instances that reach into the blocks' cores; ``ratio``
        is the checkpoint's rule's time over one height's (absent when the checkpoint has one
        height already).

    Example::

        loaded = prepare_model(load_model(spec), torch.device("cpu"))
        postprocess_timing(open_slide("crop.png", mpp=0.25), loaded, torch.device("cpu"))["ratio"]
    """
    import dataclasses

    from pipeline.config import TissueConfig
    from pipeline.instances import instances_from_maps, postprocess_from
    from pipeline.nuclei import block_maps, block_origins, block_tissue, margin_px, model_extent, read_block
    from pipeline.tissue import NoTissueError, detect_tissue

    if max_blocks < 1:
        raise ValueError(f"max_blocks must be >= 1, got {max_blocks}")
    spec = loaded.spec
    own = postprocess_from({}, loaded.meta.get("postprocess", {}))
    rules = {"checkpoint's rule": own}
    if own.marker_h_dense is not None:
        rules["one height"] = dataclasses.replace(own, marker_h_dense=None)
    width, height, _ = model_extent(slide, spec.mpp)
    origins = block_origins(width, height, block_px)
    tissue = TissueConfig()  # the pipeline's defaults, as segment_slide finds tissue
    try:
        mask = detect_tissue(slide, tissue.mask_mpp, tissue.min_object_um2)
        filled = [float(block_tissue(mask, o, block_px, tissue.mask_mpp / spec.mpp).mean()) for o in origins]
        origins = [o for _, o in sorted(zip(filled, origins), key=lambda p: -p[0])]
    except NoTissueError:
        pass
    margin = margin_px(loaded.module)
    maps, cores = [], []
    for x0, y0 in origins[:max_blocks]:
        w, h = min(block_px, width - x0), min(block_px, height - y0)
        maps.append(block_maps(loaded.module, loaded.mean, loaded.std, read_block(slide, (x0, y0), (w, h), margin, spec.mpp), device))
        cores.append((slice(margin, margin + h), slice(margin, margin + w)))

    def run(post):
        return [instances_from_maps(m[0], m[1] if len(m) > 1 else None, post, spec.mpp) for m in maps]

    def in_cores(labels) -> int:  # instances that reach into a block's core (the margin is context only)
        return sum(int(np.count_nonzero(np.unique(lab[core]))) for lab, core in zip(labels, cores))

    best = interleaved_best_ms({name: (lambda p=post: run(p)) for name, post in rules.items()}, torch.device("cpu"),
                               repeats, warmup=1)
    out = {"blocks": len(maps), "block_px": block_px, "rules": {
        name: {"rule": post.to_dict(), "ms": round(best[name], 1), "ms_per_block": round(best[name] / len(maps), 1),
               "nuclei": in_cores(run(post))} for name, post in rules.items()}}
    if len(rules) > 1:
        out["ratio"] = round(best["checkpoint's rule"] / best["one height"], 2)
    return out


def _label(model: str, models: Sequence[str]) -> str:
    """A checkpoint's file name, with its folder when another candidate has the same name."""
    if not model.endswith(".pt"):
        return model
    path = Path(model)
    same = [m for m in models if m.endswith(".pt") and Path(m).name == path.name]
    return f"{path.parent.name}/{path.name}" if len(same) > 1 else path.name
