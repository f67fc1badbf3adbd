"""The slide commands: ``gmrpath tissue | predict | segment | cohort | config | models``.

A thin layer over :mod:`pipeline`: parse options, build the config, call the stage, print one
line or the summary. Heavy imports happen inside the commands so ``gmrpath --help`` is quick.

Example::

    $ gmrpath predict data/demo/CMU-1-Small-Region.svs --out results/
    $ gmrpath segment crop.png --mpp 0.25 --out results/
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from .common import MARKER_H_DENSE_HELP, ThreadsOpt, console, fail, pipeline_config, postprocess_options, progress_bar, use_threads

__all__ = ["app"]

app = typer.Typer()


@app.command("models")
def models_cmd() -> None:
    """List the registered network names (for --model and create_model)."""
    from gmr_models import list_models

    for name in list_models():
        typer.echo(name)


def _slide_failed(err: Exception, slide: Path, out: Optional[Path], stage: str) -> None:
    """Record the failure for the cohort report (when the output folder is known), then fail."""
    from pipeline.report import record_failure

    if out is not None:
        record_failure(out, slide, stage, str(err))
    fail(err)


def _slide_done(slide: Path, out: Path, stage: str) -> None:
    from pipeline.report import clear_failure

    clear_failure(out, slide, stage)


ModelOpt = typer.Option(None, "--model", "-m", help="Registry name (see `gmrpath models`; random weights) or a .pt checkpoint path. Default: the config's.")
OutOpt = typer.Option(None, "--out", "-o", help="Output root; files go to OUT/<slide id>/. Default: the config's out.")
ConfigOpt = typer.Option(None, "--config", "-c", help="YAML config (default: configs/default.yaml).")
MppOpt = typer.Option(None, "--mpp", help="Microns per pixel to use when the slide records none (e.g. 0.25 for 40x, 0.5 for 20x).")
DeviceOpt = typer.Option(None, "--device", help="auto (CUDA if present), cpu, cuda or cuda:N. Default: the config's.")
BatchOpt = typer.Option(None, "--batch-size", min=1, help="Tiles per batch. Default: the config's.")
WorkersOpt = typer.Option(None, "--num-workers", min=0, help="DataLoader workers reading tiles. Default: the config's.")
TtaOpt = typer.Option(None, "--tta", help="none, or d4: average over the 8 rotations/flips (changes nothing for GMR models).")
ViewerOpt = typer.Option(None, "--viewer/--no-viewer", help="Write OUT/<slide>/viewer/index.html too. Default: the config's run.viewer.")


def _run_overrides(cfg, device, batch_size, num_workers, tta):
    import dataclasses

    run = {k: v for k, v in dict(device=device, batch_size=batch_size, num_workers=num_workers, tta=tta).items() if v is not None}
    if tta is not None and tta not in ("none", "d4"):
        raise typer.BadParameter(f"--tta must be none or d4, got {tta!r}")
    return dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, **run))


def _task_config(task: str, preset: str, config, mpp, model, device, batch_size, num_workers, tta, stain_norm=None,
                 postprocess=None):
    """The config for one CLI task (``classify`` or ``segment``) with the command's overrides;
    a config that leaves the task out gets the ``preset``."""
    import dataclasses

    from pipeline.config import preset_spec

    cfg = pipeline_config(config, {} if mpp is None else {"mpp": mpp}, "--mpp", need_slides=False)
    spec = getattr(cfg, task) or preset_spec(preset)
    if model is not None:
        spec = dataclasses.replace(spec, model=model)
    if stain_norm is not None:
        spec = dataclasses.replace(spec, stain_norm=stain_norm)
    if postprocess:
        from pipeline.instances import PostProcessError, postprocess_from

        merged = {**spec.postprocess, **postprocess}
        try:
            postprocess_from(merged)
        except PostProcessError as err:
            option = f"--{err.field.replace('_', '-')}" if err.field in postprocess else "post-processing"
            raise typer.BadParameter(f"{option}: {err}") from None
        spec = dataclasses.replace(spec, postprocess=merged)
    return _run_overrides(dataclasses.replace(cfg, **{task: spec}), device, batch_size, num_workers, tta)


def _run_slide_task(task: str, preset: str, slide: Path, out: Optional[Path], options: dict, run, unit: str = "tiles",
                    viewer: Optional[bool] = None):
    """Build the task's config, run ``run(cfg, out, progress)`` under a progress bar, record a failure
    for the cohort report (one line, exit 1) or clear an old one, then write the slide's viewer
    (``viewer``, default the config's ``run.viewer``); returns ``(cfg, out, summary)``."""
    label = {"classify": "classify", "segment": "nuclei"}[task]
    try:
        cfg = _task_config(task, preset, **options)
        out = Path(cfg.out) if out is None else out
        bar, update = progress_bar(f"{label} {slide.name}", unit=unit)
        with bar:
            summary = run(cfg, out, update)
    except ValueError as err:
        _slide_failed(err, slide, out, task)
    _slide_done(slide, out, task)
    if cfg.run.viewer if viewer is None else viewer:
        from .viewer import write_slide_viewer

        try:
            summary.setdefault("outputs", {})["viewer"] = str(write_slide_viewer(slide, cfg, out))
        except ValueError as err:
            fail(ValueError(f"viewer: {err}"))
    if summary.get("settings_from_checkpoint"):
        console.print(f"{slide.name}: took {'; '.join(summary['settings_from_checkpoint'])} from the checkpoint "
                      f"(the {preset} preset's differ; set them in the config to insist)")
    return cfg, out, summary


@app.command("tissue")
def tissue_cmd(
    slide: Path = typer.Argument(..., help="The slide file."),
    out: Optional[Path] = OutOpt,
    config: Optional[Path] = ConfigOpt,
    mpp: Optional[float] = MppOpt,
) -> None:
    """Detect tissue and write OUT/<slide>/<slide>.tissue.png."""
    from pipeline.stages import open_configured_slide, slide_outputs, tissue_stage
    from pipeline.read import slide_id

    try:
        cfg = pipeline_config(config, {} if mpp is None else {"mpp": mpp}, "--mpp", need_slides=False)
        out = Path(cfg.out) if out is None else out
        s = open_configured_slide(slide, cfg)
        mask, _ = tissue_stage(s, cfg, out)
    except ValueError as err:
        _slide_failed(err, slide, out, "tissue")
    _slide_done(slide, out, "tissue")
    area = float(mask.sum()) * cfg.tissue.mask_mpp**2 / 1e6
    console.print(f"{slide}: tissue {area:.2f} mm^2 -> {slide_outputs(out, slide_id(slide))['tissue_png']}")


@app.command("predict")
def predict_cmd(
    slide: Path = typer.Argument(..., help="The slide file (svs, ndpi, tiff, mrxs, OME-TIFF, ...)."),
    model: Optional[str] = ModelOpt,
    out: Optional[Path] = OutOpt,
    config: Optional[Path] = ConfigOpt,
    mpp: Optional[float] = MppOpt,
    batch_size: Optional[int] = BatchOpt,
    device: Optional[str] = DeviceOpt,
    num_workers: Optional[int] = WorkersOpt,
    tta: Optional[str] = TtaOpt,
    viewer: Optional[bool] = ViewerOpt,
    threads: Optional[int] = ThreadsOpt,
) -> None:
    """Classify the tissue tiles of one slide: OME-Zarr heatmap, GeoJSON, overlay PNG, summary, viewer."""
    from pipeline.predict import classify_slide

    use_threads(threads)
    cfg, out, summary = _run_slide_task("classify", "nct_crc", slide, out, dict(
        config=config, mpp=mpp, model=model, device=device, batch_size=batch_size, num_workers=num_workers, tta=tta),
        lambda cfg, out, update: classify_slide(slide, cfg, out, progress=update), viewer=viewer)
    Console().print_json(json.dumps({k: summary[k] for k in ("slide", "model", "trained", "tiles", "tissue_area_mm2", "class_fraction", "tiles_per_s", "outputs")}))


@app.command("segment")
def segment_cmd(
    slide: Path = typer.Argument(..., help="The slide file."),
    model: Optional[str] = ModelOpt,
    out: Optional[Path] = OutOpt,
    config: Optional[Path] = ConfigOpt,
    mpp: Optional[float] = MppOpt,
    batch_size: Optional[int] = BatchOpt,
    device: Optional[str] = DeviceOpt,
    tta: Optional[str] = TtaOpt,
    block_px: int = typer.Option(1024, min=64, help="Side of the blocks segmented and written at a time (pixels at the model's mpp)."),
    viewer: Optional[bool] = ViewerOpt,
    stain_norm: Optional[str] = typer.Option(None, "--stain-norm", help="Map the slide's stains onto a reference first: "
                                             "METHOD:REFERENCE_IMAGE (macenko, vahadane, reinhard); 'none' turns off "
                                             "the checkpoint's own (default: the checkpoint's, if any)."),
    fg_threshold: Optional[float] = typer.Option(None, "--fg-threshold", help="Foreground probability above which a pixel "
                                                 "is nucleus (default: the config's, else the checkpoint's)."),
    marker_h: Optional[float] = typer.Option(None, "--marker-h", help="Marker height of the distance map: higher merges "
                                             "nuclei that come out split, lower splits clumps (default: the config's, "
                                             "else the checkpoint's)."),
    marker_h_dense: Optional[float] = typer.Option(None, "--marker-h-dense", help=MARKER_H_DENSE_HELP + " Default: the "
                                                   "config's, else the checkpoint's."),
    threads: Optional[int] = ThreadsOpt,
) -> None:
    """Segment nuclei of one slide: OME-Zarr probability + label pyramid, QuPath detections, summary, viewer."""
    from pipeline.segment import segment_slide

    use_threads(threads)
    cfg, out, summary = _run_slide_task("segment", "nuclei", slide, out, dict(
        config=config, mpp=mpp, model=model, device=device, batch_size=batch_size, num_workers=None, tta=tta,
        stain_norm=stain_norm, postprocess=postprocess_options(fg_threshold, marker_h, marker_h_dense)),
        lambda cfg, out, update: segment_slide(slide, cfg, out, progress=update, block_px=block_px), unit="blocks",
        viewer=viewer)
    Console().print_json(json.dumps(summary))


@app.command("cohort")
def cohort_cmd(out: Path = typer.Argument(..., help="The output root holding one folder per slide.")) -> None:
    """Aggregate every slide's summary into OUT/cohort.csv and OUT/report.html (and bring each slide's
    viewer page up to date with all of its layers)."""
    from pipeline.report import write_cohort
    from pipeline.write_viewer import write_viewer_pages

    try:
        pages = write_viewer_pages(out) if out.is_dir() else []
        csv_path, html_path = write_cohort(out)
    except (ValueError, OSError) as err:
        fail(err)
    console.print(f"wrote {csv_path} and {html_path}" + (f"; {len(pages)} viewer page(s)" if pages else ""))


@app.command("config")
def config_cmd(
    config: Optional[Path] = ConfigOpt,
    set_: list[str] = typer.Option([], "--set", help="Override a top-level key, e.g. --set slides=/data/wsi (repeatable)."),
    write: Optional[Path] = typer.Option(None, help="Write the validated, path-resolved config here (YAML)."),
) -> None:
    """Validate a config (with overrides) and print or write the resolved result."""
    import yaml

    from pipeline.config import config_to_dict

    overrides = {}
    for item in set_:
        key, sep, value = item.partition("=")
        if not sep:
            raise typer.BadParameter(f"--set takes key=value, got {item!r}")
        overrides[key] = yaml.safe_load(value)
    try:
        cfg = pipeline_config(config, overrides, "--set")
    except ValueError as err:
        fail(err)
    text = yaml.safe_dump(config_to_dict(cfg), sort_keys=False)
    if write is None:
        typer.echo(text)
        return
    from pipeline.outputs import OutputError, atomic_path

    blocker = next((p for p in write.parents if p.exists() and not p.is_dir()), None)
    if blocker is not None:
        fail(ValueError(f"{write}: cannot write the config: {blocker} is a file, not a folder"))
    try:
        write.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(write) as tmp:
            tmp.write_text(text)
    except OutputError as err:  # a full disk: already one line naming the file
        fail(err)
    except OSError as err:
        fail(ValueError(f"{write}: cannot write the config ({err.strerror or err})"))
