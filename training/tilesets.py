"""Tile sets that stream: indexed without decoding a pixel, read one item at a time in the workers.

NCT-CRC-HE-100K is 100,000 TIFF tiles of 224 px and PCam's training file 262,144 tiles of
96 px: neither fits in memory beside a model, so nothing here holds pixels. ``folder`` (one
folder per class) and ``csv`` (``path,label``) sets are indexed by listing files; ``h5`` sets
(PCam's ``*_x.h5`` / ``*_y.h5``, as distributed: ``.h5`` or ``.h5.gz``, which is unpacked once)
read their labels only. Each item is decoded, resampled to the model's mpp, centre-cropped to
``tile_px``, augmented and normalised when a DataLoader worker asks for it; an HDF5 file is
opened once per worker. Splits are made from names: a second folder (``val_root``, NCT-CRC's
CRC-VAL-HE-7K), PCam's own ``train`` / ``valid`` / ``test`` files, or ``val_fraction`` of the
groups. A file found bad mid-epoch raises :class:`~training.datasets.DataError` naming it; with
``skip_bad`` the item comes back marked (label -1 and the message) and the caller drops and
lists it.

Example::

    data = tile_sets(DataConfig(kind="folder", root="NCT-CRC-HE-100K", val_root="CRC-VAL-HE-7K", mpp=0.5), 0.5, 224)
    x, label, error = data.train[0]     # (3, 224, 224) float32, class id, "" (or the message of a bad file)
"""

from __future__ import annotations

import copy
import csv
import gzip
import hashlib
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
from torch.utils.data import Dataset

from .config import DataConfig
from .datasets import IMAGE_EXTENSIONS, DataError, group_of, mpp_table, read_image, resample_image, split_names

__all__ = ["TileStream", "TileData", "tile_sets", "tile_split", "fit_tile", "worker_error", "batches", "H5_SPLITS", "PCAM_CLASSES"]

H5_SPLITS = ("train", "valid", "test")
PCAM_CLASSES = ["normal", "tumour"]


