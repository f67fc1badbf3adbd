"""Tiles: a grid at the model's resolution over the tissue, and a Dataset that reads it.

Tile ``(row, col)`` covers level-0 pixels ``[x, x + tile_l0) x [y, y + tile_l0)`` with
``x = col * step_l0``, ``y = row * step_l0``; ``tile_l0 = tile_px * mpp / slide.mpp``. A tile
is kept when at least ``min_tissue_fraction`` of it is tissue (integral image of the mask).
The grid is split into square chunks of ``chunk`` x ``chunk`` cells: the unit of writing and
of resuming.

Example:
    >>> from pipeline.read import open_slide
    >>> from pipeline.tissue import detect_tissue
    >>> slide = open_slide("data/demo/CMU-1-Small-Region.svs")
    >>> grid = make_grid(slide, detect_tissue(slide), 8.0, tile_px=224, mpp=0.5, step_px=224)
    >>> grid.n_rows, grid.n_cols, len(grid.rows) > 0
    (13, 9, True)
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
from torch.utils.data import Dataset

from .read import Slide, open_slide, read_region

__all__ = ["TileGrid", "make_grid", "TileDataset"]


@dataclass(frozen=True)
class TileGrid:
    """Kept tiles of a regular grid (level-0 pixel geometry).

    Attributes:
        tile_l0, step_l0: tile side and grid step in level-0 pixels.
        n_rows, n_cols: grid size (every cell, kept or not).
        rows, cols: grid indices of the kept tiles, in chunk order.
        tissue_fraction: tissue fraction of every kept tile.
        tile_px, mpp: tile side in pixels at the model resolution.
    """

    tile_l0: float
    step_l0: float
    n_rows: int
    n_cols: int
    rows: np.ndarray
    cols: np.ndarray
    tissue_fraction: np.ndarray
    tile_px: int
    mpp: float

    def xy(self, i: int) -> tuple[int, int]:
        """Level-0 (x, y) of kept tile ``i``'s top-left corner."""
        return int(round(self.cols[i] * self.step_l0)), int(round(self.rows[i] * self.step_l0))

    def chunk_of(self, chunk: int) -> np.ndarray:
        """Chunk id of every kept tile (row-major over chunks of ``chunk`` x ``chunk`` cells)."""
        per_row = math.ceil(self.n_cols / chunk)
        return (self.rows // chunk) * per_row + self.cols // chunk


def make_grid(
    slide: Slide,
    mask: np.ndarray,
    mask_mpp: float,
    tile_px: int,
    mpp: float,
    step_px: Optional[int] = None,
    min_tissue_fraction: float = 0.25,
    chunk: int = 16,
) -> TileGrid:
    """The tile grid over the whole slide, keeping tiles on tissue, sorted by chunk.

    Raises:
        ValueError: when the slide is smaller than one tile.
    """
    w0, h0 = slide.dimensions
    f = mpp / slide.mpp
    tile_l0, step_l0 = tile_px * f, (step_px or tile_px) * f
    if tile_l0 > w0 or tile_l0 > h0:
        raise ValueError(f"{slide.path}: the slide ({w0}x{h0} px) is smaller than one {tile_px} px tile at {mpp} mpp")
    n_cols = int(math.floor((w0 - tile_l0) / step_l0)) + 1
    n_rows = int(math.floor((h0 - tile_l0) / step_l0)) + 1
    # fraction of tissue under each cell, from the integral image of the mask
    integral = np.pad(mask.astype(np.float64).cumsum(0).cumsum(1), ((1, 0), (1, 0)))
    m = mask_mpp / slide.mpp  # level-0 pixels per mask pixel
    rr, cc = np.meshgrid(np.arange(n_rows), np.arange(n_cols), indexing="ij")
    y0 = np.clip(np.floor(rr * step_l0 / m).astype(int), 0, mask.shape[0])
    x0 = np.clip(np.floor(cc * step_l0 / m).astype(int), 0, mask.shape[1])
    y1 = np.clip(np.ceil((rr * step_l0 + tile_l0) / m).astype(int), 0, mask.shape[0])
    x1 = np.clip(np.ceil((cc * step_l0 + tile_l0) / m).astype(int), 0, mask.shape[1])
    area = np.maximum((y1 - y0) * (x1 - x0), 1)
    frac = (integral[y1, x1] - integral[y0, x1] - integral[y1, x0] + integral[y0, x0]) / area
    keep = frac >= max(min_tissue_fraction, 1e-9)
    rows, cols, fr = rr[keep], cc[keep], frac[keep]
    per_row = math.ceil(n_cols / chunk)
    order = np.lexsort((cols, rows, (rows // chunk) * per_row + cols // chunk))
    return TileGrid(tile_l0, step_l0, n_rows, n_cols, rows[order], cols[order], fr[order], tile_px, mpp)


class TileDataset(Dataset):
    """Reads kept tiles of a grid; each DataLoader worker opens its own slide handle.

    Items: ``(index, tile)`` with ``tile`` a ``(tile_px, tile_px, 3)`` uint8 tensor (converted
    to float and normalised on the device, which moves 4x fewer bytes).
    """

    def __init__(self, path: str | os.PathLike, slide_mpp: float, grid: TileGrid, indices: np.ndarray) -> None:
        self.path, self.slide_mpp, self.grid = path, slide_mpp, grid
        self.indices = np.asarray(indices)
        self._slide: Optional[Slide] = None
        self._pid: Optional[int] = None

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, item: int):
        if self._slide is None or self._pid != os.getpid():
            self._slide, self._pid = open_slide(self.path, mpp=self.slide_mpp), os.getpid()
            self._slide.mpp = self.slide_mpp  # whatever the source, use the resolved value
        i = int(self.indices[item])
        tile = read_region(self._slide, self.grid.xy(i), (self.grid.tile_px, self.grid.tile_px), self.grid.mpp)
        return i, torch.from_numpy(tile)
