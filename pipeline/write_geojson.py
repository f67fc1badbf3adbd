"""Write: QuPath-importable GeoJSON (a FeatureCollection in level-0 pixel coordinates).

Tiles become ``objectType: "tile"`` features, nuclei ``"detection"`` features; every feature
has a UUID ``id``, a plain closed ``Polygon``, ``classification: {name, color}`` and
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

__all__ = ["polygon_feature", "write_feature_collection"]

_NAMESPACE = uuid.UUID("6f1c3d2e-6a57-4f7e-9a43-3c7f0c1e5b21")


def polygon_feature(ring: Sequence[tuple[float, float]], object_type: str, class_name: str, color: Sequence[int],
                    measurements: dict, key: str) -> dict:
    """One QuPath feature; ``ring`` is closed here if it is not already."""
    coords = [[round(float(x), 2), round(float(y), 2)] for x, y in ring]
    if coords[0] != coords[-1]:
        coords.append(coords[0])
    return {
        "type": "Feature",
        "id": str(uuid.uuid5(_NAMESPACE, key)),
        "geometry": {"type": "Polygon", "coordinates": [coords]},
        "properties": {
            "objectType": object_type,
            "classification": {"name": class_name, "color": [int(c) for c in color[:3]]},
            "measurements": {k: float(v) for k, v in measurements.items()},
        },
    }


def write_feature_collection(features: Iterable[dict], path: str | Path) -> tuple[Path, int]:
    """Stream ``features`` into a FeatureCollection at ``path`` (atomic). Returns (path, count)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    count = 0
    with tmp.open("w") as f:
        f.write('{"type": "FeatureCollection", "features": [\n')
        for feature in features:
            f.write((",\n" if count else "") + json.dumps(feature, separators=(",", ":")))
            count += 1
        f.write("\n]}\n")
    tmp.replace(path)
    return path, count
