"""Generated slides for tests and benchmarks: real tissue re-tiled into pyramidal TIFFs.

OpenSlide reads these as "generic tiled TIFF": one tiled page per pyramid level. The
resolution tags carry the mpp (or are left out, to test the missing-mpp path). Larger slides
are mosaics of the real tissue (mirrored copies), written strip by strip so that making a
big slide does not need it in memory.

Example:
    >>> import numpy as np
    >>> path = write_pyramidal_tiff("/tmp/doc_slide.tif", np.full((512, 512, 3), 240, np.uint8), mpp=0.5)
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np

__all__ = ["demo_slide_path", "write_pyramidal_tiff", "mosaic_tiff", "read_demo_tissue", "tissue_tiles", "write_tile_folder", "write_pcam_h5",
           "NCT_CRC_CLASSES"]

NCT_CRC_CLASSES = ("ADI", "BACK", "DEB", "LYM", "MUC", "MUS", "NORM", "STR", "TUM")


def _levels(image: np.ndarray, n_levels: int):
    import cv2

    level = image
    for i in range(n_levels):
        yield level
        if i + 1 < n_levels:
            level = cv2.resize(level, (max(1, level.shape[1] // 2), max(1, level.shape[0] // 2)), interpolation=cv2.INTER_AREA)


def write_pyramidal_tiff(path: str | Path, image: np.ndarray, mpp: Optional[float] = 0.5, levels: int = 3,
                         tile: int = 256, compression: Optional[str] = "jpeg") -> Path:
    """Write ``image`` (H, W, 3 uint8) as a tiled pyramidal TIFF with ``levels`` levels (2x each)."""
    import tifffile

    path = Path(path)
    kwargs = {}
    if mpp is not None:
        kwargs = dict(resolution=(1e4 / mpp, 1e4 / mpp), resolutionunit="CENTIMETER")
    with tifffile.TiffWriter(path, bigtiff=image.nbytes > 2**31) as tif:
        for i, level in enumerate(_levels(image, levels)):
            tif.write(level, tile=(tile, tile), photometric="rgb", compression=compression,
                      subfiletype=1 if i else 0, **({} if i else kwargs))
    return path


def demo_slide_path() -> Path:
    """The real demo slide: ``../shared/data/slides`` beside the repository when there, else the copy that ships."""
    repo = Path(__file__).resolve().parents[1]
    shared = repo.parent / "shared" / "data" / "slides" / "CMU-1-Small-Region.svs"
    return shared if shared.is_file() else repo / "data" / "demo" / "CMU-1-Small-Region.svs"


def read_demo_tissue(slide_path: str | Path) -> np.ndarray:
    """The whole demo slide at level 0 as RGB (it is 2220 x 2967 px)."""
    import openslide

    s = openslide.OpenSlide(str(slide_path))
    rgb = np.asarray(s.read_region((0, 0), 0, s.dimensions).convert("RGB"))
    s.close()
    return rgb


def mosaic_tiff(path: str | Path, tissue: np.ndarray, repeat: int, mpp: float = 0.5, tile: int = 256, levels: int = 3) -> Path:
    """A ``repeat x repeat`` mosaic of ``tissue`` (mirrored alternately so edges match) as a pyramidal TIFF.

    Every level is generated one band of tiles at a time (tifffile takes an iterator of tiles),
    so memory stays at one band of the mosaic whatever ``repeat`` is.
    """
    import cv2
    import tifffile

    unit = tile * 2 ** (levels - 1)  # crop so that every level is a whole number of tiles
    h, w = (tissue.shape[0] // unit) * unit, (tissue.shape[1] // unit) * unit
    base = tissue[:h, :w]
    variants = [[base, base[:, ::-1]], [base[::-1], base[::-1, ::-1]]]
    H, W = h * repeat, w * repeat

    def band(y: int, rows: int) -> np.ndarray:
        parts = []
        for yy in range(y, y + rows, tile):
            ry, oy = divmod(yy, h)
            parts.append(np.concatenate([variants[ry % 2][rx % 2][oy: oy + tile] for rx in range(repeat)], axis=1))
        return np.concatenate(parts, axis=0)

    def tiles(step: int):
        for y in range(0, H, tile * step):
            b = band(y, tile * step)
            if step > 1:
                b = cv2.resize(b, (W // step, tile), interpolation=cv2.INTER_AREA)
            for x in range(0, b.shape[1], tile):
                yield np.ascontiguousarray(b[:, x: x + tile])

    path = Path(path)
    with tifffile.TiffWriter(path, bigtiff=True) as tif:
        for i in range(levels):
            step = 2**i
            extra = {} if i else dict(resolution=(1e4 / mpp, 1e4 / mpp), resolutionunit="CENTIMETER")
            tif.write(tiles(step), shape=(H // step, W // step, 3), dtype=np.uint8, tile=(tile, tile), photometric="rgb",
                      compression="jpeg", subfiletype=1 if i else 0, **extra)
    return path


def tissue_tiles(tissue: np.ndarray, count: int, tile_px: int, seed: int = 0) -> np.ndarray:
    """``count`` random ``tile_px`` crops of real tissue, each in one of the 8 grid orientations.

    Shape:
        ``(H, W, 3) -> (count, tile_px, tile_px, 3)`` uint8.
    """
    rng = np.random.default_rng(seed)
    out = np.empty((count, tile_px, tile_px, 3), np.uint8)
    for i in range(count):
        y, x = (int(rng.integers(0, n - tile_px + 1)) for n in tissue.shape[:2])
        crop = np.rot90(tissue[y: y + tile_px, x: x + tile_px], int(rng.integers(4)))
        out[i] = crop[:, ::-1] if rng.integers(2) else crop
    return out


def write_tile_folder(root: str | Path, tiles: np.ndarray, count: int, classes=NCT_CRC_CLASSES, ext: str = ".tif",
                      link: bool = True) -> Path:
    """An NCT-CRC-HE-100K-shaped set: ``root/<CLASS>/<CLASS>-<i>.tif``, ``count`` files dealt over the
    classes. The distinct ``tiles`` are written once; the other files are hard links to them (as
    costly to list and decode as copies, without their disk), unless ``link`` is false or the
    file system refuses links."""
    import tifffile
    from PIL import Image

    root = Path(root)
    written: dict[int, Path] = {}
    for i in range(count):
        cls = classes[i % len(classes)]
        folder = root / cls
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{cls}-{i:06d}{ext}"
        k = i % len(tiles)
        if link and k in written:
            try:
                path.hardlink_to(written[k])
                continue
            except OSError:
                pass
        if ext == ".tif":
            tifffile.imwrite(path, tiles[k], photometric="rgb")
        else:
            Image.fromarray(tiles[k]).save(path)
        written.setdefault(k, path)
    return root


def write_pcam_h5(root: str | Path, split: str, tiles: np.ndarray, count: int, n_classes: int = 2, chunk_rows: int = 1,
                  compression: Optional[str] = None, gz: bool = False, seed: int = 0) -> tuple[Path, Path]:
    """PCam-shaped ``camelyonpatch_level_2_split_<split>_x.h5`` / ``_y.h5`` with ``count`` rows made from
    ``tiles``, written in blocks (memory stays at one block); chunked ``chunk_rows`` rows at a time;
    labels shaped ``(N, 1, 1, 1)`` as PCam's. ``gz``: gzip both files as PCam is distributed."""
    import gzip
    import shutil

    import h5py

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    stem = root / f"camelyonpatch_level_2_split_{split}"
    xp, yp = Path(f"{stem}_x.h5"), Path(f"{stem}_y.h5")
    rng = np.random.default_rng(seed)
    side = tiles.shape[1]
    with h5py.File(xp, "w") as fx:
        ds = fx.create_dataset("x", (count, side, side, 3), np.uint8, chunks=(chunk_rows, side, side, 3),
                               compression=compression)
        for start in range(0, count, 4096):
            stop = min(count, start + 4096)
            ds[start:stop] = tiles[np.arange(start, stop) % len(tiles)]
    with h5py.File(yp, "w") as fy:
        fy["y"] = rng.integers(0, n_classes, (count, 1, 1, 1), dtype=np.uint8)
    if gz:
        for p in (xp, yp):
            with open(p, "rb") as src, gzip.open(f"{p}.gz", "wb", compresslevel=1) as dst:
                shutil.copyfileobj(src, dst)
            p.unlink()
        xp, yp = Path(f"{xp}.gz"), Path(f"{yp}.gz")
    return xp, yp
