"""The torch Datasets training draws from: random nuclei crops with their targets, and tiles.

Crops and augmentation depend on the seed, the epoch and the sample index only, so a resumed
run draws exactly what an uninterrupted one would.

Example::

    crops = NucleiCrops(data.train, tile_px=256, length=64, seed=0)
    x, y = crops[0]    # (3, 256, 256) image, (2, 256, 256) foreground + distance targets
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset

from .datasets import Sample, resize_image
from .targets import nuclei_targets

__all__ = ["model_targets", "NucleiCrops", "TileSamples"]


def model_targets(sample: Sample, aligned: bool = True) -> np.ndarray:
    """A nuclei sample's training targets at the model's resolution, aligned with its image.

    The foreground and distance maps are computed on the native instance mask and resized
    exactly as the image was (area averaging when shrinking), so the foreground is soft at
    nucleus borders and lies where the image's nuclei do. Nearest-neighbour labels sit a
    fraction of a pixel off (0.17 px at 0.25 -> 0.5 mpp): a shift an ordinary network can learn
    and a rotation-equivariant one cannot. ``aligned=False`` takes the nearest-neighbour labels
    instead (how the shipped nuclei model was trained). A ``semantic`` sample (binary mask,
    touching nuclei merged) has no distance target: that channel is -1, which
    :func:`training.loop.segment_loss` leaves out.

    Shape:
        ``sample.image (h, w, 3)`` -> ``(h, w, 2)`` float32 (foreground, normalised distance or -1).
    """
    native = aligned and sample.native_labels is not None and sample.native_labels.shape != sample.image.shape[:2]
    labels = sample.native_labels if native else sample.labels
    if sample.semantic:  # the foreground alone: no distance transform for a map that is unknown
        fg = (labels > 0).astype(np.float32)
        fg = resize_image(fg, sample.image.shape[:2]) if native else fg
        return np.stack([fg, np.full_like(fg, -1.0)], axis=-1)
    maps = np.stack(nuclei_targets(labels), axis=-1)
    return resize_image(maps, sample.image.shape[:2]) if native else maps


class NucleiCrops(Dataset):
    """Random ``tile_px`` crops of nuclei images with their targets, drawn reproducibly.

    Item ``i`` of epoch ``e`` comes from ``seed``, ``e`` and ``i`` alone (not from the worker
    that makes it), so a run is reproducible and resumes mid-way with the same crops.

    Shape:
        item -> image ``(3, tile_px, tile_px)`` float32 normalised, targets ``(2, tile_px, tile_px)``
        (foreground, normalised distance; see :func:`model_targets`).
    """

    def __init__(self, samples: list[Sample], tile_px: int, length: int, augment=None, seed: int = 0,
                 mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), aligned: bool = True) -> None:
        if not samples:
            raise ValueError("NucleiCrops needs at least one sample")
        self.images, self.targets = [], []
        for s in samples:  # image and targets padded alike (reflected), so they stay aligned
            self.images.append(_pad_to(s.image, tile_px))
            self.targets.append(_pad_to(model_targets(s, aligned), tile_px))
        areas = np.array([im.shape[0] * im.shape[1] for im in self.images], float)
        self.weights = areas / areas.sum()
        self.tile_px, self.length, self.augment, self.seed, self.epoch = tile_px, length, augment, seed, 0
        self.mean, self.std = np.array(mean, np.float32), np.array(std, np.float32)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int):
        rng = np.random.default_rng([self.seed, self.epoch, i])
        k = rng.choice(len(self.images), p=self.weights)
        img, tgt = self.images[k], self.targets[k]
        t = self.tile_px
        y, x = rng.integers(0, img.shape[0] - t + 1), rng.integers(0, img.shape[1] - t + 1)
        img, tgt = img[y: y + t, x: x + t], tgt[y: y + t, x: x + t]
        if self.augment is not None:
            out = self.augment(image=img, mask=tgt, seed=int(rng.integers(2**31)))
            img, tgt = out["image"], out["mask"]
        x = (img.astype(np.float32) / 255.0 - self.mean) / self.std
        return torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1))), torch.from_numpy(np.ascontiguousarray(tgt.transpose(2, 0, 1)))


class TileSamples(Dataset):
    """Classified tiles (already at the model's mpp and size) with optional augmentation.

    Shape:
        item -> image ``(3, tile_px, tile_px)`` float32 normalised, label ``()`` int64.
    """

    def __init__(self, samples: list[Sample], augment=None, seed: int = 0, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)) -> None:
        self.samples, self.augment, self.seed, self.epoch = samples, augment, seed, 0
        self.mean, self.std = np.array(mean, np.float32), np.array(std, np.float32)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        s = self.samples[i]
        img = s.image
        if self.augment is not None:
            img = self.augment(image=img, seed=int(np.random.default_rng([self.seed, self.epoch, i]).integers(2**31)))["image"]
        x = (img.astype(np.float32) / 255.0 - self.mean) / self.std
        return torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1))), torch.tensor(s.label, dtype=torch.long)


def _pad_to(arr: np.ndarray, size: int) -> np.ndarray:
    h, w = arr.shape[:2]
    ph, pw = max(0, size - h), max(0, size - w)
    if not ph and not pw:
        return arr
    pad = ((0, ph), (0, pw)) + ((0, 0),) * (arr.ndim - 2)
    return np.pad(arr, pad, mode="reflect" if arr.ndim == 3 else "constant")
