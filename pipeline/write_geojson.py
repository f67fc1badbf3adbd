"""Write: QuPath-importable GeoJSON (a FeatureCollection in level-0 pixel coordinates).

Tiles become ``objectType: "tile"`` features, nuclei ``"detection"`` features; every feature
has a UUID ``id``, a closed ``Polygon`` (a ``MultiPolygon`` for the rare nucleus a block seam left in
pieces), ``classification: {name, color}`` and
``measurements`` as a name -> number map (QuPath 0.4+ reads a map; the list form is what
breaks other tools' imports). Ids are UUID5 of the slide and the object, so a re-run writes
identical files. Features are streamed to a temporary file, then renamed.

Example:
    >>> feature = polygon_feature([(0, 0), (10, 0), (10, 10), (0, 10)], "tile", "TUM", (255, 0, 0), {"p": 0.9}, "s:0:0")
    >>> feature["geometry"]["coordinates"][0][0] == feature["geometry"]["coordinates"][0][-1]
    True
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Iterable, Sequence

from .outputs import atomic_path

__all__ = ["polygon_feature", "write_feature_collection", "pixel_outline", "pixel_pieces"]

_NAMESPACE = uuid.UUID("6f1c3d2e-6a57-4f7e-9a43-3c7f0c1e5b21")


def polygon_feature(ring: Sequence[tuple[float, float]], object_type: str, class_name: str, color: Sequence[int],
                    measurements: dict, key: str, holes: Sequence[Sequence[tuple[float, float]]] = (),
                    more: Sequence[tuple] = ()) -> dict:
    """One QuPath feature; ``ring`` (and each of ``holes``) is closed here if it is not already.
    ``more``: further ``(ring, holes)`` parts of the same object, which make it a MultiPolygon."""
    def closed(parts):
        rings = []
        for r in parts:
            coords = [[round(float(x), 2), round(float(y), 2)] for x, y in r]
            if coords[0] != coords[-1]:
                coords.append(coords[0])
            rings.append(coords)
        return rings

    geometry = {"type": "Polygon", "coordinates": closed([ring, *holes])}
    if more:
        geometry = {"type": "MultiPolygon", "coordinates": [geometry["coordinates"]] + [closed([r, *h]) for r, h in more]}
    return {
        "type": "Feature",
        "id": str(uuid.uuid5(_NAMESPACE, key)),
        "geometry": geometry,
        "properties": {
            "objectType": object_type,
            "classification": {"name": class_name, "color": [int(c) for c in color[:3]]},
            "measurements": {k: float(v) for k, v in measurements.items()},
        },
    }


def write_feature_collection(features: Iterable[dict], path: str | Path) -> tuple[Path, int]:
    """Stream ``features`` into a FeatureCollection at ``path`` (atomic). Returns (path, count)."""
    path = Path(path)
    count = 0
    with atomic_path(path) as tmp, tmp.open("w") as f:
        f.write('{"type": "FeatureCollection", "features": [\n')
        for feature in features:
            f.write((",\n" if count else "") + json.dumps(feature, separators=(",", ":")))
            count += 1
        f.write("\n]}\n")
    return path, count


def pixel_outline(mask) -> tuple[list[tuple[int, int]], list[list[tuple[int, int]]]]:
    """The outline of a binary object along pixel *edges*, as QuPath and the mask see it.

    Pixel ``(row r, column c)`` is the square ``[c, c+1) x [r, r+1)``, so the polygon's area
    and centroid are exactly the mask's (tracing pixel centres, as ``cv2.findContours`` does,
    shrinks every object by half a pixel on each side). Where the object has several
    4-connected pieces, the largest is kept; holes become interior rings.

    Shape:
        ``(H, W)`` bool -> exterior ring ``[(x, y), ...]`` and a list of hole rings, in the
        mask's pixel-corner coordinates.

    Example:
        >>> import numpy as np
        >>> pixel_outline(np.ones((2, 3), bool))[0]
        [(0, 0), (3, 0), (3, 2), (0, 2)]
    """
    import numpy as np

    m = np.pad(np.asarray(mask, bool), 1)
    edges: dict[tuple[int, int], list[tuple[int, int]]] = {}
    inside = m[1:-1, 1:-1]
    # directed edges with the object on the right (x right, y down), in unpadded coordinates
    for dr, dc, start, end in (
        (-1, 0, (0, 0), (1, 0)),   # outside above: top edge, left to right
        (1, 0, (1, 1), (0, 1)),    # outside below: bottom edge, right to left
        (0, -1, (0, 1), (0, 0)),   # outside left: left edge, bottom to top
        (0, 1, (1, 0), (1, 1)),    # outside right: right edge, top to bottom
    ):
        nb = m[1 + dr: m.shape[0] - 1 + dr, 1 + dc: m.shape[1] - 1 + dc]
        rows, cols = np.nonzero(inside & ~nb)
        for r, c in zip(rows.tolist(), cols.tolist()):
            edges.setdefault((c + start[0], r + start[1]), []).append((c + end[0], r + end[1]))
    loops = []
    while edges:
        first = next(iter(edges))
        loop, here, heading = [first], first, None
        while True:
            outs = edges[here]
            if len(outs) == 1 or heading is None:
                nxt = outs[0]
            else:  # a corner where two pieces touch diagonally: turn right, keeping the pieces apart
                def turn(p, h=heading, v=here):
                    d = (p[0] - v[0], p[1] - v[1])
                    return h[0] * d[1] - h[1] * d[0]  # > 0: a right turn in y-down coordinates
                nxt = max(outs, key=turn)
            outs.remove(nxt)
            if not outs:
                del edges[here]
            heading = (nxt[0] - here[0], nxt[1] - here[1])
            here = nxt
            if here == first:
                break
            loop.append(here)
        loops.append(_corners(loop))
    signed = [(_area(lp), lp) for lp in loops]
    outer = [x for x in signed if x[0] > 0]
    exterior = max(outer, key=lambda x: x[0])[1] if outer else loops[0]
    holes = [lp for a, lp in signed if a < 0]
    return exterior, holes


def pixel_pieces(mask) -> list[tuple[list[tuple[int, int]], list[list[tuple[int, int]]]]]:
    """:func:`pixel_outline` of every 4-connected piece of a binary object, the largest first.

    A nucleus is one piece almost always; one cut at a block seam can keep a sliver apart from
    it, and that sliver's pixels are still the nucleus's (a MultiPolygon in the GeoJSON).

    Shape:
        ``(H, W)`` bool -> ``[(exterior, holes), ...]`` in the mask's pixel-corner coordinates.
    """
    import numpy as np
    from scipy import ndimage

    pieces, n = ndimage.label(np.asarray(mask, bool))
    if n <= 1:
        return [pixel_outline(mask)]
    sizes = np.bincount(pieces.ravel())[1:]
    boxes = ndimage.find_objects(pieces)
    out = []
    for index in np.argsort(-sizes, kind="stable"):
        sl = boxes[index]
        ext, holes = pixel_outline(pieces[sl] == index + 1)
        shift = lambda ring, r=sl[0].start, c=sl[1].start: [(x + c, y + r) for x, y in ring]  # noqa: E731
        out.append((shift(ext), [shift(h) for h in holes]))
    return out


def _area(loop) -> float:
    """Shoelace area; positive for a ring with the object on its right (y down)."""
    s = 0.0
    for (x0, y0), (x1, y1) in zip(loop, loop[1:] + loop[:1]):
        s += x0 * y1 - x1 * y0
    return s / 2


def _corners(loop):
    """Drop the vertices in the middle of straight runs."""
    n = len(loop)
    keep = []
    for i in range(n):
        (xa, ya), (xb, yb), (xc, yc) = loop[i - 1], loop[i], loop[(i + 1) % n]
        if (xb - xa) * (yc - yb) - (yb - ya) * (xc - xb) != 0:
            keep.append((xb, yb))
    return keep or loop
