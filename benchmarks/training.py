"""Training throughput: images/s of one optimiser step, peak memory, and the data loader alone.

GMR networks against their ordinary-convolution twins at the same width, measured in one
run with interleaved rounds (best of ``repeats``): ``gmr_resnet18`` vs ``resnet18`` on tiles,
``gmr_unet`` vs ``unet`` on nuclei crops. The loader rate is that of the real training
datasets (random crops + albumentations) so it can be compared with the step rate: it must
not be the bottleneck. Run with ``gmrpath benchmark train``.

Example::

    result = run_training_benchmark(repeats=3)
"""

from __future__ import annotations

import time
from typing import Optional

import numpy as np
import torch

from .common import device_name, interleaved_best_ms, peak_memory_mb

__all__ = ["run_training_benchmark", "run_options_benchmark", "PAIRS", "OPTIONS"]

PAIRS = {
    "classifier": (("gmr_resnet18", "resnet18"), {"num_classes": 8, "base_channels": 16, "kernel_sizes": (9, 9, 5, 5)}, 144, 16),
    "nuclei": (("gmr_unet", "unet"), {"out_channels": 2, "base_channels": 16, "kernel_sizes": (5, 5, 3, 3)}, 128, 8),
}


def _step_fn(name, kwargs, tile, batch, device, amp, channels_last: bool = True, cpu_bf16: bool = False,
             compile: bool = False, impl: str = "auto"):
    from gmr_models import create_model

    from training.loop import _autocast, segment_loss

    torch.manual_seed(0)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    net = create_model(name, **kwargs).to(device).to(memory_format=fmt).train()
    if impl != "auto":  # every GMR layer on one path (the "auto" cost model's alternatives)
        from gmr_models.layers import GMRConv

        for m in net.modules():
            if isinstance(m, GMRConv):
                m.impl = impl
    opt = torch.optim.SGD(net.parameters(), lr=1e-3, momentum=0.9)
    run = torch.compile(net) if compile else net
    x = torch.randn(batch, 3, tile, tile, device=device).contiguous(memory_format=fmt)
    seg = "out_channels" in kwargs
    y = torch.rand(batch, 2, tile, tile, device=device) if seg else torch.randint(0, kwargs["num_classes"], (batch,), device=device)
    loss_fn = segment_loss if seg else torch.nn.functional.cross_entropy

    def step():
        with _autocast(device, amp, cpu_bf16):
            loss = loss_fn(run(x).float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def _loader_rate(kind: str, batches: int, workers: int) -> float:
    from training.augment import build_augment
    from training.config import AugmentConfig
    from training.datasets import Sample
    from training.samples import NucleiCrops, TileSamples

    rng = np.random.default_rng(0)
    aug = build_augment(AugmentConfig())
    if kind == "nuclei":
        samples = [Sample(f"s{i}", rng.integers(0, 255, (500, 500, 3), dtype=np.uint8), f"s{i}",
                          labels=(rng.random((500, 500)) > 0.7).astype(np.int32)) for i in range(4)]
        ds, batch = NucleiCrops(samples, 128, 10_000, aug), 8
    else:
        samples = [Sample(f"t{i}", rng.integers(0, 255, (144, 144, 3), dtype=np.uint8), f"t{i}", label=i % 8) for i in range(512)]
        ds, batch = TileSamples(samples, aug), 16
    loader = torch.utils.data.DataLoader(ds, batch_size=batch, num_workers=workers, shuffle=True)
    it = iter(loader)
    next(it)
    start = time.perf_counter()
    n = 0
    for _ in range(batches):
        n += len(next(it)[0])
    return n / (time.perf_counter() - start)


OPTIONS = {  # the training config's speed options, each alone against the default (channels-last, fp32 on CPU)
    "default": {},
    "contiguous": {"channels_last": False},
    "cpu_bf16": {"cpu_bf16": True},
    "compile": {"compile": True},
    "dense_path": {"impl": "dense"},
    "ring_path": {"impl": "rings"},
}


def run_options_benchmark(device: str = "auto", repeats: int = 3, options=("default", "contiguous", "cpu_bf16", "compile"),
                          progress: Optional[callable] = None, size: Optional[tuple[int, int, int]] = None) -> dict:
    """Step time of the classifier pair's GMR network under each training option, in one interleaved run
    (``compile`` compiles during its warm-up step, which is not timed). ``dense_path`` / ``ring_path``
    put every GMR layer on one path instead of the ``auto`` cost model's choice.

    Args:
        size: ``(base_channels, tile_px, batch)`` instead of the pair's (e.g. ``(64, 224, 24)``: the
            paper's NCT-CRC network and batch).
    """
    from pipeline.runtime import resolve_device

    dev = resolve_device(device)
    unknown = {part for o in options for part in o.split("+")} - set(OPTIONS)
    if unknown:
        raise ValueError(f"unknown option(s) {sorted(unknown)}; choose from {sorted(OPTIONS)} (combine with '+')")
    (name, _), kwargs, tile, batch = PAIRS["classifier"]
    if size is not None:
        kwargs, tile, batch = {**kwargs, "base_channels": size[0]}, size[1], size[2]
    if progress:
        progress(f"options: {', '.join(options)} on {name}")
    def settings(option: str) -> dict:  # "contiguous+dense_path": both
        out = {"channels_last": True}
        for part in option.split("+"):
            out.update(OPTIONS[part])
        return out

    fns = {o: _step_fn(name, kwargs, tile, batch, dev, True, **settings(o)) for o in options}
    best = interleaved_best_ms(fns, dev, repeats, warmup=1)
    base = best.get("default", next(iter(best.values())))
    return {"device": device_name(dev), "model": name, "base_channels": kwargs["base_channels"], "tile_px": tile, "batch": batch,
            "options": {o: {"step_ms": round(best[o], 1), "speed_vs_default": round(base / best[o], 3)} for o in options}}


def run_training_benchmark(device: str = "auto", repeats: int = 3, workers: int = 1, memory: bool = True,
                           progress: Optional[callable] = None) -> dict:
    """Images/s per training step and peak memory of each pair, and the loaders' images/s."""
    from pipeline.runtime import resolve_device

    dev = resolve_device(device)
    result = {"device": device_name(dev), "repeats": repeats, "pairs": {}, "loader_images_per_s": {}}
    for task, (names, kwargs, tile, batch) in PAIRS.items():
        if progress:
            progress(f"{task}: timing {' vs '.join(names)}")
        fns = {n: _step_fn(n, kwargs, tile, batch, dev, True) for n in names}
        best = interleaved_best_ms(fns, dev, repeats, warmup=1)
        rows = {}
        for n in names:
            rows[n] = {"step_ms": round(best[n], 1), "images_per_s": round(batch * 1000 / best[n], 2)}
            if memory:
                rows[n]["peak_memory_mib"] = round(peak_memory_mb(fns[n], dev), 1)
        rows["gmr_vs_conv_speed"] = round(rows[names[0]]["images_per_s"] / rows[names[1]]["images_per_s"], 3)
        result["pairs"][task] = {"models": rows, "kwargs": {k: list(v) if isinstance(v, tuple) else v for k, v in kwargs.items()},
                                 "tile_px": tile, "batch": batch}
        if progress:
            progress(f"{task}: data loader alone")
        result["loader_images_per_s"][task] = round(_loader_rate(task, 20, workers), 1)
    return result