def fit_tile(image: np.ndarray, tile_px: int) -> np.ndarray:
    """Centre crop (or reflect-pad) to ``tile_px`` square: the scale is kept, never stretched.

    Shape:
        ``(H, W, 3) -> (tile_px, tile_px, 3)``.
    """
    h, w = image.shape[:2]
    if h < tile_px or w < tile_px:
        ph, pw = max(0, tile_px - h), max(0, tile_px - w)
        image = np.pad(image, ((ph // 2, ph - ph // 2), (pw // 2, pw - pw // 2), (0, 0)), mode="reflect")
        h, w = image.shape[:2]
    y, x = (h - tile_px) // 2, (w - tile_px) // 2
    return np.ascontiguousarray(image[y: y + tile_px, x: x + tile_px])


def worker_error(err: BaseException) -> str:
    """The one line that matters of an error re-raised from a DataLoader worker (torch appends
    the worker's traceback to the message)."""
    lines = [ln for ln in str(err).strip().splitlines() if ln.strip()]
    last = lines[-1] if lines else str(err)
    return last.split("DataError: ", 1)[-1]


class TileStream(Dataset):
    """Labelled tiles read on demand: files (one per tile) or rows of HDF5 files.

    Args:
        names: one name per item (``CLASS/stem`` for files, ``file/row`` for HDF5).
        labels: class id per item.
        sources: the file of each item (files), or the ``*_x.h5`` paths with ``rows`` and
            ``file_ids`` saying which row of which file.
        mpps: the data's µm/px per item (or one value), resampled to ``model_mpp``.
        raw: items are the fitted uint8 tiles ``(tile_px, tile_px, 3)`` (no augmentation, no
            normalisation), for evaluation that rotates them itself.

    Shape:
        item -> ``(3, tile_px, tile_px)`` float32 normalised (``raw``: ``(tile_px, tile_px, 3)`` uint8),
        label ``()`` int64, error message (``""`` unless the item's file was bad under ``skip_bad``).
    """

    def __init__(self, names: list[str], labels: np.ndarray, sources: list[str], mpps, model_mpp: float, tile_px: int,
                 rows: Optional[np.ndarray] = None, file_ids: Optional[np.ndarray] = None, skip_bad: bool = False) -> None:
        self.names, self.labels, self.sources = names, np.asarray(labels, np.int64), sources
        self.mpps = np.broadcast_to(np.asarray(mpps, np.float64), (len(self.labels),))
        self.model_mpp, self.tile_px, self.skip_bad = float(model_mpp), int(tile_px), skip_bad
        self.rows, self.file_ids = rows, file_ids
        self.augment, self.seed, self.epoch, self.raw = None, 0, 0, False
        self.mean, self.std = np.full(3, 0.5, np.float32), np.full(3, 0.5, np.float32)
        self._h5: dict = {}
        self._pid = -1

    def view(self, augment=None, seed: int = 0, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), raw: bool = False) -> "TileStream":
        """The same items with augmentation and normalisation set (a shallow copy)."""
        out = copy.copy(self)
        out.augment, out.seed, out.raw, out._h5, out._pid = augment, seed, raw, {}, -1
        out.mean, out.std = np.array(mean, np.float32), np.array(std, np.float32)
        return out

    def subset(self, keep: np.ndarray) -> "TileStream":
        """The items where ``keep`` (bool mask or indices) holds."""
        idx = np.flatnonzero(keep) if np.asarray(keep).dtype == bool else np.asarray(keep, np.int64)
        out = copy.copy(self)
        out.names = [self.names[i] for i in idx] if self.names is not None else None
        out.labels, out.mpps = self.labels[idx], self.mpps[idx]
        if self.rows is None:
            out.sources = [self.sources[i] for i in idx]
        else:
            out.rows, out.file_ids = self.rows[idx], self.file_ids[idx]
        out._h5, out._pid = {}, -1
        return out

    def __getstate__(self):  # HDF5 handles stay in the process that opened them
        return {**self.__dict__, "_h5": {}, "_pid": -1}

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.labels)

    def name(self, i: int) -> str:
        if self.names is not None:
            return self.names[i]
        return f"{Path(self.sources[self.file_ids[i]]).name}/{int(self.rows[i])}"

    def _read(self, i: int) -> np.ndarray:
        if self.rows is None:
            return read_image(Path(self.sources[i]))
        import h5py

        if self._pid != os.getpid():  # a new worker: its own handles
            self._h5, self._pid = {}, os.getpid()
        fid = int(self.file_ids[i])
        path = self.sources[fid]
        try:
            if fid not in self._h5:
                self._h5[fid] = h5py.File(path, "r")["x"]
            image = np.asarray(self._h5[fid][int(self.rows[i])])
        except Exception as err:  # noqa: BLE001 - a damaged chunk is the file's problem
            raise DataError(f"{path}: cannot read row {int(self.rows[i])} ({type(err).__name__}: {err})") from None
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise DataError(f"{path}: row {int(self.rows[i])} is {image.dtype} {image.shape}, expected RGB uint8 tiles")
        return image

    def __getitem__(self, i: int):
        try:
            image = fit_tile(resample_image(self._read(i), float(self.mpps[i]), self.model_mpp), self.tile_px)
        except DataError as err:
            if not self.skip_bad:
                raise
            blank = torch.zeros((self.tile_px, self.tile_px, 3) if self.raw else (3, self.tile_px, self.tile_px),
                                dtype=torch.uint8 if self.raw else torch.float32)
            return blank, torch.tensor(-1), str(err)
        label = torch.tensor(int(self.labels[i]))
        if self.raw:
            return torch.from_numpy(image), label, ""
        if self.augment is not None:
            image = self.augment(image=image, seed=int(np.random.default_rng([self.seed, self.epoch, i]).integers(2**31)))["image"]
        x = (image.astype(np.float32) / 255.0 - self.mean) / self.std
        return torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1))), label, ""


@dataclass
class TileData:
    """The train and validation sides of a tile set, its class names and a digest of its files."""

    train: TileStream
    val: Optional[TileStream]
    classes: list
    digest: str
    skipped: list = field(default_factory=list)
    test: Optional[TileStream] = None


