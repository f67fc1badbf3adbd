"""How well a network fits: GMR and dense twins fitted for the same steps on the same fixed crops.

An underfitting layer shows here before any long training run: each variant of the nuclei
U-Net (dense convolutions, GMR with the paper's ring images, with unit-energy ring images, with one
ring per pixel radius, with an invariant-feature stem, with oriented ring energies) is trained from the same seed on one fixed batch of real MoNuSeg crops with the
training loss, and the final losses are compared (ratio GMR / dense: 1.0 means the GMR layer
fits as well as a dense one). Run with ``gmrpath benchmark fit``.

Example::

    result = run_fit_benchmark("../shared/data/nuclei/monuseg2018", steps=100)
    result["ratio_to_dense"]   # {"gmr": 1.9, "gmr_unit": ...}
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from .common import device_name

__all__ = ["VARIANTS", "TILE_VARIANTS", "fixed_nuclei_batch", "fixed_tile_batch", "run_fit_benchmark", "summarise_seeds"]

VARIANTS = {
    "dense": ("unet", {}),
    "gmr": ("gmr_unet", {}),
    "gmr_unit": ("gmr_unet", {"gmr_kwargs": {"basis_norm": "unit"}}),
    "gmr_unit_channel": ("gmr_unet", {"gmr_kwargs": {"basis_norm": "unit", "sigma": "channel"}}),
    "gmr_rings_k": ("gmr_unet", {"num_rings": [5, 5, 3, 3]}),
    "gmr_invariant": ("gmr_unet", {"invariant_scales": [1.0, 2.0]}),
    "gmr_invariant_rings_k": ("gmr_unet", {"invariant_scales": [1.0, 2.0], "num_rings": [5, 5, 3, 3], "gmr_kwargs": {"sigma": "channel"}}),
    "gmr_oriented": ("gmr_unet", {"gmr_kwargs": {"orders": [1, 2]}}),
    "gmr_invariant_oriented": ("gmr_unet", {"invariant_scales": [1.0, 2.0], "gmr_kwargs": {"orders": [1, 2]}}),
    "gmr_invariant_oriented_r4": ("gmr_unet", {"invariant_scales": [1.0, 2.0], "gmr_kwargs": {"orders": [1, 2], "reduction": 4}}),
}


TILE_VARIANTS = {
    "dense": ("resnet18", {}),
    "gmr": ("gmr_resnet18", {}),
    "gmr_invariant_oriented_r4": ("gmr_resnet18", {"invariant_scales": [1.0, 2.0], "gmr_kwargs": {"orders": [1, 2], "reduction": 4}}),
}


def fixed_tile_batch(root: str | Path, tiles: int = 16, tile_px: int = 96, mpp: float = 1.0, data_mpp: float = 0.33,
                     seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``tiles`` labelled tissue tiles (fixed by ``seed``, every class in turn), resampled to ``mpp``.

    Shape:
        returns ``(tiles, 3, tile_px, tile_px)`` normalised images and ``(tiles,)`` class ids.
    """
    from training.config import DataConfig
    from training.protocol import MEAN, STD
    from training.tilesets import tile_sets

    stream = tile_sets(DataConfig(kind="folder", root=str(root), mpp=data_mpp, val_fraction=0.0), mpp, tile_px).train
    stream = stream.view(mean=MEAN, std=STD)
    rng = np.random.default_rng(seed)
    by_class: dict[int, list] = {}
    for i, label in enumerate(stream.labels):
        by_class.setdefault(int(label), []).append(i)
    picks = [by_class[c][int(rng.integers(len(by_class[c])))] for c in (sorted(by_class) * tiles)[:tiles]]
    return torch.stack([stream[i][0] for i in picks]), torch.tensor([int(stream.labels[i]) for i in picks])


