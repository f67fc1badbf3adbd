"""The training commands: ``gmrpath train`` and ``gmrpath evaluate``, over :mod:`training`.

Heavy imports happen inside the commands, so ``gmrpath --help`` stays quick. Under
``torchrun`` launch the module: ``torchrun ... -m gmrpath train CONFIG``.

Example:
    $ gmrpath train configs/train_nuclei_gmr.yaml --resume
    $ torchrun --nproc-per-node 2 -m gmrpath train configs/train_nuclei_gmr.yaml
    $ gmrpath evaluate models/nuclei_gmr_unet.pt classical --data ../shared/data/nuclei/cpm15 \\
          --mpp-csv ../shared/data/nuclei/cpm15/images.csv --out results/eval/cpm15
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

import typer

from .common import MARKER_H_DENSE_HELP, ThreadsOpt, console, fail, postprocess_options, stain_option, use_threads

__all__ = ["app", "parse_sets"]

app = typer.Typer()


def parse_sets(items: list[str]) -> dict:
    """``["epochs=3", "data.root=/x"]`` -> ``{"epochs": 3, "data": {"root": "/x"}}`` (values parsed as YAML)."""
    import yaml

    out: dict = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise typer.BadParameter(f"--set takes key=value (dotted keys for sections), got {item!r}")
        node = out
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = yaml.safe_load(value)
    return out


MAX_ANGLES = 720


def _angles(text: Optional[str]) -> Optional[list[float]]:
    """``start:stop:step`` or ``a,b,c`` degrees -> a non-empty list of at most :data:`MAX_ANGLES` finite angles."""
    import math

    if text is None:
        return None
    bad = typer.BadParameter(f"--angles takes start:stop:step or a comma list of finite degrees, got {text!r}")
    try:
        if ":" in text:
            start, stop, step = (float(v) for v in text.split(":"))
            if not all(math.isfinite(v) for v in (start, stop, step)) or step <= 0:
                raise bad
            count = math.ceil((stop - start) / step)
            if count > MAX_ANGLES:
                raise typer.BadParameter(f"--angles {text!r} gives {count} angles; at most {MAX_ANGLES}")
            angles = [start + i * step for i in range(max(count, 0))]
        else:
            angles = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise bad from None
    if not angles or not all(math.isfinite(a) for a in angles) or len(angles) > MAX_ANGLES:
        raise typer.BadParameter(f"--angles {text!r} gives no angle, a non-finite one, or more than {MAX_ANGLES}")
    return angles


@app.command("train")
def train_cmd(
    config: Path = typer.Argument(..., help="Training YAML (see configs/train_*.yaml)."),
    resume: bool = typer.Option(False, "--resume", help="Continue from OUT/last.pt (same config)."),
    set_: list[str] = typer.Option([], "--set", help="Override a key, e.g. --set epochs=5 --set data.root=/data (repeatable)."),
    device: Optional[str] = typer.Option(None, "--device", help="auto, cpu, cuda or cuda:N. Default: the config's."),
    skip_bad: bool = typer.Option(False, "--skip-bad", help="Skip unreadable or inconsistent files (listed) instead of stopping."),
    cv: int = typer.Option(0, "--cv", min=0, help="k-fold cross-validation by whole image: train k models, report mean and sd."),
    folds: Optional[str] = typer.Option(None, "--folds", help="With --cv K: run only these folds, e.g. 0,1,2 (0-based)."),
    threads: Optional[int] = ThreadsOpt,
) -> None:
    """Train a network from a YAML config: metrics per epoch, best.pt (for predict/segment) and last.pt (for --resume)."""
    from training.config import load_train_config

    use_threads(threads)
    overrides = parse_sets(set_)
    if device is not None:
        overrides["device"] = device
    try:
        cfg = load_train_config(config, overrides)
        if folds is not None and not cv:
            raise ValueError("--folds picks folds of a cross-validation: give --cv K too")
        if cv:
            from training.crossval import cross_validate

            only = _fold_list(folds) if folds is not None else None
            result = cross_validate(cfg, cv, resume=resume, skip_bad=skip_bad, log=console.print, only=only)
            console.print(_cv_table(result, cfg.out))
        else:
            result = _train_with_progress(cfg, resume, skip_bad, console)
    except ValueError as err:
        fail(err)
    if int(os.environ.get("RANK", "0")) == 0:  # under torchrun, one summary (rank 0's), not one per process
        typer.echo(json.dumps(result, indent=1))


def _fold_list(text: str) -> list[int]:
    """``"0,1,2"`` -> ``[0, 1, 2]``; anything else is a ValueError naming the option."""
    try:
        return [int(part) for part in text.split(",")]
    except ValueError:
        raise ValueError(f"--folds {text!r}: give fold numbers separated by commas, e.g. 0,1,2") from None


def _cv_table(result: dict, out: str):
    """The folds of a cross-validation as a table (nuclei: next to the classical baseline)."""
    from rich.table import Table

    folds = result["per_fold"]
    metrics = [m for m in ("dice", "aji", "pq", "accuracy", "balanced_accuracy") if f"{m}_upright" in folds[0]]
    columns = [(m, f"{m}_upright") for m in metrics] + [(f"{m} rotated min", f"{m}_rotated_min") for m in metrics[:1]]
    columns += [(f"classical {m}", f"classical_{m}_upright") for m in metrics if f"classical_{m}_upright" in folds[0]]
    run = result.get("folds_run", list(range(result["folds"])))
    some = "" if len(run) == result["folds"] else f", folds {', '.join(map(str, run))} only"
    table = Table(title=f"{result['model']}, {result['folds']}-fold cross-validation{some} ({out}/cv.json)")
    for name in ["fold", "held out", "n"] + [c for c, _ in columns]:
        table.add_column(name, justify="left" if name == "held out" else "right")
    for f in folds:
        table.add_row(str(f["fold"]), ", ".join(f.get("groups", [])), str(f["n_val"]), *(f"{f[k]:.3f}" for _, k in columns))
    pooled = result["pooled"]
    table.add_row("mean", "", "", *(f"{pooled[k]['mean']:.3f}" + (f" ± {pooled[k]['sd']:.3f}" if pooled[k]["sd"] is not None else "")
                                   for _, k in columns))
    if result.get("pooled_postprocess"):
        best = result["pooled_postprocess"][0]
        table.caption = (f"best post-processing out of fold: fg_threshold {best['fg_threshold']}, marker_h {best['marker_h']} "
                         f"(mean AJI {best['aji']:.3f}, Dice {best['dice']:.3f})")
    return table


@app.command("set-postprocess")
def set_postprocess_cmd(
    checkpoint: Path = typer.Argument(..., help="A nuclei checkpoint (.pt)."),
    fg_threshold: Optional[float] = typer.Option(None, "--fg-threshold", help="Foreground probability threshold."),
    marker_h: Optional[float] = typer.Option(None, "--marker-h", help="Marker height of the distance map."),
    marker_h_dense: Optional[float] = typer.Option(None, "--marker-h-dense", help=MARKER_H_DENSE_HELP),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Write here instead of in place."),
    note: str = typer.Option("", "--note", help="Why (recorded in the checkpoint's postprocess_history)."),
) -> None:
    """Store a nuclei checkpoint's post-processing rule (what segment and evaluate use); weights unchanged."""
    from pipeline.models import set_postprocess

    rule = postprocess_options(fg_threshold, marker_h, marker_h_dense)
    if not rule:
        raise typer.BadParameter("give --fg-threshold, --marker-h and/or --marker-h-dense")
    try:
        new = set_postprocess(checkpoint, rule, out, note)
    except ValueError as err:
        fail(err)
    typer.echo(json.dumps({"checkpoint": str(out or checkpoint), "postprocess": new}))