def _listing(root: Path) -> tuple[list[tuple[str, str, int]], list[str]]:
    """``(path, class, size)`` of every image under ``root/<class>/`` (no decoding)."""
    if not root.is_dir():
        raise DataError(f"{root}: folder not found (data.kind folder expects one sub-folder per class)")
    folders = sorted((e for e in os.scandir(root) if e.is_dir()), key=lambda e: e.name)
    if not folders:
        raise DataError(f"{root}: no class folders")
    rows = []
    for folder in folders:
        files = sorted((e for e in os.scandir(folder.path) if e.is_file() and e.name.lower().endswith(IMAGE_EXTENSIONS)),
                       key=lambda e: e.name)
        if not files:
            raise DataError(f"{folder.path}: empty class folder (no {', '.join(IMAGE_EXTENSIONS)} files)")
        rows += [(e.path, folder.name, e.stat().st_size) for e in files]
    return rows, [f.name for f in folders]


def _csv_rows(path: Path) -> tuple[list[tuple[str, str, int]], list[str]]:
    if not path.is_file():
        raise DataError(f"{path}: CSV not found")
    rows = []
    with open(path, newline="") as fh:
        for i, row in enumerate(csv.DictReader(fh), start=2):
            if not row.get("path") or row.get("label") in (None, ""):
                raise DataError(f"{path}: line {i} needs columns path and label")
            p = Path(row["path"])
            rows.append((str(p if p.is_absolute() else path.parent / p), row["label"], 0))
    if not rows:
        raise DataError(f"{path}: no rows")
    return rows, sorted({label for _, label, _ in rows})


def _file_stream(root: Path, cfg: DataConfig, model_mpp: float, tile_px: int, classes: Optional[list], skip_bad: bool):
    rows, found = _listing(root) if cfg.kind == "folder" else _csv_rows(root)
    classes = classes or (list(cfg.classes) if cfg.classes else found)
    index = {str(c): i for i, c in enumerate(classes)}
    bad = next((r for r in rows if r[1] not in index), None)
    if bad is not None:
        raise DataError(f"{bad[0]}: label {bad[1]!r} is not one of the classes {classes}")
    table = mpp_table(cfg)
    mpps = [table.get(Path(p).stem, cfg.mpp) for p, _, _ in rows]
    missing = next((p for p, m in zip(rows, mpps) if m is None), None)
    if missing is not None:
        raise DataError(f"{missing[0]}: no mpp for {Path(missing[0]).stem!r} in {cfg.mpp_csv}")
    stream = TileStream([f"{c}/{Path(p).stem}" for p, c, _ in rows], np.array([index[c] for _, c, _ in rows]),
                        [p for p, _, _ in rows], np.array(mpps, float), model_mpp, tile_px, skip_bad=skip_bad)
    digest = [(f"{c}/{Path(p).name}", s) for p, c, s in rows]
    return stream, classes, digest


def unpacked_h5(path: Path, log: Callable[[str], None] = print) -> Path:
    """``X.h5`` for ``X.h5`` or ``X.h5.gz`` (PCam as distributed): a gzipped file is unpacked once,
    beside it (or under ``~/.cache/gmrpath`` where that folder is read-only), to a temporary name
    renamed when complete, so a killed unpacking starts again and a finished one is reused."""
    if path.suffix != ".gz":
        return path
    target = path.with_suffix("")
    if not os.access(path.parent, os.W_OK):
        target = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "gmrpath" / target.name
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    log(f"unpacking {path} -> {target} (once)")
    tmp = target.with_name(f".{target.name}.part")
    try:
        with gzip.open(path, "rb") as src, open(tmp, "wb") as dst:
            shutil.copyfileobj(src, dst, 16 << 20)
    except (OSError, EOFError) as err:
        tmp.unlink(missing_ok=True)
        raise DataError(f"{path}: cannot unpack ({type(err).__name__}: {err})") from None
    tmp.replace(target)
    return target


