"""Run records: CSV/JSON tables and checkpoints written to a temporary name and renamed, and the
code version stamped into them.

Example::

    write_rows([{"epoch": 1, "loss": 0.5}], Path("results/train/metrics.csv"))  # + metrics.json
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Callable

__all__ = ["write_rows", "atomic_save", "code_version", "tee_log"]


def code_version() -> str:
    """The package version plus the git commit when run from a checkout."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        v = version("gmr-path")
    except PackageNotFoundError:
        v = "unknown"
    head = Path(__file__).resolve().parents[1] / ".git" / "HEAD"
    try:
        ref = head.read_text().strip()
        if ref.startswith("ref: "):
            ref = (head.parent / ref[5:]).read_text().strip()
        return f"{v}+g{ref[:10]}"
    except OSError:
        return v


def atomic_save(obj, path: Path) -> None:
    """``torch.save`` to a temporary name beside ``path``, then rename."""
    import torch

    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(obj, tmp)
    tmp.replace(path)


def write_rows(rows: list[dict], csv_path: Path, json_payload=None) -> None:
    """``rows`` as a CSV (columns: every key, in first-seen order) and ``json_payload`` (default:
    the rows) as JSON beside it, each written to a temporary name and renamed."""
    keys = list(dict.fromkeys(k for row in rows for k in row))
    tmp = csv_path.with_name(f".{csv_path.name}.tmp")
    with open(tmp, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)
    tmp.replace(csv_path)
    json_path = csv_path.with_suffix(".json")
    tmp = json_path.with_name(f".{json_path.name}.tmp")
    tmp.write_text(json.dumps(rows if json_payload is None else json_payload, indent=1))
    tmp.replace(json_path)


def tee_log(log: Callable[[str], None], path: Path) -> Callable[[str], None]:
    """``log`` that also appends each line to ``path`` (a run's ``train.log``; its folder made on first use)."""
    def both(line: str) -> None:
        log(line)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a") as fh:
            fh.write(line + "\n")
    return both