@app.command("evaluate")
def evaluate_cmd(
    models: list[str] = typer.Argument(..., help="Checkpoints (.pt) to compare; 'classical' = colour-deconvolution nuclei baseline."),
    data: Path = typer.Option(..., "--data", help="Dataset: a nuclei folder (images/ + labels/), class folders, a CSV or an H5 folder."),
    kind: Optional[str] = typer.Option(None, "--kind", help="nuclei, folder, csv or h5 (default: guessed from --data)."),
    mpp: Optional[float] = typer.Option(None, "--mpp", help="The data's microns per pixel."),
    mpp_csv: Optional[Path] = typer.Option(None, "--mpp-csv", help="Per-image mpp: CSV with image and mpp (or mpp_nominal) columns."),
    split_csv: Optional[Path] = typer.Option(None, "--split-csv", help="CSV image,split: with --split, score one side only."),
    split: str = typer.Option("all", "--split", help="all, train, val, or test (PCam's *_test_x.h5)."),
    images: list[str] = typer.Option([], "--images", help="Score only images whose names match (shell pattern, e.g. '*_03'; repeatable)."),
    group: list[str] = typer.Option([], "--group", help="Nuclei: score only one group's images, COLUMN=VALUE of --groups-csv "
                                    "(e.g. organ=prostate; repeat for several values of one column)."),
    groups_csv: Optional[Path] = typer.Option(None, "--groups-csv", help="CSV image,COLUMN... naming each image's group "
                                              "(default: --split-csv)."),
    limit: Optional[int] = typer.Option(None, "--limit", min=1, help="Score at most this many images (the first by name)."),
    labels_dir: str = typer.Option("labels", "--labels-dir", help="Nuclei: the masks' folder under --data (e.g. masks_annotator1)."),
    semantic: bool = typer.Option(False, "--semantic", help="Nuclei: score the foreground map (pixel AUC, IoU, Dice; binary masks) "
                                  "instead of instances."),
    angles: Optional[str] = typer.Option(None, "--angles", help="Degrees: start:stop:step or a list (default 0:360:10 tiles, 0:360:30 nuclei)."),
    out: Path = typer.Option(Path("results/eval"), "--out", "-o", help="Folder for evaluation.json, .csv and polar.png."),
    device: str = typer.Option("auto", "--device"),
    workers: int = typer.Option(min(4, os.cpu_count() or 1), "--workers", min=0, help="Tiles: DataLoader workers decoding them."),
    stain_norm: Optional[str] = typer.Option(None, "--stain-norm", help="Nuclei: map every image's stains onto a reference "
                                             "first, METHOD:REFERENCE_IMAGE (macenko, vahadane, reinhard), overriding the "
                                             "checkpoints'; 'none' turns theirs off."),
    sensitivity: bool = typer.Option(False, "--sensitivity", help="Nuclei: also score each checkpoint under every "
                                     "foreground threshold x marker height (a sensitivity table, upright)."),
    fg_threshold: Optional[float] = typer.Option(None, "--fg-threshold", help="Nuclei: score every checkpoint with this "
                                                 "foreground threshold (default: each checkpoint's own)."),
    marker_h: Optional[float] = typer.Option(None, "--marker-h", help="Nuclei: score every checkpoint with this marker "
                                             "height (default: each checkpoint's own)."),
    marker_h_dense: Optional[float] = typer.Option(None, "--marker-h-dense", help="Nuclei: score every checkpoint with "
                                                   "this dense-tissue marker height. " + MARKER_H_DENSE_HELP),
    threads: Optional[int] = ThreadsOpt,
) -> None:
    """Score models upright, rotated and flipped (the paper's protocol), side by side; tile sets stream."""
    from training.config import DataConfig
    from training.evaluate import evaluate

    use_threads(threads)
    if split not in ("all", "train", "val", "test"):
        raise typer.BadParameter(f"--split must be all, train, val or test, got {split!r}")
    if kind is None:
        kind = "csv" if data.suffix.lower() == ".csv" else "nuclei" if (data / labels_dir).is_dir() else \
            "h5" if any(data.glob("*_x.h5*")) else "folder"
    group_filter = _group_filter(group, groups_csv or split_csv)
    if mpp is None and mpp_csv is None:
        raise typer.BadParameter("give the data's resolution: --mpp (e.g. 0.25 for 40x) or --mpp-csv")
    if not data.exists():
        fail(ValueError(f"{data}: dataset not found"))
    try:
        cfg = DataConfig(kind=kind, root=str(data), mpp=mpp, mpp_csv=str(mpp_csv) if mpp_csv else None, labels=labels_dir,
                         split_csv=str(split_csv) if split_csv else None, val_fraction=0.0)
        report = evaluate(models, cfg, out, task="semantic" if semantic else None, angles=_angles(angles), split=split,
                          device=device, log=console.print, images=images or None, limit=limit, workers=workers,
                          stain_norm=stain_option(stain_norm), sensitivity=sensitivity,
                          postprocess=postprocess_options(fg_threshold, marker_h, marker_h_dense), group=group_filter)
    except ValueError as err:
        fail(err)
    _print_report(report, console)
    console.print(f"wrote {out / 'evaluation.json'}, {out / 'evaluation.csv'} and {out / 'polar.png'}")