def fixed_nuclei_batch(root: str | Path, crops: int = 4, crop_px: int = 64, mpp: float = 0.5, data_mpp: float = 0.25,
                       seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``crops`` random crops (fixed by ``seed``) of real nuclei images with their training targets.

    Shape:
        returns ``(crops, 3, crop_px, crop_px)`` normalised images and ``(crops, 2, crop_px, crop_px)`` targets.
    """
    from training.config import DataConfig
    from training.datasets import load_dataset
    from training.protocol import MEAN, STD
    from training.samples import model_targets

    data = load_dataset(DataConfig(kind="nuclei", root=str(root), mpp=data_mpp, val_fraction=0.0), "segment", mpp, crop_px)
    rng = np.random.default_rng(seed)
    xs, ys = [], []
    for i in range(crops):
        s = data.train[int(rng.integers(len(data.train)))]
        target = model_targets(s)
        y0, x0 = (int(rng.integers(0, n - crop_px + 1)) for n in s.image.shape[:2])
        img = s.image[y0: y0 + crop_px, x0: x0 + crop_px].astype(np.float32) / 255.0
        xs.append((img - np.array(MEAN, np.float32)) / np.array(STD, np.float32))
        ys.append(target[y0: y0 + crop_px, x0: x0 + crop_px])
    to = lambda a: torch.from_numpy(np.stack(a)).permute(0, 3, 1, 2).contiguous().float()  # noqa: E731
    return to(xs), to(ys)


def run_fit_benchmark(root: str | Path, steps: int = 100, variants: Optional[list[str]] = None, base_channels: int = 16,
                      kernel_sizes=(5, 5, 3, 3), lr: float = 2e-3, seed: int = 0, device: str = "auto",
                      progress: Optional[Callable[[str], None]] = None, task: str = "nuclei") -> dict:
    """Fit every variant on the same batch; final loss = mean of the last 10 steps.

    Args:
        task: ``nuclei`` (U-Nets on MoNuSeg-style crops) or ``tiles`` (ResNet-18s on class-folder tiles).
    """
    if task not in ("nuclei", "tiles"):
        raise ValueError(f"task must be nuclei or tiles, got {task!r}")
    from gmr_models import create_model
    from pipeline.runtime import resolve_device
    from training.loop import segment_loss

    dev = resolve_device(device)
    table = VARIANTS if task == "nuclei" else TILE_VARIANTS
    names = variants or list(table)
    unknown = [n for n in names if n not in table]
    if unknown:
        raise ValueError(f"unknown variant(s) {unknown} for {task}; choose from {list(table)}")
    if task == "nuclei":
        x, y = (t.to(dev) for t in fixed_nuclei_batch(root, seed=seed))
        n_classes, loss_fn = 2, segment_loss
    else:
        x, y = (t.to(dev) for t in fixed_tile_batch(root, seed=seed))
        n_classes, loss_fn = int(y.max()) + 1, torch.nn.functional.cross_entropy
    result = {"task": task, "device": device_name(dev), "steps": steps, "lr": lr, "batch": list(x.shape),
              "base_channels": base_channels, "kernel_sizes": list(kernel_sizes), "curves": {}, "final_loss": {}, "params": {},
              "seconds": {}}
    for name in names:
        arch, extra = table[name]
        torch.manual_seed(seed)
        if task == "nuclei":
            net = create_model(arch, spatial_dims=2, in_channels=3, out_channels=n_classes, base_channels=base_channels,
                               kernel_sizes=list(kernel_sizes), **extra).to(dev).train()
        else:
            net = create_model(arch, spatial_dims=2, in_channels=3, num_classes=n_classes, base_channels=base_channels,
                               kernel_sizes=list(kernel_sizes), **extra).to(dev).train()
        opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
        curve, t0 = [], time.perf_counter()
        for _ in range(steps):
            loss = loss_fn(net(x).float(), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            curve.append(round(float(loss.detach()), 5))
        result["curves"][name] = curve
        result["final_loss"][name] = float(np.mean(curve[-10:]))
        result["params"][name] = sum(p.numel() for p in net.parameters())
        result["seconds"][name] = round(time.perf_counter() - t0, 1)
        if progress is not None:
            progress(f"fitted {name}: final loss {result['final_loss'][name]:.4f}")
    if "dense" in result["final_loss"]:
        result["ratio_to_dense"] = {n: round(v / result["final_loss"]["dense"], 3) for n, v in result["final_loss"].items()}
    return result


def summarise_seeds(runs: list[dict], seeds: list[int]) -> dict:
    """One result from :func:`run_fit_benchmark` runs with different seeds: mean curves, final losses
    and ratios, the ratio's range over seeds, and every run under ``runs``."""
    if len(runs) == 1:
        return {**runs[0], "seeds": list(seeds)}
    first = runs[0]
    names = list(first["final_loss"])
    out = {key: first[key] for key in ("task", "device", "steps", "lr", "batch", "base_channels", "kernel_sizes", "params")}
    out["seeds"] = list(seeds)
    out["curves"] = {n: [round(float(v), 5) for v in np.mean([r["curves"][n] for r in runs], axis=0)] for n in names}
    out["final_loss"] = {n: float(np.mean([r["final_loss"][n] for r in runs])) for n in names}
    out["seconds"] = {n: round(float(np.mean([r["seconds"][n] for r in runs])), 1) for n in names}
    if "ratio_to_dense" in first:
        out["ratio_to_dense"] = {n: round(float(np.mean([r["ratio_to_dense"][n] for r in runs])), 3) for n in names}
        out["ratio_range"] = {n: [min(r["ratio_to_dense"][n] for r in runs), max(r["ratio_to_dense"][n] for r in runs)]
                              for n in names}
    out["runs"] = runs
    return out
