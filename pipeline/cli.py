"""The ``gmrpath`` command line.

Example:
    $ gmrpath --help
    $ gmrpath models
    $ gmrpath benchmark conv --kernel-sizes 9 --repeats 5
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

os.environ.setdefault("KINETO_LOG_LEVEL", "99")  # silence the profiler's USDT chatter on stderr

app = typer.Typer(
    help="GMR-Path: rotation-robust whole-slide histopathology with GMR convolutions.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
bench_app = typer.Typer(help="Speed, memory and equivariance benchmarks (reports, not tests).", no_args_is_help=True)
app.add_typer(bench_app, name="benchmark")
console = Console(stderr=True, soft_wrap=True)  # a message is one line, in a terminal or a log


def _ints(text: str, name: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise typer.BadParameter(f"{name} must be comma-separated integers, got {text!r}") from None


@app.command("models")
def models_cmd() -> None:
    """List the registered network names (for --model and create_model)."""
    from gmr_models import list_models

    for name in list_models():
        typer.echo(name)


def _fail(err: Exception) -> None:
    """Print ``error: <message>`` as exactly one line (never wrapped, in a terminal or a log) and exit 1."""
    from rich.text import Text

    message = " ".join(str(err).split())
    console.print(Text.assemble(("error: ", "bold red"), message), soft_wrap=True, highlight=False)
    raise typer.Exit(1)


class _LazyBar:
    """A rich progress bar that appears at the first update, so a run that fails before doing
    any work prints its error alone (no empty "0/? tiles" bar)."""

    def __init__(self, label: str, unit: str):
        self.label, self.unit, self.bar, self.task, self.start = label, unit, None, None, None

    def __enter__(self) -> "_LazyBar":
        return self

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.stop()

    def __call__(self, done: int, total: int) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        if self.bar is None:
            self.bar = Progress(
                TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn(self.unit),
                TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                console=console, transient=False,
            )
            self.task = self.bar.add_task(self.label, total=total, rate="")
            self.bar.start()
            self.start = time.perf_counter()
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        self.bar.update(self.task, completed=done, total=total, rate=f"{done / elapsed:6.1f} {self.unit}/s")


def _progress(label: str, unit: str = "tiles"):
    """A progress bar reporting units done / total and units/s; returns (context, callback)."""
    bar = _LazyBar(label, unit)
    return bar, bar


def _slide_failed(err: Exception, slide: Path, out: Optional[Path], stage: str) -> None:
    """Record the failure for the cohort report (when the output folder is known), then fail."""
    from pipeline.report import record_failure

    if out is not None:
        record_failure(out, slide, stage, str(err))
    _fail(err)


def _slide_done(slide: Path, out: Path, stage: str) -> None:
    from pipeline.report import clear_failure

    clear_failure(out, slide, stage)


def _pipeline_config(config: Optional[Path], overrides: dict, override_source: str = "command line", need_slides: bool = True):
    from pipeline.config import PipelineConfig, load_config

    default = Path(__file__).resolve().parents[1] / "configs" / "default.yaml"
    path = config if config is not None else (default if default.is_file() else None)
    if path is None:
        cfg = PipelineConfig()
        import dataclasses

        return dataclasses.replace(cfg, **overrides)
    return load_config(path, overrides, override_source, need_slides)


ModelOpt = typer.Option(None, "--model", "-m", help="Registry name (see `gmrpath models`; random weights) or a .pt checkpoint path. Default: the config's.")
OutOpt = typer.Option(None, "--out", "-o", help="Output root; files go to OUT/<slide id>/. Default: the config's out.")
ConfigOpt = typer.Option(None, "--config", "-c", help="YAML config (default: configs/default.yaml).")
MppOpt = typer.Option(None, "--mpp", help="Microns per pixel to use when the slide records none (e.g. 0.25 for 40x, 0.5 for 20x).")
DeviceOpt = typer.Option(None, "--device", help="auto (CUDA if present), cpu, cuda or cuda:N. Default: the config's.")
BatchOpt = typer.Option(None, "--batch-size", min=1, help="Tiles per batch. Default: the config's.")
WorkersOpt = typer.Option(None, "--num-workers", min=0, help="DataLoader workers reading tiles. Default: the config's.")
TtaOpt = typer.Option(None, "--tta", help="none, or d4: average over the 8 rotations/flips (changes nothing for GMR models).")


def _run_overrides(cfg, device, batch_size, num_workers, tta):
    import dataclasses

    run = {k: v for k, v in dict(device=device, batch_size=batch_size, num_workers=num_workers, tta=tta).items() if v is not None}
    if tta is not None and tta not in ("none", "d4"):
        raise typer.BadParameter(f"--tta must be none or d4, got {tta!r}")
    return dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, **run))


def _task_config(task: str, preset: str, config, mpp, model, device, batch_size, num_workers, tta):
    """The config for one CLI task (``classify`` or ``segment``) with the command's overrides;
    a config that leaves the task out gets the ``preset``."""
    import dataclasses

    from pipeline.config import PRESETS, ModelSpec

    cfg = _pipeline_config(config, {} if mpp is None else {"mpp": mpp}, "--mpp", need_slides=False)
    spec = getattr(cfg, task) or ModelSpec(**PRESETS[preset])
    if model is not None:
        spec = dataclasses.replace(spec, model=model)
    return _run_overrides(dataclasses.replace(cfg, **{task: spec}), device, batch_size, num_workers, tta)


@app.command("tissue")
def tissue_cmd(
    slide: Path = typer.Argument(..., help="The slide file."),
    out: Optional[Path] = OutOpt,
    config: Optional[Path] = ConfigOpt,
    mpp: Optional[float] = MppOpt,
) -> None:
    """Detect tissue and write OUT/<slide>/<slide>.tissue.png."""
    from pipeline.predict import open_configured_slide, slide_outputs, tissue_stage
    from pipeline.read import slide_id

    try:
        cfg = _pipeline_config(config, {} if mpp is None else {"mpp": mpp}, "--mpp", need_slides=False)
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
) -> None:
    """Classify the tissue tiles of one slide: OME-Zarr heatmap, GeoJSON, overlay PNG, summary."""
    import json

    from pipeline.predict import classify_slide

    try:
        cfg = _task_config("classify", "nct_crc", config, mpp, model, device, batch_size, num_workers, tta)
        out = Path(cfg.out) if out is None else out
        bar, update = _progress(f"classify {slide.name}")
        with bar:
            summary = classify_slide(slide, cfg, out, progress=update)
    except ValueError as err:
        _slide_failed(err, slide, out, "classify")
    _slide_done(slide, out, "classify")
    Console().print_json(json.dumps({k: summary[k] for k in ("slide", "tiles", "tissue_area_mm2", "class_fraction", "tiles_per_s", "outputs")}))


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
) -> None:
    """Segment nuclei of one slide: OME-Zarr probability + label pyramid, QuPath detections, summary."""
    import json

    from pipeline.segment import segment_slide

    try:
        cfg = _task_config("segment", "nuclei", config, mpp, model, device, batch_size, None, tta)
        out = Path(cfg.out) if out is None else out
        bar, update = _progress(f"nuclei {slide.name}", unit="blocks")
        with bar:
            summary = segment_slide(slide, cfg, out, progress=update, block_px=block_px)
    except ValueError as err:
        _slide_failed(err, slide, out, "segment")
    _slide_done(slide, out, "segment")
    Console().print_json(json.dumps(summary))


@app.command("cohort")
def cohort_cmd(out: Path = typer.Argument(..., help="The output root holding one folder per slide.")) -> None:
    """Aggregate every slide's summary into OUT/cohort.csv and OUT/report.html."""
    from pipeline.report import write_cohort

    try:
        csv_path, html_path = write_cohort(out)
    except (ValueError, OSError) as err:
        _fail(err)
    console.print(f"wrote {csv_path} and {html_path}")


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
        cfg = _pipeline_config(config, overrides, "--set")
    except ValueError as err:
        _fail(err)
    text = yaml.safe_dump(config_to_dict(cfg), sort_keys=False)
    if write is None:
        typer.echo(text)
        return
    from pipeline.outputs import OutputError, atomic_path

    blocker = next((p for p in write.parents if p.exists() and not p.is_dir()), None)
    if blocker is not None:
        _fail(ValueError(f"{write}: cannot write the config: {blocker} is a file, not a folder"))
    try:
        write.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(write) as tmp:
            tmp.write_text(text)
    except OutputError as err:  # a full disk: already one line naming the file
        _fail(err)
    except OSError as err:
        _fail(ValueError(f"{write}: cannot write the config ({err.strerror or err})"))


