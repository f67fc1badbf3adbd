"""The tile loaders alone, at the real sets' sizes: start-up time, peak memory and items/s.

The benchmark writes its own synthetic sets in the real layouts from the real demo tissue, once
(reused after): NCT-CRC-HE-100K-shaped class folders of 224 px TIFFs (1k / 10k / 50k files; the
distinct tiles are hard-linked, so listing and decoding cost what copies would) and PCam-shaped
chunked HDF5 files of 96 px tiles (4k / 32k / 262k rows, chunked one row at a time, uncompressed
as PCam's files are once unpacked). Each size is measured in a fresh process, so its peak
resident memory is its own: start-up (indexing and splitting, the time before the first batch can
be asked for), peak RSS of the main process, and items/s of a DataLoader with the configured
workers (augmentation on, as in training). The loader's rate is set against one training step
of the paper's ``gmr_resnet18`` at the paper's batch (24 x 224 px; 64 x 96 px) on the same
machine: the loader must keep up. Run with ``gmrpath benchmark data``.

Example::

    result = run_data_benchmark("results/benchmarks/data_sets", sizes={"nct_crc": [200], "pcam": [512]}, batches=4)
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Optional

__all__ = ["run_data_benchmark", "LAYOUTS", "measure_loader"]

LAYOUTS = {
    "nct_crc": {"sizes": [1000, 10000, 50000], "tile_px": 224, "batch": 24, "mpp": 0.5},
    "pcam": {"sizes": [4096, 32768, 262144], "tile_px": 96, "batch": 64, "mpp": 0.972},
}


def _ensure_set(root: Path, layout: str, n: int, log: Callable[[str], None]) -> Path:
    """The synthetic set, written once to a temporary folder renamed when complete."""
    from benchmarks.synthetic import demo_slide_path, read_demo_tissue, tissue_tiles, write_pcam_h5, write_tile_folder

    final = root / f"{layout}_{n}"
    if final.is_dir():
        return final
    tmp = root / f".{layout}_{n}.part"
    shutil.rmtree(tmp, ignore_errors=True)
    tile_px = LAYOUTS[layout]["tile_px"]
    log(f"writing a {layout}-shaped set of {n} tiles (once) under {final}")
    tiles = tissue_tiles(read_demo_tissue(demo_slide_path()), 256, tile_px, seed=0)
    if layout == "nct_crc":
        write_tile_folder(tmp, tiles, n)
    else:
        write_pcam_h5(tmp, "train", tiles, n, chunk_rows=1)
    tmp.replace(final)
    return final


def measure_loader(layout: str, path: str, workers: int, batches: int) -> dict:
    """Start-up (``index_s``: listing and splitting; ``startup_s``: up to a loader that can be asked for a
    batch, the augmentation pipeline built), items/s and peak RSS of one loader, in this process (call
    it in a fresh one)."""
    import torch

    from training.augment import build_augment
    from training.config import AugmentConfig, DataConfig
    from training.tilesets import tile_sets

    spec = LAYOUTS[layout]
    kind = "folder" if layout == "nct_crc" else "h5"
    t0 = time.perf_counter()
    data = tile_sets(DataConfig(kind=kind, root=path, mpp=spec["mpp"], val_fraction=0.0), spec["mpp"], spec["tile_px"],
                     log=lambda s: None)
    index_s = time.perf_counter() - t0
    stream = data.train.view(build_augment(AugmentConfig()), seed=0)
    startup_s = time.perf_counter() - t0
    loader = torch.utils.data.DataLoader(stream, batch_size=spec["batch"], shuffle=True, num_workers=workers,
                                         generator=torch.Generator().manual_seed(0))
    it = iter(loader)
    next(it)
    t1 = time.perf_counter()
    n = 0
    for _ in range(batches):
        try:
            batch = next(it)
        except StopIteration:  # a set smaller than the batches asked for: go round again
            it = iter(loader)
            batch = next(it)
        n += len(batch[1])
    rate = n / (time.perf_counter() - t1)
    return {"tiles": len(stream), "index_s": round(index_s, 3), "startup_s": round(startup_s, 3), "items_per_s": round(rate, 1),
            "peak_rss_mib": round(_peak_rss_mib(), 1)}


def _peak_rss_mib() -> float:
    """This process's peak resident memory: VmHWM (reset at exec, unlike ru_maxrss, which a child
    started from a large parent inherits), else ru_maxrss."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _measure_in_child(layout: str, path: Path, workers: int, batches: int) -> dict:
    code = ("import json, sys; from benchmarks.data import measure_loader; "
            f"print(json.dumps(measure_loader({layout!r}, {str(path)!r}, {workers}, {batches})))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
    if out.returncode != 0:
        raise RuntimeError(f"measuring {path} failed: {out.stderr.strip().splitlines()[-1] if out.stderr else out.returncode}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _step_rate(layout: str, device, repeats: int, base_channels: int) -> dict:
    """Images/s of one training step of the paper's gmr_resnet18 at the paper's batch and tile size."""
    import torch

    from gmr_models import create_model
    from benchmarks.common import interleaved_best_ms

    spec = LAYOUTS[layout]
    torch.manual_seed(0)
    net = create_model("gmr_resnet18", num_classes=9 if layout == "nct_crc" else 2, base_channels=base_channels)
    net = net.to(device).to(memory_format=torch.channels_last).train()
    opt = torch.optim.SGD(net.parameters(), lr=1e-3, momentum=0.9)
    x = torch.randn(spec["batch"], 3, spec["tile_px"], spec["tile_px"], device=device).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 2, (spec["batch"],), device=device)

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = torch.nn.functional.cross_entropy(net(x).float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    ms = interleaved_best_ms({"step": step}, device, repeats, warmup=1)["step"]
    return {"step_ms": round(ms, 1), "images_per_s": round(spec["batch"] * 1000 / ms, 1), "batch": spec["batch"],
            "base_channels": base_channels}


def run_data_benchmark(root: str | Path, sizes: Optional[dict] = None, workers: int = 2, batches: int = 20,
                       step: bool = True, device: str = "auto", step_repeats: int = 2, base_channels: int = 64,
                       progress: Optional[Callable[[str], None]] = None) -> dict:
    """Loader start-up, peak memory and items/s per layout and size, against the training step.

    Args:
        root: where the synthetic sets are written (once) and reused.
        sizes: ``{"nct_crc": [...], "pcam": [...]}``; default :data:`LAYOUTS`' sizes (the real sets').
        step: also time one training step of ``gmr_resnet18`` (``base_channels`` wide) per layout.
    """
    from benchmarks.common import device_name
    from pipeline.runtime import resolve_device

    log = progress or (lambda s: None)
    sizes = sizes or {k: v["sizes"] for k, v in LAYOUTS.items()}
    unknown = set(sizes) - set(LAYOUTS)
    if unknown:
        raise ValueError(f"unknown layout(s) {sorted(unknown)}; choose from {sorted(LAYOUTS)}")
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    dev = resolve_device(device)
    result = {"device": device_name(dev), "workers": workers, "batches": batches, "layouts": {}}
    for layout, ns in sizes.items():
        rows = {}
        for n in ns:
            path = _ensure_set(root, layout, int(n), log)
            log(f"{layout} {n}: measuring the loader ({workers} workers, {batches} batches)")
            rows[str(n)] = _measure_in_child(layout, path, workers, batches)
        rss = [r["peak_rss_mib"] for r in rows.values()]
        entry = {"sizes": rows, "startup_s_max": max(r["startup_s"] for r in rows.values()),
                 "memory_growth": round(max(rss) / min(rss) - 1, 3)}
        if step:
            log(f"{layout}: one training step of gmr_resnet18 at batch {LAYOUTS[layout]['batch']}")
            entry["train_step"] = _step_rate(layout, dev, step_repeats, base_channels)
            slowest = min(r["items_per_s"] for r in rows.values())
            entry["loader_vs_step"] = round(slowest / entry["train_step"]["images_per_s"], 2)
        result["layouts"][layout] = entry
    return result
