"""``gmrpath benchmark ...``: speed, memory and equivariance reports (never timed tests).

Each command runs one function of :mod:`benchmarks`, prints a table and writes JSON.

Example::

    $ gmrpath benchmark conv --kernel-sizes 9 --repeats 5
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from .common import console, fail, ints
from .slides import ConfigOpt

__all__ = ["app"]

app = typer.Typer(help="Speed, memory and equivariance benchmarks (reports, not tests).", no_args_is_help=True)
DeviceOpt = typer.Option("auto", help="auto (CUDA if present), cpu, cuda or cuda:N.")


def _repeats(default: int, what: str = "Timed rounds; the best is reported."):
    return typer.Option(default, min=1, help=what)


def _json_out(name: str):
    return typer.Option(Path(f"results/{name}.json"), help="Where to write the JSON results.")


@app.command("conv")
def bench_conv(
    kernel_sizes: str = typer.Option("3,5,7,9,11", help="Comma-separated odd kernel sizes."),
    shape: str = typer.Option("2,128,64,64", help="Input shape N,C,H,W (N,C,L for 1D; N,C,D,H,W for 3D)."),
    out_channels: int = typer.Option(128, help="Output channels."),
    device: str = DeviceOpt,
    repeats: int = _repeats(7, "Timed rounds per measurement; the best round is reported."),
    memory: bool = typer.Option(True, help="Also record peak memory of forward+backward."),
    out: Path = _json_out("benchmark_conv"),
) -> None:
    """Time GMRConv (dense, rings, auto) against torch's convolution of the same size."""
    from benchmarks.common import write_json
    from benchmarks.conv import run_conv_benchmark, summary_rows
    from pipeline.runtime import resolve_device

    dev = resolve_device(device)
    ks = ints(kernel_sizes, "kernel-sizes")
    with console.status("benchmarking") as status:
        result = run_conv_benchmark(
            ks, ints(shape, "shape"), out_channels, dev, repeats, memory,
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


@app.command("impl")
def bench_impl(
    channels: str = typer.Option("16,32,64,128", help="Comma-separated input widths (each with itself and twice itself out)."),
    sides: str = typer.Option("64,146,291,582", help="Comma-separated square input sides in pixels."),
    device: str = DeviceOpt,
    repeats: int = _repeats(3, "Timed rounds; the best is reported."),
    out: Path = _json_out("benchmark_impl"),
) -> None:
    """Dense vs ring path of one GMRConv over a grid of layer shapes (inference): how often impl="auto" picks the faster."""
    from benchmarks.common import write_json
    from benchmarks.conv import impl_shapes, run_impl_benchmark
    from pipeline.runtime import resolve_device

    shapes = impl_shapes(channels=tuple(ints(channels, "channels")), sides=tuple(ints(sides, "sides")))
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


@app.command("network")
def bench_network(
    model: str = typer.Option("gmr_resnet18", help="Registered model name."),
    shape: str = typer.Option("16,3,224,224", help="Input shape N,C,H,W (or N,C,D,H,W)."),
    base_channels: int = typer.Option(32, help="base_channels of the model."),
    model_kwargs: str = typer.Option("{}", help="More model arguments as a YAML/JSON mapping, e.g. "
                                     "'{kernel_sizes: [5, 5, 3, 3], num_rings: [5, 5, 3, 3]}'."),
    device: str = DeviceOpt,
    repeats: int = _repeats(3, "Timed rounds; the best is reported."),
    out: Path = _json_out("benchmark_network"),
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
            result = run_network_benchmark(model, ints(shape, "shape"), resolve_device(device), repeats, base_channels=base_channels, **extra)
        except (TypeError, ValueError) as err:
            fail(ValueError(f"{model} with {extra}: {err}"))
    table = Table(title=f"{model} (base {base_channels}) on {result['shape']}, {result['device']}")
    for col in ("impl", "ms per batch", "vs auto"):
        table.add_column(col, justify="right")
    for impl, ms in result["ms"].items():
        table.add_row(impl, f"{ms:.1f}", f"{ms / result['ms']['auto']:.2f}")
    Console(width=160).print(table)
    console.print("auto's choices: " + ", ".join(f"{k}: {v}" for k, v in result["auto_choices"].items()))
    console.print(f"wrote {write_json(out, result)}")


@app.command("equivariance")
def bench_equivariance(
    kernel_sizes: str = typer.Option("3,5,7,9,11", help="Comma-separated odd kernel sizes."),
    step: int = typer.Option(5, min=1, max=90, help="Angle step in degrees (0..90)."),
    seeds: int = typer.Option(3, min=1, help="Random weight draws averaged per point."),
    variants: str = typer.Option("", help="Comma-separated variants (gmr_radius, gmr_area, gmr_index, hard_rings, "
                                 "gmr_oriented, dense, gmr_conv_pkg); default all."),
    out_dir: Path = typer.Option(Path("results"), help="Folder for benchmark_equivariance.json and .png."),
) -> None:
    """Rotation equivariance error (central disc) for angles 0..90 of GMR, hard-ring and dense kernels."""
    from benchmarks.common import write_json
    from benchmarks.equivariance import plot_equivariance, run_equivariance_benchmark

    ks = ints(kernel_sizes, "kernel-sizes")
    start = time.perf_counter()
    with console.status("rotating") as status:
        result = run_equivariance_benchmark(
            ks, tuple(range(0, 91, step)), seeds=seeds, progress=lambda k: status.update(f"rotating: k={k} done"),
            variants=[v.strip() for v in variants.split(",") if v.strip()],
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


@app.command("pipeline")
def bench_pipeline(
    slide: Path = typer.Argument(Path("data/demo/CMU-1-Small-Region.svs"), help="The slide to measure on."),
    config: Optional[Path] = ConfigOpt,
    device: str = DeviceOpt,
    repeats: int = _repeats(2, "Runs per rate; the best is reported."),
    tiatoolbox: bool = typer.Option(True, help="Also run TIAToolbox's PatchPredictor with the same model."),
    memory: bool = typer.Option(True, help="Peak memory on generated 1x, 4x, 16x mosaics of the slide's tissue."),
    out: Path = _json_out("benchmark_pipeline"),
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


@app.command("segment")
def bench_segment(
    slide: Path = typer.Argument(Path("data/demo/CMU-1-Small-Region.svs"), help="The slide to measure on."),
    model: list[str] = typer.Option([], "--model", "-m", help="Candidates (checkpoints or names); default: the nuclei preset's."),
    device: str = DeviceOpt,
    repeats: int = _repeats(2, "Forward passes per candidate; the best is reported."),
    block_px: int = typer.Option(1024, min=64, help="Block side at the model's mpp."),
    end_to_end: bool = typer.Option(True, help="Also time segment_slide on the whole slide."),
    postprocess_blocks: int = typer.Option(4, min=0, help="Time post-processing (maps -> instances) under the first "
                                           "candidate's rule and under one marker height on this many of the slide's "
                                           "most tissue-filled blocks; 0: not timed."),
    mpp: Optional[float] = typer.Option(None, help="The slide's microns per pixel, where the file has none (a PNG crop)."),
    out: Path = _json_out("benchmark_segment"),
) -> None:
    """Nuclei segmentation: Mpx/s of the model alone per candidate, its post-processing under its own rule and
    under one marker height, and the whole slide end to end."""
    from benchmarks.common import write_json
    from benchmarks.segment import run_segment_benchmark

    try:
        with console.status("benchmarking segmentation") as status:
            result = run_segment_benchmark(slide, model or None, device, repeats, block_px, end_to_end, progress=status.update,
                                           postprocess_blocks=postprocess_blocks, mpp=mpp)
    except ValueError as err:
        fail(err)
    table = Table(title=f"nuclei segmentation, {result['device']}, blocks of {block_px} px")
    for col in ("model", "margin px", "ms per block", "Mpx/s"):
        table.add_column(col)
    for name, r in result["model_alone"].items():
        table.add_row(name, str(r["margin_px"]), f"{r['block_ms']:.0f}", f"{r['megapixels_per_s']:.3f}")
    Console(width=160).print(table)
    if "postprocess" in result:
        p = result["postprocess"]
        table = Table(title=f"post-processing (maps -> instances, CPU) of {p['model']}'s maps, {p['blocks']} blocks")
        for col in ("rule", "ms per block", "nuclei"):
            table.add_column(col)
        for name, r in p["rules"].items():
            table.add_row(name, f"{r['ms_per_block']:.0f}", str(r["nuclei"]))
        Console(width=160).print(table)
        if "ratio" in p:
            console.print(f"checkpoint's rule / one height: {p['ratio']:.2f}x")
    if "end_to_end" in result:
        e = result["end_to_end"]
        console.print(f"segment_slide {slide.name} with {e['model']}: {e['wall_s']:.1f} s, {e['blocks']} blocks, "
                      f"{e['megapixels_per_s']:.3f} Mpx/s, {e['nuclei']} nuclei")
    console.print(f"wrote {write_json(out, result)}")


@app.command("train")
def bench_train(
    device: str = DeviceOpt,
    repeats: int = _repeats(3, "Interleaved rounds; the best is reported."),
    workers: int = typer.Option(1, min=0, help="DataLoader workers for the loader-alone rate."),
    memory: bool = typer.Option(True, help="Also measure peak memory of a step."),
    options: str = typer.Option("default,contiguous,cpu_bf16", help="Training options timed against each other on "
                                "gmr_resnet18 (benchmarks.training.OPTIONS: default, contiguous, cpu_bf16, compile, dense_path, "
                                "ring_path); '' for none."),
    options_size: str = typer.Option("", help="base_channels,tile_px,batch of that gmr_resnet18 (e.g. 64,224,24: the paper's "
                                     "NCT-CRC network); default the classifier pair's."),
    out: Path = _json_out("benchmark_train"),
) -> None:
    """Training step images/s and peak memory, GMR vs ordinary convolutions, the data loader alone, and the
    speed options (channels-last, bf16 on the CPU, torch.compile)."""
    from benchmarks.common import write_json
    from benchmarks.training import run_options_benchmark, run_training_benchmark

    from benchmarks.training import OPTIONS

    chosen = [o.strip() for o in options.split(",") if o.strip()]
    unknown = sorted({part for o in chosen for part in o.split("+")} - set(OPTIONS))
    if unknown:
        raise typer.BadParameter(f"unknown option(s) {unknown}; choose from {sorted(OPTIONS)} (combine with '+')")
    try:
        with console.status("benchmarking training") as status:
            result = run_training_benchmark(device, repeats, workers, memory, progress=status.update)
            if chosen:
                size = tuple(ints(options_size, "options-size")) if options_size.strip() else None
                if size is not None and len(size) != 3:
                    raise typer.BadParameter("--options-size takes base_channels,tile_px,batch")
                result["options"] = run_options_benchmark(device, repeats, chosen, progress=status.update, size=size)
    except ValueError as err:
        fail(err)
    table = Table(title=f"training step, {result['device']}, best of {repeats}")
    for col in ("task", "model", "images/s", "step ms", "peak MiB", "loader alone images/s"):
        table.add_column(col)
    for task, pair in result["pairs"].items():
        for name, r in pair["models"].items():
            if isinstance(r, dict):
                table.add_row(task, name, f"{r['images_per_s']:.2f}", f"{r['step_ms']:.0f}", str(r.get("peak_memory_mib", "")),
                              str(result["loader_images_per_s"][task]))
    Console(width=160).print(table)
    if chosen:
        opt = result["options"]
        table = Table(title=f"training options, {opt['model']} base {opt['base_channels']}, {opt['batch']} x {opt['tile_px']} px, "
                            f"{result['device']}")
        for col in ("option", "step ms", "speed vs default"):
            table.add_column(col)
        for name, r in opt["options"].items():
            table.add_row(name, f"{r['step_ms']:.0f}", f"{r['speed_vs_default']:.2f}x")
        Console(width=160).print(table)
    console.print(f"wrote {write_json(out, result)}")


@app.command("data")
def bench_data(
    root: Path = typer.Option(Path("results/benchmarks/data_sets"), help="Where the synthetic sets are written once and reused."),
    nct_sizes: str = typer.Option("1000,10000,50000", help="NCT-CRC-shaped set sizes (224 px TIFF files); '' to skip."),
    pcam_sizes: str = typer.Option("4096,32768,262144", help="PCam-shaped HDF5 sizes (96 px rows); '' to skip."),
    workers: int = typer.Option(2, min=0, help="DataLoader workers (as a training config's num_workers)."),
    batches: int = typer.Option(20, min=1, help="Batches timed per set after the first."),
    step: bool = typer.Option(True, help="Also time one training step of the paper's gmr_resnet18 at the paper's batch."),
    base_channels: int = typer.Option(64, min=1, help="Width of that gmr_resnet18 (64: the paper's)."),
    device: str = DeviceOpt,
    out: Path = _json_out("benchmark_data"),
) -> None:
    """The tile loaders alone on sets of the real sizes: start-up s, peak memory, items/s, against a training step."""
    from benchmarks.common import write_json
    from benchmarks.data import run_data_benchmark

    sizes = {k: ints(v, f"{k}-sizes") for k, v in (("nct_crc", nct_sizes), ("pcam", pcam_sizes)) if v.strip()}
    if not sizes:
        raise typer.BadParameter("give at least one of --nct-sizes / --pcam-sizes")
    try:
        with console.status("benchmarking the tile loaders") as status:
            result = run_data_benchmark(root, sizes, workers, batches, step, device, base_channels=base_channels,
                                        progress=lambda s: (console.print(s), status.update(s)))
    except (ValueError, RuntimeError) as err:
        fail(err)
    table = Table(title=f"tile loaders alone, {workers} workers, {result['device']}")
    for col in ("layout", "tiles", "index s", "start-up s", "peak RSS MiB", "items/s", "train step images/s"):
        table.add_column(col, justify="right")
    for layout, entry in result["layouts"].items():
        for n, r in entry["sizes"].items():
            table.add_row(layout, n, f"{r['index_s']:.2f}", f"{r['startup_s']:.2f}", f"{r['peak_rss_mib']:.0f}", f"{r['items_per_s']:.0f}",
                          f"{entry['train_step']['images_per_s']:.1f}" if "train_step" in entry else "-")
    Console(width=160).print(table)
    for layout, entry in result["layouts"].items():
        console.print(f"{layout}: start-up at most {entry['startup_s_max']:.2f} s; memory {entry['memory_growth']:+.1%} from the "
                      f"smallest to the largest" + (f"; slowest loader / training step = {entry['loader_vs_step']:.2f}x"
                                                     if "loader_vs_step" in entry else ""))
    console.print(f"wrote {write_json(out, result)}")


@app.command("viewer")
def bench_viewer(
    slide: Path = typer.Argument(Path("data/demo/CMU-1-Small-Region.svs"), help="The slide (its tissue also makes the mosaics)."),
    config: Optional[Path] = ConfigOpt,
    sizes: str = typer.Option("1,2", help="Mosaic sides: 1 = the slide, 2 = 2x2 copies of its tissue (4x the area), ..."),
    root: Path = typer.Option(Path("results/benchmarks/viewer"), help="Scratch folder (emptied first)."),
    out: Path = _json_out("benchmark_viewer"),
) -> None:
    """Viewer tiles: seconds and disk per megapixel, against classifying the same slide (one run)."""
    from benchmarks.common import write_json
    from benchmarks.viewer import run_viewer_benchmark

    try:
        with console.status("benchmarking the viewer") as status:
            result = run_viewer_benchmark(slide, root, tuple(ints(sizes, "sizes")), str(config) if config else None,
                                          progress=status.update)
    except ValueError as err:
        fail(err)
    table = Table(title=f"viewer tiles vs classification ({result['model']})")
    for col in ("slide", "Mpx", "viewer s", "s/Mpx", "MiB/Mpx", "again s", "classify s", "viewer / classify"):
        table.add_column(col, justify="right")
    for r in result["rows"]:
        table.add_row(r["slide"], f"{r['megapixels']:.1f}", f"{r['viewer_s']:.2f}", f"{r['viewer_s_per_mpx']:.3f}",
                      f"{r['disk_mib_per_mpx']:.2f}", f"{r['viewer_again_s']:.3f}", f"{r['classify_s']:.1f}",
                      f"{r['viewer_vs_classify']:.3f}")
    Console(width=160).print(table)
    console.print(f"wrote {write_json(out, result)}")


@app.command("fit")
def bench_fit(
    data: Optional[Path] = typer.Option(None, help="Dataset: nuclei images/ + labels/ at 0.25 mpp (default "
                                        "../shared/data/nuclei/monuseg2018), or class folders at 0.33 mpp for --task tiles "
                                        "(default the Kather 2016 samples)."),
    task: str = typer.Option("nuclei", help="nuclei (U-Nets) or tiles (ResNet-18s)."),
    steps: int = typer.Option(100, min=10, help="Optimiser steps per variant."),
    variants: str = typer.Option("", help="Comma-separated variants (benchmarks.fit.VARIANTS / TILE_VARIANTS); default all."),
    seeds: str = typer.Option("0", help="Comma-separated seeds (batch and initialisation); several give the mean and range."),
    device: str = DeviceOpt,
    out: Path = _json_out("benchmark_fit"),
) -> None:
    """Fit GMR and dense twins on the same fixed batch (nuclei crops or tissue tiles): final loss and ratio GMR / dense."""
    from benchmarks.common import write_json
    from benchmarks.fit import run_fit_benchmark, summarise_seeds

    if data is None:
        data = Path("../shared/data/nuclei/monuseg2018" if task == "nuclei" else
                    "../shared/data/tiles/kather2016-224px-samples/samples")
    if not data.is_dir():
        fail(ValueError(f"{data}: dataset folder not found (give --data)"))
    seed_list = ints(seeds, "seeds")
    runs = []
    try:
        with console.status("fitting") as status:
            for seed in seed_list:
                runs.append(run_fit_benchmark(data, steps, [v.strip() for v in variants.split(",") if v.strip()] or None,
                                              device=device, progress=status.update, task=task, seed=seed,
                                              base_channels=16 if task == "nuclei" else 8,
                                              kernel_sizes=(5, 5, 3, 3) if task == "nuclei" else (9, 9, 5, 5)))
    except (ValueError, TypeError) as err:
        fail(err)
    result = summarise_seeds(runs, seed_list)
    table = Table(title=f"fit of one fixed batch {result['batch']}, {steps} AdamW steps, seeds {seeds}, {result['device']}")
    for col in ("variant", "parameters", "loss at 10%", "final loss", "/ dense (min-max over seeds)", "s"):
        table.add_column(col, justify="right")
    for name, loss in result["final_loss"].items():
        ratio = result.get("ratio_to_dense", {}).get(name, float("nan"))
        spread = result.get("ratio_range", {}).get(name)
        table.add_row(name, str(result["params"][name]), f"{result['curves'][name][steps // 10]:.4f}", f"{loss:.4f}",
                      f"{ratio:.2f}" + (f" ({spread[0]:.2f}-{spread[1]:.2f})" if spread and len(seed_list) > 1 else ""),
                      f"{result['seconds'][name]:.0f}")
    Console(width=160).print(table)
    console.print(f"wrote {write_json(out, result)}")
