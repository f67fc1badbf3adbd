"""Augmentation from the YAML ``augment`` section, built with albumentations.

Stain and colour (HED stain jitter, HSV, brightness/contrast, gamma, greyscale), blur, noise and elastic deformation, each with
its own probability. Geometric augmentation (90-degree rotations, flips, free rotations) is
off by default: a GMR network's robustness to rotation comes from its architecture, and the
paper trains without it; switch it on for baselines. Every call is seeded, so a sample's
augmentation depends on the run's seed, the epoch and the sample index alone.

Example:
    >>> import numpy as np
    >>> from training.config import AugmentConfig
    >>> aug = build_augment(AugmentConfig())
    >>> aug(image=np.full((32, 32, 3), 200, np.uint8), seed=1)["image"].shape
    (32, 32, 3)
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from .config import AugmentConfig

__all__ = ["Augmenter", "build_augment"]


class Augmenter:
    """A seeded albumentations pipeline: ``aug(image=..., mask=..., seed=...)``.

    Shape:
        image ``(H, W, 3)`` uint8, optional mask ``(H, W[, C])`` -> the same shapes.
    """

    def __init__(self, transforms: list) -> None:
        import albumentations as A

        self.compose = A.Compose(transforms, seed=0)

    def __call__(self, image: np.ndarray, mask: Optional[np.ndarray] = None, seed: int = 0) -> dict:
        self.compose.set_random_seed(seed)
        kwargs = {"image": image} if mask is None else {"image": image, "mask": mask}
        return self.compose(**kwargs)


def build_augment(cfg: AugmentConfig) -> Optional[Augmenter]:
    """The augmentation pipeline of ``cfg``; ``None`` when every probability is 0."""
    import albumentations as A
    import cv2

    t: list = []
    if cfg.geometric:
        t += [A.RandomRotate90(p=1.0), A.HorizontalFlip(p=0.5),
              A.Rotate(limit=180, border_mode=cv2.BORDER_REFLECT_101, p=0.5)]
    if cfg.elastic:
        t.append(A.ElasticTransform(alpha=20, sigma=6, border_mode=cv2.BORDER_REFLECT_101, p=cfg.elastic))
    if cfg.hed:
        s = cfg.hed_strength
        t.append(A.HEStain(method="random_preset", intensity_scale_range=(1 - s, 1 + s),
                           intensity_shift_range=(-s / 2, s / 2), augment_background=False, p=cfg.hed))
    if cfg.hsv:
        t.append(A.HueSaturationValue(hue_shift_limit=8, sat_shift_limit=15, val_shift_limit=10, p=cfg.hsv))
    if cfg.brightness_contrast:
        t.append(A.RandomBrightnessContrast(brightness_limit=0.2, contrast_limit=0.3, p=cfg.brightness_contrast))
    if cfg.gamma:
        t.append(A.RandomGamma(gamma_limit=(60, 160), p=cfg.gamma))
    if cfg.grayscale:
        t.append(A.ToGray(num_output_channels=3, p=cfg.grayscale))
    if cfg.blur:
        t.append(A.GaussianBlur(blur_limit=(3, 5), sigma_limit=(0.1, 1.0), p=cfg.blur))
    if cfg.noise:
        t.append(A.GaussNoise(std_range=(0.01, 0.04), p=cfg.noise))
    return Augmenter(t) if t else None
