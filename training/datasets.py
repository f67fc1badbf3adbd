"""Labelled nuclei datasets (image/mask pairs), resampled to the model's mpp, and the image readers.

``nuclei`` sets (``images/<name>.png|tif`` + ``labels/<name>.tif|png``: instance masks, or 0/1
masks, which are split into connected components) are tens of images and are held in memory.
Tile sets (``folder``, ``csv``, ``h5``) are far larger and stream: :mod:`training.tilesets`.
Every image is resampled from the dataset's mpp to the model's, so training sees tissue at the
scale slide inference does. Splits are by whole image (or patient group), never by crop. A file that cannot be
read, an empty class folder, an image/mask size mismatch or a label out of range raises
:class:`DataError` naming the file, unless ``skip_bad`` is set, which collects them instead.

Example:
    >>> import numpy as np
    >>> resample_image(np.zeros((100, 80, 3), np.uint8), 0.25, 0.5).shape
    (50, 40, 3)
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import hashlib
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from .config import DataConfig
from .targets import resize_labels

__all__ = ["DataError", "Sample", "LoadedData", "load_dataset", "resample_image", "resize_image", "split_names",
           "read_image", "read_mask", "mpp_table", "group_of", "images_in_group",
           "IMAGE_EXTENSIONS"]

IMAGE_EXTENSIONS = (".png", ".tif", ".tiff", ".jpg", ".jpeg", ".bmp")


class DataError(ValueError):
    """A dataset file cannot be used; the message names it."""


@dataclass
class Sample:
    """One image at the model's mpp: ``image`` (H, W, 3) uint8; for nuclei ``labels`` (H, W)
    int32 and the native-resolution originals for scoring, and ``semantic`` when its mask is
    binary foreground only (touching nuclei merged: no distance target); for tiles ``label`` (int)."""

    name: str
    image: np.ndarray
    group: str
    labels: Optional[np.ndarray] = None
    label: int = -1
    native_image: Optional[np.ndarray] = None
    native_labels: Optional[np.ndarray] = None
    native_mpp: float = 0.0
    semantic: bool = False


@dataclass
class LoadedData:
    train: list
    val: list
    classes: list
    digest: str
    skipped: list = field(default_factory=list)
    stain_target: Optional[dict] = None  # nuclei: the stain target every image is mapped onto (pipeline.stain)


def read_image(path: Path) -> np.ndarray:
    """An RGB uint8 image (alpha dropped, grey expanded); DataError naming the file otherwise."""
    import tifffile
    from PIL import Image

    try:
        if path.suffix.lower() in (".tif", ".tiff"):
            arr = np.asarray(tifffile.imread(path))
        else:
            with Image.open(path) as im:
                arr = np.asarray(im.convert("RGB") if im.mode not in ("RGB", "L", "I;16", "I") else im)
    except Exception as err:  # noqa: BLE001 - any decoder failure is the file's problem
        raise DataError(f"{path}: cannot decode image ({type(err).__name__}: {err})") from None
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=2)
    if arr.ndim != 3 or arr.shape[2] not in (3, 4):
        raise DataError(f"{path}: expected an RGB image, got shape {arr.shape}")
    arr = arr[..., :3]
    if arr.dtype != np.uint8:
        if arr.max() > 255:
            raise DataError(f"{path}: expected 8-bit RGB, got {arr.dtype} with values up to {arr.max()}")
        arr = arr.astype(np.uint8)
    return np.ascontiguousarray(arr)


def read_mask(path: Path) -> np.ndarray:
    """An instance mask (0 background, 1..N); a 0/1 (or 0/255) mask becomes connected components,
    and an RGB mask with one colour per nucleus (black background) one id per colour."""
    import tifffile
    from PIL import Image
    from scipy import ndimage

    try:
        arr = np.asarray(tifffile.imread(path)) if path.suffix.lower() in (".tif", ".tiff") else np.asarray(Image.open(path))
    except Exception as err:  # noqa: BLE001
        raise DataError(f"{path}: cannot decode mask ({type(err).__name__}: {err})") from None
    if arr.ndim == 3 and arr.shape[2] in (3, 4):
        rgb = arr[..., :3]
        if (rgb == rgb[..., :1]).all():  # grey stored as RGB
            arr = rgb[..., 0]
        else:  # one colour per nucleus (colour-coded instance masks): each distinct colour is one id, black is background
            colours, ids = np.unique(rgb.reshape(-1, 3), axis=0, return_inverse=True)
            black = np.flatnonzero((colours == 0).all(1))
            ids = ids.reshape(rgb.shape[:2]) + 1
            if black.size:
                ids[ids == black[0] + 1] = 0
            arr = ids.astype(np.int32)
    elif arr.ndim == 3:
        raise DataError(f"{path}: a mask with {arr.shape[2]} channels; expected one (ids) or RGB (one colour per nucleus)")
    if arr.ndim != 2 or not np.issubdtype(arr.dtype, np.integer) or arr.min() < 0:
        raise DataError(f"{path}: expected a 2D non-negative integer mask, got {arr.dtype} {arr.shape}")
    values = np.unique(arr)
    if values.size <= 2 and values.max() in (1, 255):  # binary: all that some datasets have
        arr, _ = ndimage.label(arr > 0)
    return arr.astype(np.int32)


def resample_image(image: np.ndarray, from_mpp: float, to_mpp: float) -> np.ndarray:
    """Resize an image from ``from_mpp`` to ``to_mpp`` (area averaging when shrinking).

    Shape:
        ``(H, W, C) -> (round(H * from/to), round(W * from/to), C)``.
    """
    f = from_mpp / to_mpp
    if abs(f - 1) < 1e-3:
        return image
    h, w = image.shape[:2]
    return resize_image(image, (max(1, round(h * f)), max(1, round(w * f))))


def resize_image(image: np.ndarray, size_hw: tuple[int, int]) -> np.ndarray:
    """Resize an image (or float maps) to ``size_hw``: area averaging when shrinking, else linear.

    Shape:
        ``(H, W[, C]) -> (*size_hw[, C])``.
    """
    import cv2

    h, w = size_hw
    shrink = h * w < image.shape[0] * image.shape[1]
    return cv2.resize(image, (w, h), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)


def mpp_table(cfg: DataConfig) -> dict[str, float]:
    if cfg.mpp_csv is None:
        return {}
    table = {}
    with open(cfg.mpp_csv, newline="") as fh:
        for row in csv.DictReader(fh):
            key = row.get("image") or row.get("name") or row.get("slide")
            value = row.get("mpp") or row.get("mpp_nominal")
            if key is None or value is None:
                raise DataError(f"{cfg.mpp_csv}: needs columns image and mpp (or mpp_nominal)")
            table[Path(key).stem] = float(value)
    return table


def _image_mpp(cfg: DataConfig, table: dict, name: str, path: Path) -> float:
    if name in table:
        return table[name]
    if cfg.mpp is None:
        raise DataError(f"{path}: no mpp for {name!r} in {cfg.mpp_csv}")
    return float(cfg.mpp)


def split_names(names: list[str], groups: dict[str, str], cfg: DataConfig) -> tuple[set, set]:
    """Train and validation names: whole images (or whole patient groups) on one side.

    From ``cfg.split_csv`` (``image,split``) when given (images it does not name are left out of
    both sides: a CSV may pick a few images), else ``cfg.val_fraction`` of the
    groups drawn with ``cfg.seed``.
    """
    if cfg.split_csv is not None:
        table = {}
        with open(cfg.split_csv, newline="") as fh:
            for row in csv.DictReader(fh):
                if row.get("split") not in ("train", "val"):
                    raise DataError(f"{cfg.split_csv}: split must be 'train' or 'val', got {row.get('split')!r} for {row.get('image')!r}")
                table[Path(row["image"]).stem] = row["split"]
        named = [n for n in names if n in table]  # images the CSV leaves out are used by neither side
        if not named:
            raise DataError(f"{cfg.split_csv}: names none of the {len(names)} image(s) in the dataset (first {names[0]!r})")
        val = {n for n in named if table[n] == "val"}
        return set(named) - val, val
    elif cfg.folds:
        uniq = sorted(set(groups[n] for n in names))
        random.Random(cfg.seed).shuffle(uniq)
        val_groups = set(uniq[cfg.fold:: cfg.folds])
        val = {n for n in names if groups[n] in val_groups}
    else:
        uniq = sorted(set(groups[n] for n in names))
        random.Random(cfg.seed).shuffle(uniq)
        n_val = round(len(uniq) * cfg.val_fraction)
        if cfg.val_fraction > 0 and n_val == 0 and len(uniq) > 1:
            n_val = 1
        val_groups = set(uniq[:n_val])
        val = {n for n in names if groups[n] in val_groups}
    return set(names) - val, val


@functools.lru_cache(maxsize=8)
def _group_table(path: str, column: str, stamp: tuple) -> dict[str, str]:  # stamp: (mtime, size), so an edited CSV is re-read
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    if not rows or "image" not in rows[0] or column not in rows[0]:
        raise DataError(f"{path}: needs 'image' and {column!r} columns (data.groups_csv / data.group_column)")
    return {Path(r["image"]).stem: r[column] for r in rows}


def _groups(path: Path, column: str) -> dict[str, str]:
    """Image stem -> its ``column`` in the CSV at ``path``, cached until the file changes."""
    st = path.stat()
    return _group_table(str(path), column, (st.st_mtime_ns, st.st_size))


def images_in_group(path: str | Path, column: str, values: Sequence[str]) -> set[str]:
    """The image names (stems) whose ``column`` in the CSV at ``path`` is one of ``values``.

    Example:
        ``images_in_group("configs/splits/monuseg2018.csv", "organ", ["prostate"])``: the six prostate images.

    Raises:
        DataError: no such file or column, or a value that no image has (the known values are listed).
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: groups CSV not found")
    table = _groups(path, column)
    known, wanted = sorted(set(table.values())), set(values)
    missing = [v for v in values if v not in known]
    if missing:
        raise DataError(f"{path}: no image has {column} {', '.join(map(repr, missing))} (known: {', '.join(known)})")
    return {name for name, value in table.items() if value in wanted}


