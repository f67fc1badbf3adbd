"""The slide viewer (pipeline/write_viewer.py, gmrpath viewer / view): Deep Zoom tiles written once and
resumably, layers from the run's own GeoJSON, names escaped, one-line errors; and in a real browser
(headless Chromium through `gmrpath view`'s server): no console errors, each layer draws, zooming to a
nucleus shows its outline, the legend lists the classes."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from benchmarks.synthetic import read_demo_tissue, write_pyramidal_tiff
from conftest import DEMO_SLIDE
from gmrpath.cli import app
from gmrpath.viewer import CHROMIUM_FLAGS, find_chromium
from pipeline.write_viewer import deep_zoom_levels

NAME = "<img src=x onerror=alert(1)> & co"  # a slide file name that must stay text
CLASSES = ["tumour", "stroma</script><b>", "fat"]


def _data(viewer: Path) -> dict:
    text = (viewer / "data.js").read_text()
    assert text.startswith("window.GMR_VIEWER = ") and "<" not in text and ">" not in text
    return json.loads(text[len("window.GMR_VIEWER = "):].rstrip().rstrip(";"))


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A small real slide (the demo tissue re-tiled), classified by a fresh checkpoint with awkward class
    names and segmented by the shipped model, each command writing the viewer as users get it."""
    import torch

    from gmr_models import create_model
    from pipeline.models import save_checkpoint

    root = tmp_path_factory.mktemp("viewer")
    slide = write_pyramidal_tiff(root / f"{NAME}.tif", read_demo_tissue(DEMO_SLIDE)[700:1724, 500:1268], mpp=0.5, levels=2)
    torch.manual_seed(0)
    kwargs = {"num_classes": 3, "base_channels": 4, "kernel_sizes": [5, 5, 3, 3]}
    ckpt = save_checkpoint(create_model("gmr_resnet18", **kwargs), root / "best.pt", "gmr_resnet18", kwargs, CLASSES, 96, 1.0)
    out = root / "out"
    runner = CliRunner()
    for cmd in (["predict", str(slide), "--model", str(ckpt)], ["segment", str(slide)]):
        result = runner.invoke(app, cmd + ["--out", str(out), "--device", "cpu"])
        assert result.exit_code == 0, result.output
    sid = next(p.name for p in out.iterdir() if (p / "viewer").is_dir())
    return {"slide": slide, "out": out, "viewer": out / sid / "viewer", "sid": sid}


def test_deep_zoom_levels_span_one_tile_to_full_resolution():
    assert deep_zoom_levels(2220, 2967) == (8, 12)  # 2967 px: 12 halvings from 1 px, 4 to fit 254 px
    assert deep_zoom_levels(200, 100) == (8, 8)
    lo, hi = deep_zoom_levels(100_000, 80_000)
    assert hi == 17 and 100_000 / 2 ** (hi - lo) <= 254 < 100_000 / 2 ** (hi - lo - 1)