def _group_filter(group: list[str], csv_path: Optional[Path]) -> Optional[tuple[str, str, list[str]]]:
    """``--group organ=prostate [--group organ=liver]`` as ``(csv, column, values)`` for :func:`training.evaluate.evaluate`."""
    if not group:
        return None
    if csv_path is None:
        raise typer.BadParameter("--group needs a CSV naming each image's group: --groups-csv (or --split-csv)")
    pairs = [g.partition("=") for g in group]
    if any(not col or not sep or not val for col, sep, val in pairs) or len({col for col, _, _ in pairs}) != 1:
        raise typer.BadParameter(f"--group takes COLUMN=VALUE, one column for all (e.g. organ=prostate), got {group!r}")
    return str(csv_path), pairs[0][0], [val for _, _, val in pairs]


def _train_with_progress(cfg, resume: bool, skip_bad: bool, console) -> dict:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    from training.loop import train
    from training.records import tee_log

    bar = Progress(TextColumn("[bold]epoch {task.fields[epoch]}/" + str(cfg.epochs)), BarColumn(), MofNCompleteColumn(),
                   TextColumn("steps  loss {task.fields[loss]}"), TimeElapsedColumn(), TimeRemainingColumn(), console=console)
    task = bar.add_task("train", total=None, epoch=0, loss="")

    def progress(step: int, total: int, info: dict) -> None:
        bar.update(task, completed=step, total=total, epoch=info["epoch"], loss=f"{info['loss']:.4f}")

    out = Path(cfg.out)
    fresh = not out.exists()
    log = tee_log(lambda line: bar.console.print(line, soft_wrap=True), out / "train.log")

    try:
        with bar:
            return train(cfg, resume=resume, skip_bad=skip_bad, log=log, progress=progress)
    except ValueError:
        # a run that failed before its first checkpoint leaves no folder behind (only its log was in it)
        if fresh and out.is_dir() and not any(p.suffix == ".pt" for p in out.iterdir()):
            import shutil

            shutil.rmtree(out, ignore_errors=True)
        raise


