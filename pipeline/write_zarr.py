"""Write: OME-Zarr (NGFF 0.5, zarr v3) stores, built in a ``.partial`` folder and renamed when complete.

Layout of one store (``<slide>.<task>.ome.zarr``)::

    zarr.json                 ome: version 0.5, multiscales (axes c, y, x; micrometre), omero channels
    0/                        the image: class probabilities (C, rows, cols) or nuclei probability (1, H, W)
    labels/zarr.json          ome: labels [...]
    labels/<name>/0, 1, ...   uint label pyramids with ome.image-label colours
    progress.json             only while .partial: chunks finished, and the run's fingerprint

Coordinates: level-0 pixel centres sit at integer positions, times the slide's mpp; an array
pixel covering level-0 pixels ``[a, a + s)`` has its centre at ``a + (s - 1) / 2``, which gives
each array's ``translation``; ``scale`` is its pixel step in micrometres.

Example:
    >>> meta = multiscales_metadata("heatmap", n_levels=1, scale_um=(56.0, 56.0), translation_um=(27.7, 27.7))
    >>> meta["axes"][1]
    {'name': 'y', 'type': 'space', 'unit': 'micrometer'}
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

__all__ = [
    "open_partial_store", "done_chunks", "mark_chunk_done", "multiscales_metadata", "write_label", "write_pyramid", "pyramid_levels",
    "finalize_store", "hex_color", "store_is_complete", "store_matches", "stored_attrs",
]

from .outputs import atomic_path

PROGRESS = "progress.json"


def _atomic_json(path: Path, payload: dict) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(payload, indent=1))


def partial_path(final: Path) -> Path:
    return final.with_name(final.name + ".partial")


def store_is_complete(final: Path) -> bool:
    """A store is complete when it exists under its final name (it is renamed only when done)."""
    return (Path(final) / "zarr.json").is_file()


def stored_attrs(final: Path) -> dict:
    """The ``gmrpath`` attributes of a complete store ({} when missing or unreadable)."""
    import zarr

    try:
        return dict(zarr.open_group(str(final), mode="r").attrs.get("gmrpath", {}))
    except Exception:  # noqa: BLE001 - an unreadable store is simply redone
        return {}


def store_matches(final: Path, fingerprint: dict) -> bool:
    """True when ``final`` is complete and was written by a run with this ``fingerprint``."""
    return store_is_complete(final) and stored_attrs(final).get("fingerprint") == fingerprint


def open_partial_store(final: Path, fingerprint: dict):
    """Open ``<final>.partial`` to resume when its fingerprint matches, else start it afresh.

    Returns:
        ``(group, resumed)``.
    """
    import zarr

    part = partial_path(Path(final))
    progress = part / PROGRESS
    if part.exists():
        try:
            same = json.loads(progress.read_text()).get("fingerprint") == fingerprint
        except (OSError, ValueError):
            same = False
        if same:
            return zarr.open_group(str(part), mode="r+", zarr_format=3), True
        shutil.rmtree(part)
    group = zarr.open_group(str(part), mode="w", zarr_format=3)
    _atomic_json(progress, {"fingerprint": fingerprint, "done_chunks": []})
    return group, False


def done_chunks(group) -> set[int]:
    """Chunk ids already written to a partial store."""
    return set(json.loads((Path(group.store.root) / PROGRESS).read_text())["done_chunks"])


def mark_chunk_done(group, chunk_id: int) -> None:
    """Record ``chunk_id`` as written (atomic rewrite of progress.json)."""
    path = Path(group.store.root) / PROGRESS
    data = json.loads(path.read_text())
    data["done_chunks"] = sorted(set(data["done_chunks"]) | {int(chunk_id)})
    _atomic_json(path, data)


def hex_color(rgb: Sequence[int]) -> str:
    return "".join(f"{int(v):02X}" for v in rgb[:3])


def multiscales_metadata(name: str, n_levels: int, scale_um: tuple[float, float], translation_um: tuple[float, float],
                         factor: int = 2) -> dict:
    """One NGFF ``multiscales`` entry for a (c, y, x) pyramid whose level ``i`` is ``factor**i``
    coarser. Levels are built by :func:`write_pyramid`, which keeps every ``factor``-th pixel:
    pixel ``(i, j)`` of level ``s`` *is* pixel ``(f*i, f*j)`` of level 0, so every level has
    level 0's translation (a block-averaged level would move by ``(f - 1) / 2`` fine pixels)."""
    datasets = []
    for level in range(n_levels):
        f = factor**level
        scale = [1.0, scale_um[0] * f, scale_um[1] * f]
        translation = [0.0, translation_um[0], translation_um[1]]
        datasets.append({
            "path": str(level),
            "coordinateTransformations": [{"type": "scale", "scale": scale}, {"type": "translation", "translation": translation}],
        })
    return {
        "name": name,
        "axes": [
            {"name": "c", "type": "channel"},
            {"name": "y", "type": "space", "unit": "micrometer"},
            {"name": "x", "type": "space", "unit": "micrometer"},
        ],
        "datasets": datasets,
    }


