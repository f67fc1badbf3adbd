"""Write: the cohort table (CSV) and an HTML report, one row per slide, from per-slide summaries.

Example::

    rows = collect_summaries("results/demo")
    csv_path, html_path = write_cohort("results/demo")
"""

from __future__ import annotations

import html
import json
import os
from pathlib import Path

from .summary import write_cohort_csv

__all__ = ["collect_summaries", "write_cohort"]


def collect_summaries(out_dir: str | Path) -> list[dict]:
    """Merge ``<slide>.summary.json`` and ``<slide>.nuclei.summary.json`` of every slide folder."""
    rows = []
    for d in sorted(p for p in Path(out_dir).iterdir() if p.is_dir() and not p.name.startswith(".")):
        row: dict = {}
        cls, nuc = d / f"{d.name}.summary.json", d / f"{d.name}.nuclei.summary.json"
        if cls.is_file():
            row.update(json.loads(cls.read_text()))
        if nuc.is_file():
            n = json.loads(nuc.read_text())
            row.setdefault("slide", n["slide"])
            row["nuclei_count"] = n["nuclei_count"]
            row["nuclei_per_mm2"] = n["nuclei_per_mm2"]
        if row:
            row.pop("outputs", None)
            row.pop("path", None)
            rows.append(row)
    return rows


def write_cohort(out_dir: str | Path) -> tuple[Path, Path]:
    """Write ``cohort.csv`` and ``report.html`` into ``out_dir`` (atomically).

    Raises:
        ValueError: when no slide summary is found.
    """
    out_dir = Path(out_dir)
    rows = collect_summaries(out_dir)
    if not rows:
        raise ValueError(f"{out_dir}: no slide summaries found (run gmrpath predict or segment first)")
    csv_path = write_cohort_csv(rows, out_dir / "cohort.csv")
    body = []
    for r in rows:
        sid = r["slide"]
        overlay = Path(sid) / f"{sid}.overlay.png"
        img = f'<img src="{html.escape(str(overlay))}" width="260">' if (out_dir / overlay).is_file() else "-"
        fractions = r.get("class_fraction", {})
        top = sorted(fractions.items(), key=lambda kv: -kv[1])[:4]
        frac = "<br>".join(f"{html.escape(k)}: {v:.1%}" for k, v in top if v > 0) or "-"
        trained = "" if r.get("trained", True) else ' <span class="warn">untrained model</span>'
        body.append(
            f"<tr><td><b>{html.escape(sid)}</b><br>{r.get('mpp', '')} mpp{trained}</td><td>{img}</td><td>{frac}</td>"
            f"<td>{r.get('tissue_area_mm2', '-')}</td><td>{r.get('tiles', '-')}</td>"
            f"<td>{r.get('nuclei_count', '-')}</td><td>{r.get('nuclei_per_mm2', '-')}</td><td>{r.get('tiles_per_s', '-')}</td></tr>"
        )
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>GMR-Path cohort report</title>
<style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:6px;vertical-align:top}}
th{{background:#f3f3f3}}.warn{{color:#b00;font-size:85%}}</style></head><body>
<h1>GMR-Path cohort report</h1><p>{len(rows)} slide(s); full table: <a href="cohort.csv">cohort.csv</a>.</p>
<table><tr><th>slide</th><th>overlay</th><th>top classes (tiles)</th><th>tissue mm&sup2;</th><th>tiles</th>
<th>nuclei</th><th>nuclei / mm&sup2;</th><th>tiles/s</th></tr>
{os.linesep.join(body)}
</table></body></html>
"""
    html_path = out_dir / "report.html"
    tmp = html_path.with_name(".report.html.tmp")
    tmp.write_text(page)
    tmp.replace(html_path)
    return csv_path, html_path