def test_viewer_files_layers_and_escaping(run):
    viewer = run["viewer"]
    for name in ("index.html", "viewer.js", "data.js", "openseadragon.min.js", "LICENSE-openseadragon.txt"):
        assert (viewer / name).is_file(), name
    d = _data(viewer)
    lo, hi = d["dzi"]["min_level"], d["dzi"]["max_level"]
    assert sorted(int(p.name) for p in (viewer / "slide_files").iterdir() if p.is_dir()) == list(range(lo, hi + 1))
    w, h = d["dzi"]["width"], d["dzi"]["height"]
    top = Image.open(viewer / "slide_files" / str(lo) / "0_0.jpeg")
    assert top.size == (-(-w // 2 ** (hi - lo)), -(-h // 2 ** (hi - lo)))  # the whole slide in one tile
    full = Image.open(viewer / "slide_files" / str(hi) / "0_0.jpeg")
    assert full.size == (255, 255) and np.abs(np.asarray(full, int)[:254, :254] - read_demo_tissue(DEMO_SLIDE)[700:954, 500:754]).mean() < 8
    # layers from the run's own files
    summary = json.loads((run["out"] / run["sid"] / f"{run['sid']}.summary.json").read_text())
    tiles = json.loads(next(run["out"].rglob("*.tiles.geojson")).read_text())["features"]
    nuclei = json.loads(next(run["out"].rglob("*.nuclei.geojson")).read_text())["features"]
    assert d["classify"]["classes"] == CLASSES and len(d["classify"]["tiles"]) == len(tiles) == summary["tiles"]
    assert d["classify"]["trained"] is True and d["nuclei"]["trained"] is True
    assert len(d["nuclei"]["polygons"]) == len(nuclei) > 20 and len(d["nuclei"]["area_um2"]) == len(nuclei)
    assert d["file"] == Path(run["slide"]).name == f"{NAME}.tif"
    assert "onerror" not in (viewer / "index.html").read_text()  # the page is static: names reach it as data only
    # the cohort report links the viewer
    assert CliRunner().invoke(app, ["cohort", str(run["out"])]).exit_code == 0
    assert f'href="{run["sid"]}/viewer/index.html"' in (run["out"] / "report.html").read_text()


def test_tiles_are_written_once_and_a_killed_run_resumes(run, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(run["out"], out)
    viewer = out / run["sid"] / "viewer"
    tiles = sorted((viewer / "slide_files").rglob("*.jpeg"))
    stamps = {p: p.stat().st_mtime_ns for p in tiles}
    result = CliRunner().invoke(app, ["viewer", str(run["slide"]), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert all(p.stat().st_mtime_ns == stamps[p] for p in tiles)  # finished: nothing rewritten
    # a run killed half-way: no completion mark, some tiles missing
    (viewer / "slide_files" / ".complete").unlink()
    gone = tiles[::3]
    for p in gone:
        p.unlink()
    assert CliRunner().invoke(app, ["viewer", str(run["slide"]), "--out", str(out)]).exit_code == 0
    assert all(p.is_file() for p in gone)
    assert all(p.stat().st_mtime_ns == stamps[p] for p in tiles if p not in gone)  # only the missing ones redone
    assert not list(viewer.rglob("*.tmp*"))


def test_unreadable_slide_and_full_disk_are_one_line(run, tmp_path, monkeypatch):
    import pipeline.write_viewer as wv
    from pipeline.read import SlideError

    out = tmp_path / "out"
    shutil.copytree(run["out"], out, ignore=shutil.ignore_patterns("slide_files"))

    def unreadable(slide, *a, **k):
        raise SlideError(f"{slide.path}: cannot read level 0 at (x=0, y=0): OSError: corrupt tile")

    monkeypatch.setattr(wv, "read_region", unreadable)
    result = CliRunner().invoke(app, ["viewer", str(run["slide"]), "--out", str(out)])
    assert result.exit_code == 1 and "corrupt tile" in result.output and "Traceback" not in result.output
    monkeypatch.undo()

    def full(self, fp, *a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Image.Image, "save", full)
    result = CliRunner().invoke(app, ["viewer", str(run["slide"]), "--out", str(out)])
    assert result.exit_code == 1 and "No space left on device" in result.output and "cannot write a viewer tile" in result.output
    assert not list(out.rglob("*.tmp.jpeg")) and not list(out.rglob("*.jpeg"))  # nothing half-written


def test_view_serves_the_output_folder(run):
    import urllib.request

    from gmrpath.viewer import serve

    server = serve(run["out"], 0)
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/{run['sid']}/viewer/data.js"
        assert urllib.request.urlopen(url, timeout=10).read().startswith(b"window.GMR_VIEWER")
    finally:
        server.shutdown()
    result = CliRunner().invoke(app, ["view", str(run["out"] / "nowhere")])
    assert result.exit_code == 1 and "not found" in result.output


# --- in a real browser -------------------------------------------------------------------------------------------

CHROMIUM = find_chromium()


def _browser(url: str, tmp: Path, what: str) -> tuple[str, str]:
    """Headless Chromium on ``url``: ``what`` is ``dom`` (the DOM after the page's scripts ran) or a PNG path."""
    args = [CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={tmp / 'profile'}", "--window-size=1280,900",
            "--enable-logging=stderr", "--v=0"]
    args += ["--dump-dom"] if what == "dom" else [f"--screenshot={what}"]
    proc = subprocess.run(args + [url], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout, proc.stderr


def _console_errors(stderr: str) -> list[str]:
    """Console messages at error level, and uncaught exceptions (Chromium logs them as ERROR:CONSOLE)."""
    return [ln for ln in stderr.splitlines() if re.search(r"(ERROR|WARNING):CONSOLE", ln) or ("CONSOLE" in ln and "Uncaught" in ln)]


@pytest.mark.skipif(CHROMIUM is None, reason="no Chromium here (.ci/run installs Debian's chromium; apt-get install chromium)")
def test_viewer_in_a_real_browser(run, tmp_path):
    from gmrpath.viewer import serve

    server = serve(run["out"], 0)
    base = f"http://127.0.0.1:{server.server_address[1]}/{run['sid']}/viewer/index.html"
    try:
        dom, log = _browser(base, tmp_path, "dom")
        if 'data-ready="1"' not in dom and not _console_errors(log):  # a cold first Chromium start (profile, fonts) on a
            dom, log = _browser(base, tmp_path, "dom")                # busy 2-core machine can dump the DOM too early: once more
        assert not _console_errors(log), _console_errors(log)
        assert 'data-ready="1"' in dom
        assert int(re.search(r'data-drawn-tiles="(\d+)"', dom).group(1)) == len(_data(run["viewer"])["classify"]["tiles"])
        count = lambda what, page: int(re.search(rf'data-drawn-{what}="(\d+)"', page).group(1))  # noqa: E731
        assert count("outlines", dom) + count("density", dom) > 0
        legend = re.findall(r'<span class="legend-name">(.*?)</span>', dom)
        import html

        assert [html.unescape(x) for x in legend] == CLASSES  # the legend is the classes, as text
        assert html.escape(NAME, quote=False) in dom and "<img src=x" not in dom.replace(html.escape("<img src=x"), "")
        # each layer draws: the page with its layers differs from the slide alone where the tiles are
        _browser(base, tmp_path, str(tmp_path / "all.png"))
        _browser(base + "#layers=none", tmp_path, str(tmp_path / "none.png"))
        a = np.asarray(Image.open(tmp_path / "all.png").convert("RGB"), float)[40:, :1000]
        b = np.asarray(Image.open(tmp_path / "none.png").convert("RGB"), float)[40:, :1000]
        assert np.abs(a - b).mean() > 3 and (np.abs(a - b).sum(-1) > 30).mean() > 0.05
        zoomed_out, _ = _browser(base + "#zoom=0.2", tmp_path, "dom")  # far out: nuclei as a density map
        assert count("density", zoomed_out) > 0 and count("outlines", zoomed_out) == 0
        # zoomed to a nucleus: its outline is drawn, its measurements shown
        dom, log = _browser(base + "#select=nucleus:5&zoom=3&layers=nuclei", tmp_path, "dom")
        assert not _console_errors(log)
        assert int(re.search(r'data-drawn-outlines="(\d+)"', dom).group(1)) >= 1 and 'data-selected="nucleus:5"' in dom
        assert "area" in dom and "µm²" in html.unescape(dom)
        _browser(base + "#select=nucleus:5&zoom=3&layers=nuclei", tmp_path, str(tmp_path / "nucleus.png"))
        shot = np.asarray(Image.open(tmp_path / "nucleus.png").convert("RGB"), int)[40:, :1000]
        outline = (np.abs(shot - np.array([0, 200, 255])).sum(-1) < 60)
        assert outline.sum() > 50  # the outline colour is on screen
        # and straight from the file, with no server
        dom, log = _browser((run["viewer"] / "index.html").as_uri(), tmp_path, "dom")
        assert 'data-ready="1"' in dom and count("tiles", dom) > 0 and not _console_errors(log)
    finally:
        server.shutdown()
