"""Throughput and memory of the slide pipeline. Run with ``gmrpath benchmark pipeline SLIDE``.

Measured in one run, on the same slide and tiles:

* ``read``: tiles/s of the DataLoader alone (workers reading and resampling tiles);
* ``model``: tiles/s of the model alone on tiles already in memory;
* ``end_to_end``: tiles/s of reading + inference together (the pipeline's loop);
* ``tiatoolbox``: the same model wrapped for TIAToolbox's ``PatchPredictor`` over the same
  slide and tissue mask, patches/s;
* ``memory``: peak resident memory of ``classify_slide`` (a fresh process each, counted from
  after the imports) on mosaics of the real tissue 1x, 4x and 16x the area.

Example::

    result = run_pipeline_benchmark("data/demo/CMU-1-Small-Region.svs", repeats=1)
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from .common import device_name

__all__ = ["run_pipeline_benchmark", "tiatoolbox_rate", "peak_rss_of"]


def _setup(slide_path, cfg):
    from pipeline.models import load_model
    from pipeline.stages import open_configured_slide
    from pipeline.tiles import make_grid
    from pipeline.tissue import detect_tissue

    slide = open_configured_slide(slide_path, cfg)
    mask = detect_tissue(slide, cfg.tissue.mask_mpp, cfg.tissue.min_object_um2)
    spec = cfg.classify
    grid = make_grid(slide, mask, cfg.tissue.mask_mpp, spec.tile_px, spec.mpp, spec.step_px, cfg.tissue.min_tissue_fraction,
                     cfg.run.chunk_tiles)
    return slide, mask, grid, load_model(spec)


def tiatoolbox_rate(slide_path: Path, mask: np.ndarray, loaded, cfg, device: torch.device, workdir: Path) -> dict:
    """Patches/s of TIAToolbox's PatchPredictor running ``loaded`` on the same slide and mask."""
    from PIL import Image
    from tiatoolbox.models.engine.io_config import IOPatchPredictorConfig
    from tiatoolbox.models.engine.patch_predictor import PatchPredictor
    from tiatoolbox.models.models_abc import ModelABC

    mean = torch.tensor(loaded.mean).view(1, -1, 1, 1)
    std = torch.tensor(loaded.std).view(1, -1, 1, 1)

    class Wrapped(ModelABC):
        def __init__(self, module):
            super().__init__()
            self.net = module

        def forward(self, x):
            return self.net(x)

        @staticmethod
        def infer_batch(model, batch_data, *, device="cpu"):
            x = torch.as_tensor(batch_data).to(device).permute(0, 3, 1, 2).float().div(255.0)
            x = (x - mean.to(device)) / std.to(device)
            with torch.no_grad():
                return model(x).softmax(1).cpu().numpy()

    model = Wrapped(copy.deepcopy(loaded.module).eval())
    mask_path = workdir / "mask.png"
    Image.fromarray(mask.astype(np.uint8) * 255).save(mask_path)
    spec = cfg.classify
    io = IOPatchPredictorConfig(
        input_resolutions=[{"units": "mpp", "resolution": spec.mpp}],
        patch_input_shape=(spec.tile_px, spec.tile_px), stride_shape=(spec.step_px, spec.step_px),
    )
    predictor = PatchPredictor(model=model, batch_size=cfg.run.batch_size, num_workers=cfg.run.num_workers,
                               device=str(device), verbose=False)
    start = time.perf_counter()
    out = predictor.run(images=[Path(slide_path)], masks=[mask_path], patch_mode=False, ioconfig=io,
                        save_dir=workdir / "tia", overwrite=True, output_type="zarr")
    seconds = time.perf_counter() - start
    n = _count_patches(out)
    return {"patches": n, "seconds": round(seconds, 2), "patches_per_s": round(n / seconds, 2) if n else None}


def _count_patches(out) -> int:
    import zarr

    path = next(iter(out.values())) if isinstance(out, dict) else out
    group = zarr.open(str(path), mode="r")
    for key in ("probabilities", "predictions", "coordinates"):
        if key in group:
            return int(group[key].shape[0])
    return 0


_CHILD = """
import json, sys, time
from pipeline.config import load_config
from pipeline.predict import classify_slide
import pipeline.infer, torch, zarr, dask.array  # imports first: their memory is the same for every slide
cfg = load_config(sys.argv[1], {"out": sys.argv[3]})
with open("/proc/self/clear_refs", "w") as f:  # reset the peak (VmHWM) to the current resident size
    f.write("5")
start = time.perf_counter()
classify_slide(sys.argv[2], cfg, cfg.out, device=sys.argv[4])
status = dict(line.split(":", 1) for line in open("/proc/self/status"))
print(json.dumps({"peak_mib": int(status["VmHWM"].split()[0]) / 1024, "rss_mib": int(status["VmRSS"].split()[0]) / 1024,
                  "seconds": time.perf_counter() - start}))
"""


