"""The viewer commands: ``gmrpath viewer SLIDE`` writes ``OUT/<slide>/viewer/index.html`` from the
slide and the run's outputs; ``gmrpath view OUT`` serves an output folder on 127.0.0.1 for browsers
that refuse ``file://`` pages.

Example::

    $ gmrpath viewer data/demo/CMU-1-Small-Region.svs --out results/demo
    $ gmrpath view results/demo --port 8765
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from .common import console, fail, progress_bar

__all__ = ["app", "write_slide_viewer", "serve", "take_screenshot", "find_chromium", "CHROMIUM_FLAGS"]

app = typer.Typer()


def write_slide_viewer(slide: Path, cfg, out: Path, tiles_only: bool = False) -> Path:
    """Open ``slide`` as the config says and write (or update) its viewer under ``out``: the tiles, and
    unless ``tiles_only`` the page; returns ``index.html`` (``slide.json`` with ``tiles_only``)."""
    from pipeline.read import slide_id
    from pipeline.stages import open_configured_slide
    from pipeline.write_viewer import write_viewer, write_viewer_tiles

    s = open_configured_slide(slide, cfg)
    try:
        bar, update = progress_bar(f"viewer {slide.name}", unit="tiles")
        with bar:
            return (write_viewer_tiles if tiles_only else write_viewer)(s, out, slide_id(slide), progress=update)
    finally:
        s.close()


@app.command("viewer")
def viewer_cmd(
    slide: Path = typer.Argument(..., help="The slide file."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Output root (default: the config's out)."),
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="YAML config (default: configs/default.yaml)."),
    mpp: Optional[float] = typer.Option(None, "--mpp", help="Microns per pixel when the slide records none."),
    tiles_only: bool = typer.Option(False, "--tiles-only", help="Only the slide's tiles (the workflow writes the page "
                                    "with `gmrpath cohort`, once every layer is there)."),
) -> None:
    """Write OUT/<slide>/viewer/index.html: the slide in deep zoom with its classes and nuclei, offline."""
    from .common import pipeline_config

    try:
        cfg = pipeline_config(config, {} if mpp is None else {"mpp": mpp}, "--mpp", need_slides=False)
        out = Path(cfg.out) if out is None else out
        index = write_slide_viewer(slide, cfg, out, tiles_only)
    except ValueError as err:
        fail(err)
    console.print(f"viewer: {index}")


def serve(root: Path, port: int = 0):
    """A static file server for ``root`` on 127.0.0.1 (``port`` 0: any free one), in a daemon thread;
    returns the server (``server.server_address[1]`` is the port; ``shutdown()`` stops it)."""
    import functools
    import http.server
    import threading

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args) -> None:  # no line per request
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", port), functools.partial(Quiet, directory=str(root)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


# headless Chromium on a machine with no network: without the background-networking flags it keeps
# trying to reach Google's hosts; --no-sandbox because CI runs as root
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync", "--hide-scrollbars",
                  "--virtual-time-budget=20000")


def find_chromium() -> Optional[str]:
    """The Chromium (or Chrome) executable on PATH, or None."""
    import shutil

    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


def take_screenshot(url: str, png: Path, size: str = "1280,900") -> None:
    """Save ``url`` as a PNG with headless Chromium (Debian's ``chromium``), after its scripts ran."""
    import subprocess
    import tempfile

    browser = find_chromium()
    if browser is None:
        raise RuntimeError("no Chromium found (Debian: apt-get install chromium)")
    with tempfile.TemporaryDirectory() as profile:
        proc = subprocess.run([browser, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", f"--window-size={size}",
                               f"--screenshot={Path(png).resolve()}", url], capture_output=True, text=True, timeout=120)
    if proc.returncode != 0 or not Path(png).is_file():
        raise RuntimeError(f"Chromium failed ({proc.returncode}): {proc.stderr.strip().splitlines()[-1:]}")


@app.command("view")
def view_cmd(
    out: Path = typer.Argument(..., help="An output root (or one slide's folder) holding viewer/index.html pages."),
    port: int = typer.Option(8765, "--port", min=0, max=65535, help="Port on 127.0.0.1 (0: any free one)."),
    screenshot: Optional[Path] = typer.Option(None, "--screenshot", help="Instead of serving: save the first viewer as a "
                                              "PNG with headless Chromium (the README's figure) and exit."),
    view: str = typer.Option("", "--hash", help="With --screenshot: the view, as the page's URL hash (e.g. 'zoom=1&center=900,1200')."),
) -> None:
    """Serve OUT on http://127.0.0.1:PORT/ and print each slide's viewer address (Ctrl-C stops)."""
    import time
    import urllib.parse

    if not out.is_dir():
        fail(ValueError(f"{out}: output folder not found"))
    pages = sorted(out.glob("*/viewer/index.html")) + sorted(out.glob("viewer/index.html"))
    if not pages:
        fail(ValueError(f"{out}: no viewer/index.html found (run gmrpath predict/segment or gmrpath viewer first)"))
    try:
        server = serve(out, port)
    except OSError as err:
        fail(ValueError(f"127.0.0.1:{port}: cannot serve ({err.strerror}); try another --port"))
    base = f"http://127.0.0.1:{server.server_address[1]}/"
    if screenshot is not None:
        try:
            take_screenshot(base + urllib.parse.quote(str(pages[0].relative_to(out))) + (f"#{view}" if view else ""), screenshot)
        except (OSError, RuntimeError) as err:
            fail(ValueError(f"{screenshot}: {err}"))
        finally:
            server.shutdown()
        console.print(f"wrote {screenshot}")
        return
    for page in pages:
        console.print(base + urllib.parse.quote(str(page.relative_to(out))))
    if (out / "report.html").is_file():
        console.print(f"cohort report: {base}report.html")
    console.print("serving; Ctrl-C stops")
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        server.shutdown()