@bench_app.command("conv")
def bench_conv(
    kernel_sizes: str = typer.Option("3,5,7,9,11", help="Comma-separated odd kernel sizes."),
    shape: str = typer.Option("2,128,64,64", help="Input shape N,C,H,W (N,C,L for 1D; N,C,D,H,W for 3D)."),
    out_channels: int = typer.Option(128, help="Output channels."),
    device: str = typer.Option("auto", help="auto (CUDA if present), cpu, cuda or cuda:N."),
    repeats: int = typer.Option(7, min=1, help="Timed rounds per measurement; the best round is reported."),
    memory: bool = typer.Option(True, help="Also record peak memory of forward+backward."),
    out: Path = typer.Option(Path("results/benchmark_conv.json"), help="Where to write the JSON results."),
) -> None:
    """Time GMRConv (dense, rings, auto) against torch's convolution of the same size."""
    from benchmarks.common import write_json
    from benchmarks.conv import run_conv_benchmark, summary_rows
    from pipeline.runtime import resolve_device

    dev = resolve_device(device)
    ks = _ints(kernel_sizes, "kernel-sizes")
    with console.status("benchmarking") as status:
        result = run_conv_benchmark(
            ks, _ints(shape, "shape"), out_channels, dev, repeats, memory,
            progress=lambda k: status.update(f"benchmarking: k={k} done"),
        )
    result["summary"] = summary_rows(result)
    for tag, title in (("fwd", "inference (no_grad, eval)"), ("train", "forward + backward (train)")):
        table = Table(title=f"{title}: {result['shape']} -> {out_channels}, {result['device']}; speed-up over torch conv")
        cols = ["gmr_auto", "gmr_rings", "gmr_dense", "gmr_conv_pkg"]
        table.add_column("k", justify="right")
        table.add_column("torch conv ms", justify="right")
        for col in cols:
            table.add_column(col, justify="right")
        table.add_column("auto picks", justify="right")
        table.add_column("auto / best GMR path", justify="right")
        for s, row in zip(result["summary"], result["rows"]):
            table.add_row(
                str(s["k"]), f"{s[f'{tag}_conv_ms']:.1f}",
                *(f"{s[f'{tag}_speedup_{c}']:.2f}x" if f"{tag}_speedup_{c}" in s else "-" for c in cols),
                row["auto_choice_forward" if tag == "fwd" else "auto_choice_train"], f"{s[f'{tag}_auto_vs_best']:.2f}",
            )
        Console(width=160).print(table)
    if memory:
        mem = Table(title="peak memory of forward+backward (MiB)")
        names = list(result["rows"][0]["train_peak_mb"])
        mem.add_column("k", justify="right")
        for n in names:
            mem.add_column(n, justify="right")
        for row in result["rows"]:
            mem.add_row(str(row["k"]), *(f"{row['train_peak_mb'][n]:.0f}" for n in names))
        Console(width=160).print(mem)
    console.print(f"speed-up = torch conv time / candidate time; wrote {write_json(out, result)}")


