"""Write: per-slide summary (JSON and a one-row CSV) and the cohort table.

Example:
    >>> import tempfile, pathlib
    >>> d = pathlib.Path(tempfile.mkdtemp())
    >>> _ = write_summary({"slide": "a", "tissue_area_mm2": 1.5}, d / "a.summary.json")
    >>> (d / "a.summary.csv").read_text().splitlines()[0]
    'slide,tissue_area_mm2'
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Iterable

from .outputs import atomic_path

__all__ = ["write_summary", "read_summary", "flatten", "write_cohort_csv"]


def flatten(summary: dict, prefix: str = "") -> dict:
    """Nested dicts become ``outer.inner`` columns (class fractions, nuclei counts)."""
    flat = {}
    for key, value in summary.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}."))
        elif isinstance(value, (list, tuple)):
            flat[name] = ";".join(map(str, value))
        else:
            flat[name] = value
    return flat


def _atomic_write(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_summary(summary: dict, path: str | Path) -> Path:
    """Write ``summary`` to ``path`` (JSON) and the same values, flattened, beside it as CSV."""
    path = Path(path)
    _atomic_write(path, json.dumps(summary, indent=2, default=str))
    flat = flatten(summary)
    csv_path = path.with_suffix(".csv")
    with atomic_path(csv_path) as tmp, tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(flat))
        writer.writeheader()
        writer.writerow(flat)
    return path


def read_summary(path: str | Path) -> dict:
    return json.loads(Path(path).read_text())


def write_cohort_csv(summaries: Iterable[dict], path: str | Path) -> Path:
    """One row per slide; the columns are the union over slides."""
    rows = [flatten(s) for s in summaries]
    columns: list[str] = []
    for row in rows:
        columns += [c for c in row if c not in columns]
    path = Path(path)
    with atomic_path(path) as tmp, tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    return path