def pyramid_levels(shape_yx: tuple[int, int], min_side: int = 256) -> int:
    levels, (h, w) = 1, shape_yx
    while max(h, w) > min_side:
        h, w, levels = (h + 1) // 2, (w + 1) // 2, levels + 1
    return levels


def write_pyramid(node, base, n_levels: int, chunks: int = 1024) -> None:
    """Write levels ``1 .. n_levels-1`` of ``node`` below its level ``0`` (a (c, y, x) dask or
    zarr array): every other pixel per level, so label values are never mixed."""
    import dask.array as da

    level = base if isinstance(base, da.Array) else da.from_zarr(base)
    for i in range(1, n_levels):
        level = level[:, ::2, ::2]
        level = level.rechunk((level.shape[0], min(chunks, level.shape[1]), min(chunks, level.shape[2])))
        target = node.create_array(str(i), shape=level.shape, chunks=level.chunksize, dtype=level.dtype, fill_value=0,
                                   dimension_names=("c", "y", "x"))
        da.store(level, target, lock=False)  # dask chunks == zarr chunks: each written once


def write_label(group, name: str, data, scale_um, translation_um, colors: dict[int, Sequence[int]],
                properties: Optional[list] = None, chunks: int = 1024, n_levels: Optional[int] = None) -> None:
    """Write label image ``labels/<name>`` (a 2D integer array or dask array) with ``n_levels``
    pyramid levels (default: down to 256 px; pass the parent image's count, as NGFF validators
    expect) and ``image-label`` colours."""
    import dask.array as da

    arr = data if isinstance(data, da.Array) else da.from_array(np.asarray(data), chunks=chunks)
    labels = group.require_group("labels")
    node = labels.create_group(name, overwrite=True)
    n_levels = pyramid_levels(arr.shape) if n_levels is None else n_levels
    level0 = arr.rechunk((min(chunks, arr.shape[0]), min(chunks, arr.shape[1])))[None]
    target = node.create_array("0", shape=level0.shape, chunks=level0.chunksize, dtype=level0.dtype, fill_value=0,
                               dimension_names=("c", "y", "x"))
    da.store(level0, target, lock=False)
    write_pyramid(node, level0, n_levels, chunks)
    image_label = {
        "colors": [{"label-value": int(v), "rgba": [*map(int, rgb[:3]), 255]} for v, rgb in sorted(colors.items())],
        "source": {"image": "../../"},
    }
    if properties:
        image_label["properties"] = properties
    node.attrs["ome"] = {
        "version": "0.5",
        "multiscales": [multiscales_metadata(name, n_levels, scale_um, translation_um)],
        "image-label": image_label,
    }
    existing = labels.attrs.get("ome", {}).get("labels", [])
    labels.attrs["ome"] = {"version": "0.5", "labels": sorted(set(existing) | {name})}


def finalize_store(group, final: Path, name: str, scale_um, translation_um, channels: list[dict], extra: dict,
                   n_levels: int = 1) -> Path:
    """Write the root NGFF metadata (``n_levels`` image levels), drop progress.json, and rename
    ``.partial`` to ``final``."""
    group.attrs["ome"] = {
        "version": "0.5",
        "multiscales": [multiscales_metadata(name, n_levels, scale_um, translation_um)],
        "omero": {"channels": channels, "rdefs": {"model": "color"}},
    }
    group.attrs["gmrpath"] = extra
    part = Path(group.store.root)
    (part / PROGRESS).unlink(missing_ok=True)
    final = Path(final)
    if final.exists():
        shutil.rmtree(final)
    part.rename(final)
    return final