@bench_app.command("impl")
def bench_impl(
    channels: str = typer.Option("16,32,64,128", help="Comma-separated input widths (each with itself and twice itself out)."),
    sides: str = typer.Option("64,146,291,582", help="Comma-separated square input sides in pixels."),
    device: str = typer.Option("auto", help="auto (CUDA if present), cpu, cuda or cuda:N."),
    repeats: int = typer.Option(3, min=1, help="Timed rounds; the best is reported."),
    out: Path = typer.Option(Path("results/benchmark_impl.json"), help="Where to write the JSON results."),
) -> None:
    """Dense vs ring path of one GMRConv over a grid of layer shapes (inference): how often impl="auto" picks the faster."""
    from benchmarks.common import write_json
    from benchmarks.conv import impl_shapes, run_impl_benchmark
    from pipeline.runtime import resolve_device

    shapes = impl_shapes(channels=tuple(_ints(channels, "channels")), sides=tuple(_ints(sides, "sides")))
    with console.status(f"benchmarking {len(shapes)} layer shapes"):
        result = run_impl_benchmark(shapes, resolve_device(device), repeats)
    table = Table(title=f"GMRConv inference, dense vs rings, {result['device']}")
    for col in ("C_in->C_out", "k", "rings", "side px", "dense ms", "rings ms", "auto", "auto / best"):
        table.add_column(col, justify="right")
    for r in result["rows"]:
        cin, cout, k, n, side = r["shape"]
        table.add_row(f"{cin}->{cout}", str(k), str(n), str(side), f"{r['dense_ms']:.1f}", f"{r['rings_ms']:.1f}", r["auto"],
                      f"{r['auto_vs_best']:.2f}")
    Console(width=160).print(table)
    console.print(f"auto within 5% of the faster path for {result['within_5pct']} of {result['n']} shapes")
    console.print(f"wrote {write_json(out, result)}")


