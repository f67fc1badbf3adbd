"""Write: the cohort table (CSV) and an HTML report, one row per slide, from per-slide summaries,
and the slides that failed with their one-line error.

A per-slide command that fails records its error in ``OUT/.gmrpath/failed/<slide>.<stage>.json``
(:func:`record_failure`) and clears it when it later succeeds, so the report lists exactly the
slides whose latest run failed, however the runs were started (CLI or Snakemake).

Example::

    rows = collect_summaries("results/demo")
    csv_path, html_path = write_cohort("results/demo")
"""

from __future__ import annotations

import html
import json
import os
from pathlib import Path
from urllib.parse import quote

from .summary import write_cohort_csv

__all__ = ["collect_summaries", "collect_failures", "record_failure", "clear_failure", "write_cohort"]


def _failure_path(out_dir: str | Path, sid: str, stage: str) -> Path:
    return Path(out_dir) / ".gmrpath" / "failed" / f"{sid}.{stage}.json"


def record_failure(out_dir: str | Path, slide: str | Path, stage: str, message: str) -> None:
    """Remember that ``stage`` failed on ``slide`` with ``message`` (best effort: a full disk
    or unwritable folder must not hide the original error)."""
    from .outputs import atomic_path
    from .read import slide_id

    path = _failure_path(out_dir, slide_id(slide), stage)
    record = {"slide": slide_id(slide), "path": str(slide), "stage": stage, "error": " ".join(str(message).split())}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:
            tmp.write_text(json.dumps(record))
    except (OSError, ValueError):
        pass


def clear_failure(out_dir: str | Path, slide: str | Path, stage: str) -> None:
    """Forget an earlier failure of ``stage`` on ``slide`` (it has now succeeded)."""
    from .read import slide_id

    try:
        _failure_path(out_dir, slide_id(slide), stage).unlink(missing_ok=True)
    except OSError:
        pass


def collect_failures(out_dir: str | Path) -> list[dict]:
    """The recorded failures under ``out_dir``, by slide then stage."""
    folder = Path(out_dir) / ".gmrpath" / "failed"
    rows = []
    for f in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        try:
            rows.append(json.loads(f.read_text()))
        except (OSError, ValueError):
            continue
    return rows


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
    """Write ``cohort.csv`` and ``report.html`` into ``out_dir`` (atomically). Slides that failed
    are listed in the report and get a row with their error in the CSV.

    Raises:
        ValueError: ``out_dir`` is not a folder, or holds neither summaries nor failures.
    """
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        raise ValueError(f"{out_dir}: not a folder of slide outputs (give the --out folder of predict/segment)")
    rows = collect_summaries(out_dir)
    failures = collect_failures(out_dir)
    if not rows and not failures:
        raise ValueError(f"{out_dir}: no slide summaries found (run gmrpath predict or segment first)")
    table = [dict(r) for r in rows]
    for fail in failures:
        row = next((r for r in table if r.get("slide") == fail["slide"]), None)
        if row is None:
            row = {"slide": fail["slide"]}
            table.append(row)
        row[f"error.{fail['stage']}"] = fail["error"]
    csv_path = write_cohort_csv(table, out_dir / "cohort.csv")
    body = []
    for r in rows:
        sid = r["slide"]
        overlay = Path(sid) / f"{sid}.overlay.png"
        src = html.escape(str(overlay))
        img = f'<a href="{src}"><img src="{src}" width="320" alt="overlay of {html.escape(sid)}"></a>' if (out_dir / overlay).is_file() else "-"
        fractions = r.get("class_fraction", {})
        top = sorted(fractions.items(), key=lambda kv: -kv[1])[:4]
        frac = "<br>".join(f"{html.escape(k)}: {v:.1%}" for k, v in top if v > 0) or "-"
        trained = "" if r.get("trained", True) else ' <span class="warn">untrained model</span>'
        viewer = Path(sid) / "viewer" / "index.html"
        view = f'<br><a href="{html.escape(quote(viewer.as_posix()))}">open in the viewer</a>' if (out_dir / viewer).is_file() else ""
        body.append(
            f"<tr><td><b>{html.escape(sid)}</b><br>{r.get('mpp', '')} mpp{trained}{view}</td><td>{img}</td><td>{frac}</td>"
            f"<td>{r.get('tissue_area_mm2', '-')}</td><td>{r.get('tiles', '-')}</td>"
            f"<td>{r.get('nuclei_count', '-')}</td><td>{r.get('nuclei_per_mm2', '-')}</td></tr>"
        )
    failed_html = ""
    if failures:
        items = os.linesep.join(
            f"<tr><td><b>{html.escape(f['slide'])}</b></td><td>{html.escape(f['stage'])}</td><td><code>{html.escape(f['error'])}</code></td></tr>"
            for f in failures
        )
        failed_html = (f'<h2 class="warn">{len(failures)} failed</h2><p>Fix the cause and rerun: finished slides are kept.</p>'
                       f"<table><tr><th>slide</th><th>stage</th><th>error</th></tr>{os.linesep}{items}</table>")
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>GMR-Path cohort report</title>
<style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:6px;vertical-align:top}}
th{{background:#f3f3f3}}.warn{{color:#b00;font-size:85%}}</style></head><body>
<h1>GMR-Path cohort report</h1><p>{len(rows)} slide(s) done, {len(failures)} failed; full table with run times and speeds:
<a href="cohort.csv">cohort.csv</a>. Click an overlay for the full-size image, or open a slide in the viewer
(pan and zoom with its classes and nuclei; <code>gmrpath view</code> serves this folder where a browser refuses local files).</p>
{failed_html}
<table><tr><th>slide</th><th>overlay</th><th>top classes (tiles)</th><th>tissue mm&sup2;</th><th>tiles</th>
<th>nuclei</th><th>nuclei / mm&sup2;</th></tr>
{os.linesep.join(body)}
</table></body></html>
"""
    from .outputs import atomic_path

    html_path = out_dir / "report.html"
    with atomic_path(html_path) as tmp:
        tmp.write_text(page)
    return csv_path, html_path
