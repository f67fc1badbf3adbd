"""Nuclei segmentation speed at slide scale. Run with ``gmrpath benchmark segment [SLIDE]``.

In one run on one slide: the model alone (one block of ``block_px`` plus its margin, best of
``repeats`` forward passes) for each candidate, in megapixels per second *of output* at the
model's resolution, and ``segment_slide`` end to end (tissue, reading, model, watershed,
OME-Zarr, GeoJSON) for the first candidate, the pipeline's default. The previous default
(``gmr_unet``, base 32, kernels 9/9/5/5, random weights) is measured alongside.

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

__all__ = ["run_segment_benchmark", "PREVIOUS_DEFAULT"]

PREVIOUS_DEFAULT = {"model": "gmr_unet", "model_kwargs": {"base_channels": 32, "kernel_sizes": [9, 9, 5, 5]}}


def run_segment_benchmark(slide: str | Path, models: Optional[Sequence[str]] = None, device: str = "auto", repeats: int = 2,
                          block_px: int = 1024, end_to_end: bool = True, progress=None) -> dict:
    """Mpx/s of the model alone per candidate, and the default's end-to-end time on ``slide``."""
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
    fns, margins = {}, {}
    for name, spec in specs.items():
        loaded = prepare_model(load_model(spec, check=False), dev)
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
    if end_to_end:
        if progress:
            progress(f"segment_slide end to end with {first}")
        with tempfile.TemporaryDirectory() as tmp:
            cfg = config_from_dict({"slides": str(slide), "out": tmp, "classify": None,
                                    "segment": {**PRESETS["nuclei"], "model": specs[first].model}})
            start = time.perf_counter()
            summary = segment_slide(slide, cfg, tmp, device=device, block_px=block_px)
            wall = time.perf_counter() - start
        result["end_to_end"] = {"model": first, "wall_s": round(wall, 2), "nuclei": summary["nuclei_count"],
                                "blocks": summary["blocks"], "megapixels": round(summary["blocks"] * block_px**2 / 1e6, 2)}
        result["end_to_end"]["megapixels_per_s"] = round(result["end_to_end"]["megapixels"] / wall, 3)
    return result


def _label(model: str, models: Sequence[str]) -> str:
    """A checkpoint's file name, with its folder when another candidate has the same name."""
    if not model.endswith(".pt"):
        return model
    path = Path(model)
    same = [m for m in models if m.endswith(".pt") and Path(m).name == path.name]
    return f"{path.parent.name}/{path.name}" if len(same) > 1 else path.name