def _h5_pairs(root: Path) -> dict[str, list[tuple[Path, Path]]]:
    """``*_x.h5[.gz]`` / ``*_y.h5[.gz]`` pairs by split: PCam's ``train`` / ``valid`` / ``test`` names, else ``""``."""
    if not root.is_dir():
        raise DataError(f"{root}: folder not found (data.kind h5 expects *_x.h5 / *_y.h5 pairs)")
    xs = {}
    for p in sorted(root.iterdir()):
        m = re.fullmatch(r"(.*)_x\.h5(\.gz)?", p.name)
        if m and (m.group(1) not in xs or not m.group(2)):  # an unpacked .h5 wins over its .gz
            xs[m.group(1)] = p
    if not xs:
        raise DataError(f"{root}: no *_x.h5 (or *_x.h5.gz) files")
    out: dict[str, list] = {}
    for stem, xp in xs.items():
        yp = next((root / f"{stem}_y.h5{gz}" for gz in ("", ".gz") if (root / f"{stem}_y.h5{gz}").is_file()), None)
        if yp is None:
            raise DataError(f"{xp}: no matching {stem}_y.h5")
        m = re.search(r"(train|valid|val|test)$", stem, re.IGNORECASE)
        split = {"val": "valid"}.get(m.group(1).lower(), m.group(1).lower()) if m else ""
        out.setdefault(split, []).append((xp, yp))
    return out


def _h5_stream(pairs, cfg: DataConfig, model_mpp: float, tile_px: int, classes: list, skip_bad: bool, log):
    import h5py

    sources, labels, rows, fids, digest = [], [], [], [], []
    for xp, yp in pairs:
        xp, yp = unpacked_h5(xp, log), unpacked_h5(yp, log)
        try:
            with h5py.File(xp, "r") as fx, h5py.File(yp, "r") as fy:
                shape = fx["x"].shape
                y = np.asarray(fy["y"]).reshape(-1)  # labels only: a byte per tile
        except Exception as err:  # noqa: BLE001
            raise DataError(f"{xp}: cannot read the 'x'/'y' datasets ({type(err).__name__}: {err})") from None
        if len(shape) != 4 or shape[3] != 3:
            raise DataError(f"{xp}: 'x' has shape {shape}; expected (N, H, W, 3) RGB tiles")
        if shape[0] != len(y):
            raise DataError(f"{yp}: {len(y)} labels for {shape[0]} images in {xp.name}")
        if len(y) and (y.min() < 0 or y.max() >= len(classes)):
            raise DataError(f"{yp}: label {int(y.max() if y.max() >= len(classes) else y.min())} out of range for {len(classes)} classes")
        fids.append(np.full(len(y), len(sources), np.int32))
        sources.append(str(xp))
        labels.append(y.astype(np.int64))
        rows.append(np.arange(len(y), dtype=np.int64))
        digest += [(xp.name, xp.stat().st_size), (yp.name, yp.stat().st_size)]
    stream = TileStream(None, np.concatenate(labels), sources, cfg.mpp, model_mpp, tile_px, rows=np.concatenate(rows),
                        file_ids=np.concatenate(fids), skip_bad=skip_bad)
    return stream, digest


def _digest(entries: list) -> str:
    h = hashlib.sha256()
    for name, size in sorted(entries):
        h.update(f"{name}\0{size}\n".encode())
    return h.hexdigest()[:16]


def _split(stream: TileStream, cfg: DataConfig) -> tuple[TileStream, TileStream]:
    """Whole groups (or images) on one side, by ``split_csv`` / ``folds`` / ``val_fraction``."""
    if stream.names is None:  # HDF5 rows: each its own group, drawn with the seed
        n = len(stream)
        order = np.random.default_rng(cfg.seed).permutation(n)
        k = int(round(n * cfg.val_fraction)) if not cfg.folds else 0
        val = np.zeros(n, bool)
        if cfg.folds:
            val[order[cfg.fold:: cfg.folds]] = True
        else:
            val[order[:k]] = True
        return stream.subset(~val), stream.subset(val)
    groups = {n: group_of(cfg, Path(n).name) for n in stream.names}
    train, val = split_names(stream.names, groups, cfg)
    return (stream.subset(np.array([n in train for n in stream.names], bool)),
            stream.subset(np.array([n in val for n in stream.names], bool)))


