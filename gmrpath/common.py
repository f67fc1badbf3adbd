"""What every ``gmrpath`` command shares: the stderr console, one-line errors, progress bars.

Example::

    from gmrpath.common import fail
    fail(ValueError("slide.svs: records no resolution"))   # prints "error: ..." and exits 1
"""

from __future__ import annotations

import time
from typing import Optional

import typer
from rich.console import Console

__all__ = ["console", "fail", "progress_bar", "ints", "stain_option"]

console = Console(stderr=True, soft_wrap=True)  # a message is one line, in a terminal or a log


ThreadsOpt = typer.Option(None, "--threads", min=1, help="CPU threads for torch (default: all cores). Give each of several "
                          "runs sharing a machine its share: oversubscribed cores slow every run severalfold.")


def use_threads(threads: Optional[int]) -> None:
    """Set torch's CPU thread count for this command (``None``: leave torch's default)."""
    if threads is not None:
        import torch

        torch.set_num_threads(threads)


def ints(text: str, name: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise typer.BadParameter(f"{name} must be comma-separated integers, got {text!r}") from None



def fail(err: Exception) -> None:
    """Print ``error: <message>`` as exactly one line (never wrapped, in a terminal or a log) and exit 1."""
    from rich.text import Text

    message = " ".join(str(err).split())
    console.print(Text.assemble(("error: ", "bold red"), message), soft_wrap=True, highlight=False)
    raise typer.Exit(1)


class LazyBar:
    """A rich progress bar that appears at the first update, so a run that fails before doing
    any work prints its error alone (no empty "0/? tiles" bar)."""

    def __init__(self, label: str, unit: str):
        self.label, self.unit, self.bar, self.task, self.start = label, unit, None, None, None

    def __enter__(self) -> "LazyBar":
        self.start = time.perf_counter()  # rates count from the start of the work, not from the first unit done
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
            self.start = self.start or time.perf_counter()
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        self.bar.update(self.task, completed=done, total=total, rate=f"{done / elapsed:6.1f} {self.unit}/s")


def progress_bar(label: str, unit: str = "tiles"):
    """A progress bar reporting units done / total and units/s; returns (context, callback)."""
    bar = LazyBar(label, unit)
    return bar, bar


def pipeline_config(config, overrides: dict, override_source: str = "command line", need_slides: bool = True):
    """The pipeline config from ``config`` (a path; default ``configs/default.yaml``) with ``overrides``."""
    from pathlib import Path

    from pipeline.config import PipelineConfig, load_config

    default = Path(__file__).resolve().parents[1] / "configs" / "default.yaml"
    path = config if config is not None else (default if default.is_file() else None)
    if path is None:
        cfg = PipelineConfig()
        import dataclasses

        return dataclasses.replace(cfg, **overrides)
    return load_config(path, overrides, override_source, need_slides)


def stain_option(text: Optional[str]) -> Optional[dict]:
    """``--stain-norm METHOD:REFERENCE`` as a stain target; ``none`` gives ``{}`` (off), no option None."""
    if text is None:
        return None
    from pipeline.stain import split_stain_option, stain_option_target

    if text.strip().lower() != "none":
        try:
            split_stain_option(text)
        except ValueError as err:  # the option's form: a usage error
            raise typer.BadParameter(str(err)) from None
    try:
        return stain_option_target(text) or {}  # the reference itself: a file error, one line
    except ValueError as err:
        fail(err)


def postprocess_options(fg_threshold: Optional[float], marker_h: Optional[float], marker_h_dense: Optional[float] = None) -> dict:
    """The post-processing fields a command's ``--fg-threshold`` / ``--marker-h`` / ``--marker-h-dense``
    set (those given; ``--marker-h-dense 0`` turns the density rule off: one height everywhere)."""
    rule = {k: v for k, v in dict(fg_threshold=fg_threshold, marker_h=marker_h).items() if v is not None}
    if marker_h_dense is not None:
        rule["marker_h_dense"] = None if marker_h_dense == 0 else marker_h_dense
    return rule


MARKER_H_DENSE_HELP = ("Marker height where nuclei crowd (the height then follows the local nuclear density, "
                       "see pipeline/instances.py); 0: one height everywhere.")
