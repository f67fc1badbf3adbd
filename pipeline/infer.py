"""Infer: batched model inference on tiles, on CUDA with autocast when present, else CPU.

Tiles arrive as uint8 from DataLoader workers (reading overlaps with compute) and are
converted and normalised on the device. ``tta="d4"`` averages the softmax over the 8
rotations/flips; for GMR models that changes nothing beyond float rounding.

Example:
    >>> import torch
    >>> from pipeline.config import ModelSpec
    >>> from pipeline.models import load_model
    >>> m = load_model(ModelSpec(model_kwargs={"base_channels": 4}, tile_px=32))
    >>> probs = predict_batch(m, torch.zeros(2, 32, 32, 3, dtype=torch.uint8), torch.device("cpu"))
    >>> probs.shape
    torch.Size([2, 9])
"""

from __future__ import annotations

from typing import Iterator, Optional

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from gmr_models import freeze_kernels
from gmr_models.symmetry import apply_symmetry, grid_symmetries, invert_symmetry

from .models import LoadedModel

__all__ = ["prepare_model", "to_model_input", "predict_batch", "chunk_batches", "iterate_predictions", "segment_maps"]


def prepare_model(loaded: LoadedModel, device: torch.device) -> LoadedModel:
    """Move the model to ``device`` in eval mode (channels-last: the GMR ring path's fast layout),
    with its GMR kernels frozen (built once, not at every batch)."""
    loaded.module.to(device).eval()
    loaded.module.to(memory_format=torch.channels_last)
    freeze_kernels(loaded.module)
    return loaded


def to_model_input(tiles: torch.Tensor, loaded: LoadedModel, device: torch.device) -> torch.Tensor:
    """uint8 ``(N, H, W, 3)`` -> normalised float ``(N, 3, H, W)`` on ``device``, channels-last."""
    return normalise(tiles, loaded.mean, loaded.std, device)


def normalise(tiles: torch.Tensor, mean, std, device: torch.device) -> torch.Tensor:
    """uint8 ``(N, H, W, 3)`` -> ``(x / 255 - mean) / std`` as float ``(N, 3, H, W)`` on ``device``, channels-last."""
    x = tiles.to(device, non_blocking=True).permute(0, 3, 1, 2).float().div_(255.0)
    mean = torch.tensor(mean, device=device).view(1, -1, 1, 1)
    std = torch.tensor(std, device=device).view(1, -1, 1, 1)
    return ((x - mean) / std).contiguous(memory_format=torch.channels_last)


def _autocast(device: torch.device, amp: bool):
    if amp and device.type == "cuda":
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.autocast("cuda", dtype=dtype)
    return torch.autocast(device.type, enabled=False)


def predict_batch(loaded: LoadedModel, tiles: torch.Tensor, device: torch.device, tta: str = "none", amp: bool = True) -> torch.Tensor:
    """Class probabilities of a batch of uint8 tiles.

    Shape:
        ``(N, H, W, 3)`` uint8 -> ``(N, num_classes)`` float32 on CPU.
    """
    x = to_model_input(tiles, loaded, device)
    symmetries = grid_symmetries(2) if tta == "d4" else grid_symmetries(2)[:1]
    with torch.no_grad(), _autocast(device, amp):
        probs = sum(loaded.module(apply_symmetry(x, g)).float().softmax(1) for g in symmetries) / len(symmetries)
    return probs.cpu()


def segment_maps(module: torch.nn.Module, image: np.ndarray | torch.Tensor, mean, std, device: torch.device,
                 multiple: Optional[int] = None, amp: bool = True, tta: str = "none") -> np.ndarray:
    """A segmentation network's sigmoid output maps for a whole region in one forward pass.

    The network is fully convolutional, so the region (a slide block with its margin, or a
    small image) is reflect-padded to a multiple of ``multiple`` (default: the network's
    ``size_multiple``, e.g. 8 for a 4-level U-Net; evenly on both sides where
    the padding is even, so a GMR network's maps turn exactly with the image) and run at
    once: no overlapping patches, no blending, no seams inside the region.

    Shape:
        ``(H, W, 3)`` uint8 -> ``(C, H, W)`` float32 numpy.
    """
    img = torch.from_numpy(np.array(image)) if isinstance(image, np.ndarray) and not image.flags.writeable else torch.as_tensor(image)
    h, w = img.shape[:2]
    multiple = multiple or getattr(module, "size_multiple", 1)
    x = normalise(img[None], mean, std, device)
    ph, pw = (-h) % multiple, (-w) % multiple
    top, left = ph // 2, pw // 2  # split evenly: a 90-degree rotation of the input moves no padding
    if ph or pw:
        mode = "reflect" if ph < h and pw < w else "replicate"
        x = torch.nn.functional.pad(x, (left, pw - left, top, ph - top), mode=mode)
    x = x.contiguous(memory_format=torch.channels_last)
    symmetries = grid_symmetries(2) if tta == "d4" else grid_symmetries(2)[:1]
    out = 0.0
    with torch.no_grad(), _autocast(device, amp):
        for g in symmetries:
            out = out + invert_symmetry(module(apply_symmetry(x, g)).float().sigmoid(), g)
    return (out / len(symmetries))[0, :, top: top + h, left: left + w].cpu().numpy()


def chunk_batches(groups: np.ndarray, batch_size: int) -> list[list[int]]:
    """Batches of dataset positions that never span two groups (chunks).

    A tile's result then depends only on its chunk, not on where a run started: a resumed run
    forms the same batches as an uninterrupted one and so writes bit-identical output (batched
    kernels may round differently for different batch compositions).
    """
    batches: list[list[int]] = []
    start = 0
    for end in list(np.flatnonzero(np.diff(groups)) + 1) + [len(groups)]:
        batches += [list(range(i, min(i + batch_size, end))) for i in range(start, end, batch_size)]
        start = end
    return batches


def iterate_predictions(
    loaded: LoadedModel, dataset: Dataset, device: torch.device, batch_size: int, num_workers: int,
    tta: str = "none", amp: bool = True, groups: np.ndarray | None = None,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield ``(tile indices, probabilities)`` batch by batch, in the dataset's order; with
    ``groups`` (one chunk id per dataset item, sorted) batches never span two chunks."""
    groups = np.zeros(len(dataset), np.int64) if groups is None else np.asarray(groups)
    loader = DataLoader(
        dataset, batch_sampler=chunk_batches(groups, batch_size), num_workers=num_workers,
        pin_memory=device.type == "cuda", prefetch_factor=4 if num_workers else None, persistent_workers=False,
    )
    for idx, tiles in loader:
        probs = predict_batch(loaded, tiles, device, tta, amp)
        yield idx.numpy(), probs.numpy()