def group_of(cfg: DataConfig, name: str) -> str:
    """The group of an image name: its row in ``cfg.groups_csv``, else ``cfg.group_regex``'s first
    group, else the name itself."""
    if cfg.groups_csv:
        table = _groups(Path(cfg.groups_csv), cfg.group_column)
        if Path(name).stem not in table:
            raise DataError(f"{cfg.groups_csv}: names no group for image {name!r}")
        return table[Path(name).stem]
    if cfg.group_regex:
        m = re.search(cfg.group_regex, name)
        if m and m.groups():
            return m.group(1)
    return name


def _digest(paths: list[Path]) -> str:
    h = hashlib.sha256()
    for p in sorted(paths):
        h.update(p.name.encode())
        h.update(hashlib.md5(p.read_bytes()).digest())
    return h.hexdigest()[:16]


def _load_nuclei(cfg: DataConfig, model_mpp: float, skip_bad: bool) -> tuple[list[Sample], list[str], list[Path]]:
    root = Path(cfg.root)
    img_dir, lab_dir = root / cfg.images, root / cfg.labels
    for d in (img_dir, lab_dir):
        if not d.is_dir():
            raise DataError(f"{d}: folder not found (data.kind nuclei expects {cfg.images}/ and {cfg.labels}/ under {root})")
    images = sorted(p for p in img_dir.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
    if not images:
        raise DataError(f"{img_dir}: no images ({', '.join(IMAGE_EXTENSIONS)})")
    masks = {p.stem: p for p in lab_dir.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS}
    table = mpp_table(cfg)
    samples, skipped, used = [], [], []
    for path in images:
        try:
            if path.stem not in masks:
                raise DataError(f"{path}: no mask named {path.stem}.* in {lab_dir}")
            image, labels = read_image(path), read_mask(masks[path.stem])
            if image.shape[:2] != labels.shape:
                raise DataError(f"{masks[path.stem]}: mask size {labels.shape} differs from image size {image.shape[:2]} ({path.name})")
            mpp = _image_mpp(cfg, table, path.stem, path)
        except DataError as err:
            if not skip_bad:
                raise
            skipped.append(str(err))
            continue
        small = resample_image(image, mpp, model_mpp)
        samples.append(Sample(path.stem, small, group_of(cfg, path.stem), labels=resize_labels(labels, small.shape[:2]),
                              native_image=image, native_labels=labels, native_mpp=mpp, semantic=cfg.semantic))
        used += [path, masks[path.stem]]
    return samples, skipped, used


def load_dataset(cfg: DataConfig, task: str, model_mpp: float, tile_px: int = 0, skip_bad: bool = False) -> LoadedData:
    """Read, resample and split a nuclei dataset (images and masks in memory: tens of images),
    adding the training side of each of ``cfg.extra`` to the training images.

    Raises:
        DataError: naming the first bad file (unless ``skip_bad``), or when nothing is left.
    """
    if task != "segment" or cfg.kind != "nuclei":
        raise DataError(f"{cfg.root}: load_dataset reads nuclei sets (task segment, data.kind nuclei); "
                        "tile sets stream through training.tilesets.tile_sets")
    samples, skipped, used = _load_nuclei(cfg, model_mpp, skip_bad)
    classes = ["nucleus"]
    if not samples:
        raise DataError(f"{cfg.root}: no usable samples" + (f" ({len(skipped)} skipped)" if skipped else ""))
    train, val = split_names([s.name for s in samples], {s.name: s.group for s in samples}, cfg)
    train_samples = [s for s in samples if s.name in train]
    for extra in cfg.extra:  # training images only; names are kept apart by their set's folder
        more, more_skipped, more_used = _load_nuclei(extra, model_mpp, skip_bad)
        if not more:
            raise DataError(f"{extra.root}: no usable samples in data.extra" + (f" ({len(more_skipped)} skipped)" if more_skipped else ""))
        keep = split_names([s.name for s in more], {s.name: s.group for s in more}, extra)[0] if extra.split_csv else {s.name for s in more}
        tag = Path(extra.root).name
        train_samples += [dataclasses.replace(s, name=f"{tag}/{s.name}") for s in more if s.name in keep]
        skipped, used = skipped + more_skipped, used + more_used
    return LoadedData(train_samples, [s for s in samples if s.name in val], classes, _digest(used), skipped)