@bench_app.command("network")
def bench_network(
    model: str = typer.Option("gmr_resnet18", help="Registered model name."),
    shape: str = typer.Option("16,3,224,224", help="Input shape N,C,H,W (or N,C,D,H,W)."),
    base_channels: int = typer.Option(32, help="base_channels of the model."),
    model_kwargs: str = typer.Option("{}", help="More model arguments as a YAML/JSON mapping, e.g. "
                                     "'{kernel_sizes: [5, 5, 3, 3], num_rings: [5, 5, 3, 3]}'."),
    device: str = typer.Option("auto", help="auto (CUDA if present), cpu, cuda or cuda:N."),
    repeats: int = typer.Option(3, min=1, help="Timed rounds; the best is reported."),
    out: Path = typer.Option(Path("results/benchmark_network.json"), help="Where to write the JSON results."),
) -> None:
    """Whole-network inference with every GMRConv on auto, rings or dense: checks impl="auto" on real layers."""
    import yaml

    from benchmarks.common import write_json
    from benchmarks.conv import run_network_benchmark
    from pipeline.runtime import resolve_device

    try:
        extra = yaml.safe_load(model_kwargs)
    except yaml.YAMLError as err:
        raise typer.BadParameter(f"--model-kwargs is not YAML: {err}") from None
    if not isinstance(extra, dict) or "base_channels" in extra:
        raise typer.BadParameter(f"--model-kwargs must be a mapping of model arguments other than base_channels, got {model_kwargs!r}")
    with console.status("benchmarking"):
        try:
            result = run_network_benchmark(model, _ints(shape, "shape"), resolve_device(device), repeats, base_channels=base_channels, **extra)
        except (TypeError, ValueError) as err:
            _fail(ValueError(f"{model} with {extra}: {err}"))
    table = Table(title=f"{model} (base {base_channels}) on {result['shape']}, {result['device']}")
    for col in ("impl", "ms per batch", "vs auto"):
        table.add_column(col, justify="right")
    for impl, ms in result["ms"].items():
        table.add_row(impl, f"{ms:.1f}", f"{ms / result['ms']['auto']:.2f}")
    Console(width=160).print(table)
    console.print("auto's choices: " + ", ".join(f"{k}: {v}" for k, v in result["auto_choices"].items()))
    console.print(f"wrote {write_json(out, result)}")


