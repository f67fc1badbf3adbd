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

os.environ.setdefault("KINETO_LOG_LEVEL", "5")  # the profiler's own chatter on stderr

app = typer.Typer(
    help="GMR-Path: rotation-robust whole-slide histopathology with GMR convolutions.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
bench_app = typer.Typer(help="Speed, memory and equivariance benchmarks (reports, not tests).", no_args_is_help=True)
app.add_typer(bench_app, name="benchmark")
console = Console(stderr=True)


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


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