def peak_rss_of(config: str, slide: Path, out: Path, device: str) -> dict:
    """Peak resident memory (MiB) of ``classify_slide`` in a fresh process, counted from after the
    imports (the kernel's high-water mark is reset there), so what remains is what the slide costs."""
    proc = subprocess.run([sys.executable, "-c", _CHILD, config, str(slide), str(out), device],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"classify_slide on {slide} failed: {proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_pipeline_benchmark(slide_path: str | Path, config: Optional[str] = None, device: str = "auto", repeats: int = 2,
                           with_tiatoolbox: bool = True, memory_scales: tuple[int, ...] = (1, 2, 4), progress=None) -> dict:
    """See the module docstring. ``memory_scales`` are mosaic repeats per side (1, 2, 4 = 1x, 4x, 16x area)."""
    from pipeline.infer import iterate_predictions, predict_batch, prepare_model
    from pipeline.runtime import resolve_device
    from pipeline.tiles import TileDataset

    from .synthetic import mosaic_tiff, read_demo_tissue

    cfg = _config(config)
    dev = resolve_device(device)
    slide, mask, grid, loaded = _setup(slide_path, cfg)
    prepare_model(loaded, dev)
    idx = np.arange(len(grid.rows))
    chunk_ids = grid.chunk_of(cfg.run.chunk_tiles)
    say = progress or (lambda msg: None)
    result: dict = {"benchmark": "pipeline", "device": device_name(dev), "slide": str(slide_path), "tiles": int(len(idx)),
                    "batch_size": cfg.run.batch_size, "num_workers": cfg.run.num_workers, "model": loaded.name,
                    "model_kwargs": cfg.classify.model_kwargs}

    def read_only():
        from torch.utils.data import DataLoader

        loader = DataLoader(TileDataset(slide.path, slide.mpp, grid, idx), batch_size=cfg.run.batch_size,
                            num_workers=cfg.run.num_workers)
        return sum(len(b[0]) for b in loader)

    tiles_mem = torch.from_numpy(np.stack([TileDataset(slide.path, slide.mpp, grid, idx)[i][1].numpy() for i in range(len(idx))]))

    def model_only():
        for s in range(0, len(idx), cfg.run.batch_size):
            predict_batch(loaded, tiles_mem[s: s + cfg.run.batch_size], dev, cfg.run.tta, cfg.run.amp)
        return len(idx)

    def end_to_end():
        ds = TileDataset(slide.path, slide.mpp, grid, idx)
        return sum(len(i) for i, _ in iterate_predictions(loaded, ds, dev, cfg.run.batch_size, cfg.run.num_workers,
                                                           cfg.run.tta, cfg.run.amp, groups=chunk_ids))

    rates: dict[str, float] = {}
    for name, fn in (("read", read_only), ("model", model_only), ("end_to_end", end_to_end)):
        say(f"timing {name}")
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            n = fn()
            best = min(best, time.perf_counter() - start)
        rates[name] = round(n / best, 2)
    result["tiles_per_s"] = rates
    result["end_to_end_vs_model"] = round(rates["end_to_end"] / rates["model"], 3)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if with_tiatoolbox:
            say("TIAToolbox PatchPredictor (its import alone takes ~45 s here)")
            tia = tiatoolbox_rate(slide.path, mask, loaded, cfg, dev, tmp)
            result["tiatoolbox"] = tia
            if tia["patches_per_s"]:
                result["end_to_end_vs_tiatoolbox"] = round(rates["end_to_end"] / tia["patches_per_s"], 3)
        if memory_scales:
            tissue = read_demo_tissue(slide.path)
            mem = []
            for rep in memory_scales:
                say(f"peak memory on a {rep}x{rep} mosaic")
                path = mosaic_tiff(tmp / f"mosaic{rep}.tif", tissue, rep, mpp=slide.mpp)
                measured = peak_rss_of(str(config or _default_config()), path, tmp / f"out{rep}", str(dev))
                from pipeline.read import open_slide

                dims = open_slide(path).dimensions
                mem.append({"repeat": rep, "area_x": rep * rep, "dimensions_px": list(dims),
                            "peak_rss_mib": round(measured["peak_mib"], 1), "seconds": round(measured["seconds"], 1)})
            result["memory"] = mem
    return result


def _default_config() -> Path:
    return Path(__file__).resolve().parents[1] / "configs" / "default.yaml"


def _config(config: Optional[str]):
    from pipeline.config import load_config

    return load_config(config or _default_config())