def tile_sets(cfg: DataConfig, model_mpp: float, tile_px: int, skip_bad: bool = False,
              log: Callable[[str], None] = print) -> TileData:
    """Index a tile set and split it, reading no pixel.

    ``folder`` / ``csv``: validation is ``cfg.val_root`` (a second set of the same kind, e.g.
    CRC-VAL-HE-7K) when given, else the split of ``cfg.root`` by ``split_csv`` / ``folds`` /
    ``val_fraction``. ``h5``: PCam's ``train`` and ``valid`` files (its ``test`` file is kept out,
    for ``gmrpath evaluate --split test``), else ``val_fraction`` of the rows.

    Raises:
        DataError: a missing folder or pair, an empty class folder, a label outside the classes.
    """
    root = Path(cfg.root)
    if cfg.kind == "h5":
        classes = list(cfg.classes) if cfg.classes else list(PCAM_CLASSES)
        pairs = _h5_pairs(root)
        make = lambda side: _h5_stream(pairs[side], cfg, model_mpp, tile_px, classes, skip_bad, log)  # noqa: E731
        if "train" in pairs:
            (train, d1) = make("train")
            val, d2 = make("valid") if "valid" in pairs else (None, [])
            test = make("test")[0] if "test" in pairs else None
            return TileData(train, val, classes, _digest(d1 + d2), test=test)
        stream, digest = _h5_stream([p for ps in pairs.values() for p in ps], cfg, model_mpp, tile_px, classes, skip_bad, log)
        train, val = _split(stream, cfg)
        return TileData(train, val if len(val) else None, classes, _digest(digest))
    if cfg.kind not in ("folder", "csv"):
        raise DataError(f"{cfg.root}: tiles need data.kind folder, csv or h5, got {cfg.kind!r}")
    stream, classes, digest = _file_stream(root, cfg, model_mpp, tile_px, None, skip_bad)
    if cfg.val_root:
        val, _, d2 = _file_stream(Path(cfg.val_root), cfg, model_mpp, tile_px, classes, skip_bad)
        return TileData(stream, val, classes, _digest(digest + [("val/" + n, s) for n, s in d2]))
    train, val = _split(stream, cfg)
    return TileData(train, val if len(val) else None, classes, _digest(digest))


def tile_split(cfg: DataConfig, side: str, model_mpp: float, tile_px: int, log: Callable[[str], None] = print) -> tuple[TileStream, list, str]:
    """One side of a tile set for evaluation: ``all`` (every tile under ``cfg.root``), ``train``, ``val``
    or ``test`` (PCam's ``*_test_x.h5``).

    Raises:
        DataError: that side is empty or does not exist.
    """
    import dataclasses

    if side == "all":
        if cfg.kind == "h5":
            classes = list(cfg.classes) if cfg.classes else list(PCAM_CLASSES)
            stream, digest = _h5_stream([p for ps in _h5_pairs(Path(cfg.root)).values() for p in ps], cfg, model_mpp,
                                        tile_px, classes, False, log)
            return stream, classes, _digest(digest)
        data = tile_sets(dataclasses.replace(cfg, val_fraction=0.0, split_csv=None, folds=0, val_root=None), model_mpp, tile_px, log=log)
        return data.train, data.classes, data.digest
    data = tile_sets(cfg, model_mpp, tile_px, log=log)
    stream = {"train": data.train, "val": data.val, "test": data.test}[side]
    if stream is None or not len(stream):
        raise DataError(f"{cfg.root}: no {side} tiles" + (" (PCam's *_test_x.h5 is the test side)" if side == "test" else ""))
    return stream, data.classes, data.digest


def batches(loader, bad: list):
    """``(x, y)`` batches; tiles a worker marked bad (``skip_bad``) are dropped and their messages added
    to ``bad``; a bad file (without ``skip_bad``) stops the run with one line naming it."""
    try:
        for batch in loader:
            if len(batch) == 3:
                x, y, errors = batch
                if any(errors):
                    bad += [e for e in errors if e and e not in bad]
                    keep = y >= 0
                    x, y = x[keep], y[keep]
                if not len(y):
                    continue
                yield x, y
            else:
                yield batch
    except DataError as err:
        raise DataError(worker_error(err)) from None