@bench_app.command("equivariance")
def bench_equivariance(
    kernel_sizes: str = typer.Option("3,5,7,9,11", help="Comma-separated odd kernel sizes."),
    step: int = typer.Option(5, min=1, max=90, help="Angle step in degrees (0..90)."),
    seeds: int = typer.Option(3, min=1, help="Random weight draws averaged per point."),
    out_dir: Path = typer.Option(Path("results"), help="Folder for benchmark_equivariance.json and .png."),
) -> None:
    """Rotation equivariance error (central disc) for angles 0..90 of GMR, hard-ring and dense kernels."""
    from benchmarks.common import write_json
    from benchmarks.equivariance import plot_equivariance, run_equivariance_benchmark

    ks = _ints(kernel_sizes, "kernel-sizes")
    start = time.perf_counter()
    with console.status("rotating") as status:
        result = run_equivariance_benchmark(
            ks, tuple(range(0, 91, step)), seeds=seeds, progress=lambda k: status.update(f"rotating: k={k} done")
        )
    table = Table(title="mean relative error over angles that are not multiples of 90 degrees")
    table.add_column("variant")
    for k in ks:
        table.add_column(f"k={k}", justify="right")
    for name, per_k in result["mean_off_grid"].items():
        table.add_row(name, *(f"{per_k[k]:.4f}" for k in ks))
    Console().print(table)
    k_show = max(ks)
    curve = Table(title=f"error against angle, k={k_show}")
    curve.add_column("angle", justify="right")
    for name in result["curves"]:
        curve.add_column(name, justify="right")
    for i, a in enumerate(result["angles"]):
        curve.add_row(str(a), *(f"{result['curves'][n][k_show][i]:.4f}" for n in result["curves"]))
    Console().print(curve)
    json_path = write_json(out_dir / "benchmark_equivariance.json", result)
    png_path = plot_equivariance(result, out_dir / "benchmark_equivariance.png")
    console.print(f"wrote {json_path} and {png_path} in {time.perf_counter() - start:.0f} s")


@bench_app.command("pipeline")
def bench_pipeline(
    slide: Path = typer.Argument(Path("data/demo/CMU-1-Small-Region.svs"), help="The slide to measure on."),
    config: Optional[Path] = ConfigOpt,
    device: str = typer.Option("auto", help="auto (CUDA if present), cpu, cuda or cuda:N."),
    repeats: int = typer.Option(2, min=1, help="Runs per rate; the best is reported."),
    tiatoolbox: bool = typer.Option(True, help="Also run TIAToolbox's PatchPredictor with the same model."),
    memory: bool = typer.Option(True, help="Peak memory on generated 1x, 4x, 16x mosaics of the slide's tissue."),
    out: Path = typer.Option(Path("results/benchmark_pipeline.json"), help="Where to write the JSON results."),
) -> None:
    """Tiles/s for reading alone, model alone and end to end; TIAToolbox for comparison; peak memory vs slide size."""
    from benchmarks.common import write_json
    from benchmarks.pipeline import run_pipeline_benchmark

    with console.status("benchmarking the pipeline") as status:
        result = run_pipeline_benchmark(slide, str(config) if config else None, device, repeats, tiatoolbox,
                                        (1, 2, 4) if memory else (), progress=status.update)
    table = Table(title=f"pipeline on {slide.name}: {result['tiles']} tiles, {result['model']}, {result['device']}")
    table.add_column("measure")
    table.add_column("value", justify="right")
    for name, rate in result["tiles_per_s"].items():
        table.add_row(f"{name} tiles/s", f"{rate:.2f}")
    table.add_row("end to end / model alone", f"{result['end_to_end_vs_model']:.3f}")
    if "tiatoolbox" in result:
        table.add_row("TIAToolbox PatchPredictor patches/s", str(result["tiatoolbox"]["patches_per_s"]))
        table.add_row("end to end / TIAToolbox", str(result.get("end_to_end_vs_tiatoolbox")))
    for m in result.get("memory", []):
        table.add_row(f"peak RSS, {m['area_x']}x area {m['dimensions_px']}", f"{m['peak_rss_mib']:.0f} MiB")
    Console(width=160).print(table)
    console.print(f"wrote {write_json(out, result)}")


