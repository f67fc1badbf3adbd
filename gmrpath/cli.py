"""The ``gmrpath`` command line: the slide, training and benchmark commands on one app.

Example:
    $ gmrpath --help
    $ gmrpath models
    $ gmrpath benchmark conv --kernel-sizes 9 --repeats 5
"""

from __future__ import annotations

import os

import typer

os.environ.setdefault("KINETO_LOG_LEVEL", "99")  # silence the profiler's USDT chatter on stderr

from . import bench, slides, train, viewer  # noqa: E402  (after the environment is set)

__all__ = ["app", "main"]

app = typer.Typer(
    help="GMR-Path: rotation-robust whole-slide histopathology with GMR convolutions.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.add_typer(slides.app)  # tissue, predict, segment, cohort, config, models
app.add_typer(train.app)  # train, evaluate
app.add_typer(viewer.app)  # viewer, view
app.add_typer(bench.app, name="benchmark")


def main() -> None:  # pragma: no cover
    app(prog_name="gmrpath")