def _short_labels(names: list[str]) -> dict[str, str]:
    """Each checkpoint's shortest trailing path (at least folder/file) that no other one shares."""
    labels = {}
    for name in names:
        parts = Path(name).parts
        depth = min(2, len(parts))
        while depth < len(parts) and any(o != name and Path(o).parts[-depth:] == parts[-depth:] for o in names):
            depth += 1
        labels[name] = "/".join(parts[-depth:]) if name.endswith(".pt") else name
    return labels


def _print_report(report: dict, console) -> None:
    from rich.console import Console
    from rich.table import Table

    metrics = {"segment": ["dice", "aji", "pq"], "semantic": ["auc", "iou", "dice"]}.get(report["task"]) or \
        ["accuracy", "balanced_accuracy"] + (["auc"] if any("auc_upright" in r for r in report["models"].values()) else [])
    labels = _short_labels(list(report["models"]))
    table = Table(title=f"{report['task']}: {report['data']} ({report['split']}, n={report['n']})")
    table.add_column("model")
    for m in metrics:
        table.add_column(f"{m} upright")
        table.add_column(f"{m} rotated mean ± sd (min)")
    for name, r in report["models"].items():
        cells = []
        for m in metrics:
            cells += [f"{r[f'{m}_upright']:.4f}",
                      f"{r[f'{m}_rotated_mean']:.4f} ± {r[f'{m}_rotated_std']:.4f} ({r[f'{m}_rotated_min']:.4f})"]
        table.add_row(labels[name], *cells)
    Console(width=200, stderr=True).print(table)
    found = {name: r for name, r in report["models"].items() if "recall_upright" in r}
    if found:
        from training.metrics import RECALL_KEYS
        recall = Table(title="true nuclei found (>= half their pixels predicted), upright: all, and by the image's "
                             "median haematoxylin density and median area")
        for col in ["model", "all", "pale", "dark", "small", "large"]:
            recall.add_column(col)
        for name, r in found.items():
            recall.add_row(labels[name],
                           *[f"{r[f'{k}_upright']:.3f}" for k in RECALL_KEYS])
        Console(width=200, stderr=True).print(recall)
    for name, r in report["models"].items():
        grid = r.get("postprocess_sensitivity")
        if not grid:
            continue
        hs = sorted({g["marker_h"] for g in grid})
        sens = Table(title=f"{Path(name).name}: upright AJI / PQ / Dice by foreground threshold (rows) and marker height (columns); "
                           "the fixed rule is 0.5 / 0.1")
        sens.add_column("fg")
        for h in hs:
            sens.add_column(f"h {h:g}")
        for fg in sorted({g["fg_threshold"] for g in grid}):
            by_h = {g["marker_h"]: g for g in grid if g["fg_threshold"] == fg}
            sens.add_row(f"{fg:g}", *[f"{by_h[h]['aji']:.3f} / {by_h[h]['pq']:.3f} / {by_h[h]['dice']:.3f}" for h in hs])
        Console(width=200, stderr=True).print(sens)