@bench_app.command("segment")
def bench_segment(
    slide: Path = typer.Argument(Path("data/demo/CMU-1-Small-Region.svs"), help="The slide to measure on."),
    model: list[str] = typer.Option([], "--model", "-m", help="Candidates (checkpoints or names); default: the nuclei preset's."),
    device: str = typer.Option("auto", help="auto (CUDA if present), cpu, cuda or cuda:N."),
    repeats: int = typer.Option(2, min=1, help="Forward passes per candidate; the best is reported."),
    block_px: int = typer.Option(1024, min=64, help="Block side at the model's mpp."),
    end_to_end: bool = typer.Option(True, help="Also time segment_slide on the whole slide."),
    out: Path = typer.Option(Path("results/benchmark_segment.json"), help="Where to write the JSON results."),
) -> None:
    """Nuclei segmentation: Mpx/s of the model alone per candidate, and the whole slide end to end."""
    from benchmarks.common import write_json
    from benchmarks.segment import run_segment_benchmark

    try:
        with console.status("benchmarking segmentation") as status:
            result = run_segment_benchmark(slide, model or None, device, repeats, block_px, end_to_end, progress=status.update)
    except ValueError as err:
        _fail(err)
    table = Table(title=f"nuclei segmentation, {result['device']}, blocks of {block_px} px")
    for col in ("model", "margin px", "ms per block", "Mpx/s"):
        table.add_column(col)
    for name, r in result["model_alone"].items():
        table.add_row(name, str(r["margin_px"]), f"{r['block_ms']:.0f}", f"{r['megapixels_per_s']:.3f}")
    Console(width=160).print(table)
    if "end_to_end" in result:
        e = result["end_to_end"]
        console.print(f"segment_slide {slide.name} with {e['model']}: {e['wall_s']:.1f} s, {e['blocks']} blocks, "
                      f"{e['megapixels_per_s']:.3f} Mpx/s, {e['nuclei']} nuclei")
    console.print(f"wrote {write_json(out, result)}")


@bench_app.command("train")
def bench_train(
    device: str = typer.Option("auto", help="auto (CUDA if present), cpu, cuda or cuda:N."),
    repeats: int = typer.Option(3, min=1, help="Interleaved rounds; the best is reported."),
    workers: int = typer.Option(1, min=0, help="DataLoader workers for the loader-alone rate."),
    memory: bool = typer.Option(True, help="Also measure peak memory of a step."),
    out: Path = typer.Option(Path("results/benchmark_train.json"), help="Where to write the JSON results."),
) -> None:
    """Training step images/s and peak memory, GMR vs ordinary convolutions, and the data loader alone."""
    from benchmarks.common import write_json
    from benchmarks.training import run_training_benchmark

    with console.status("benchmarking training") as status:
        result = run_training_benchmark(device, repeats, workers, memory, progress=status.update)
    table = Table(title=f"training step, {result['device']}, best of {repeats}")
    for col in ("task", "model", "images/s", "step ms", "peak MiB", "loader alone images/s"):
        table.add_column(col)
    for task, pair in result["pairs"].items():
        for name, r in pair["models"].items():
            if isinstance(r, dict):
                table.add_row(task, name, f"{r['images_per_s']:.2f}", f"{r['step_ms']:.0f}", str(r.get("peak_memory_mib", "")),
                              str(result["loader_images_per_s"][task]))
    Console(width=160).print(table)
    console.print(f"wrote {write_json(out, result)}")


def _register_training() -> None:
    from training.cli import add_commands  # light: the training stack is imported by the commands themselves

    add_commands(app, console, _fail)


_register_training()


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
