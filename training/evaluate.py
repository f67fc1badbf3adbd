"""Evaluation by the paper's protocol: upright, at many rotations, and under flips.

Classification: accuracy, balanced accuracy (and AUC for two classes) on upright tiles, at
every angle of ``angles`` (default 36 rotations in 10-degree steps: per angle, mean and
standard deviation) and under horizontal and vertical flips. Segmentation: Dice, AJI and PQ
on the whole upright image, and at every angle inside the central disc (the image is
rotated, segmented, the maps rotated back; the disc is inside the image at every angle, so
the angles are compared on the same tissue); upright, also the fraction of true nuclei found,
overall and in the pale / dark and small / large halves (:func:`training.metrics.nucleus_recall`:
``recall*_upright``). Any number of checkpoints side by side; the
name ``classical`` stands for the colour-deconvolution baseline. Writes ``evaluation.json``,
``evaluation.csv`` (one row per model, image or set, and angle) and ``polar.png``.

Example::

    from training.evaluate import evaluate
    evaluate(["models/nuclei_gmr_unet.pt", "classical"], data_cfg, "results/eval/monuseg_val")
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch

from pipeline.instances import PostProcess, postprocess_from
from pipeline.models import ModelError, load_model
from pipeline.config import ModelSpec

from .config import DataConfig
from .datasets import images_in_group, load_dataset
from .metrics import RECALL_KEYS, classification_scores, nucleus_recall, segmentation_scores, semantic_scores
from .protocol import (TUNE_FG, TUNE_H, central_disc, native_labels, nuclei_block_maps, nuclei_probability, postprocess_grid,
                       rotate_image, upright_stain_stats)
from .records import write_rows
from .tilesets import batches, tile_split

__all__ = ["evaluate", "CLASSICAL"]

CLASSICAL = "classical"


def _load(name: str, task: str):
    if name == CLASSICAL:
        if task != "segment":
            raise ModelError("the classical baseline segments nuclei; it cannot classify tiles")
        return None
    loaded = load_model(ModelSpec(task=task, model=name, classes=["x"]), check=False)
    if loaded.meta.get("task", task) != task:
        raise ModelError(f"{name}: a {loaded.meta.get('task')} checkpoint cannot be evaluated on {task} data")
    return loaded


def _classify(loaded, tiles, angles, device, batch_size: int = 64, workers: int = 0,
              log: Callable[[str], None] = print) -> list[dict]:
    """Every view (rotations, then the two flips) of every tile, streamed: each batch is decoded
    once and scored in all views, so a set of any size needs memory for one batch only."""
    from pipeline.infer import predict_batch

    n_classes = len(loaded.spec.classes)
    if int(tiles.labels.max()) >= n_classes:
        raise ModelError(f"{loaded.spec.model}: has {n_classes} classes; the data has label {int(tiles.labels.max())}")
    views = [("angle", float(a), lambda im, a=a: rotate_image(im, a)) for a in angles]
    views += [("flip", "horizontal", lambda im: np.ascontiguousarray(im[:, ::-1])),
              ("flip", "vertical", lambda im: np.ascontiguousarray(im[::-1]))]
    loader = torch.utils.data.DataLoader(tiles.view(raw=True), batch_size=batch_size, num_workers=workers)
    probs: list[list] = [[] for _ in views]
    labels, done, step = [], 0, max(1, len(tiles) // 10)
    for batch, y in batches(loader, []):
        images = batch.numpy()
        for k, (_, _, fn) in enumerate(views):
            tile_batch = torch.from_numpy(np.stack([fn(im) for im in images]))
            probs[k].append(predict_batch(loaded, tile_batch, device, "none", True).numpy())
        labels.append(y.numpy())
        done += len(y)
        if done // step != (done - len(y)) // step or done == len(tiles):
            log(f"  {name_of(loaded)}: {done}/{len(tiles)} tiles x {len(views)} views")
    labels = np.concatenate(labels)
    return [{"view": kind, "value": value, **classification_scores(np.concatenate(p), labels, n_classes)}
            for (kind, value, _), p in zip(views, probs)]


def _nuclei(loaded, samples, angles, device, log: Callable[[str], None] = print, semantic: bool = False,
            upright_maps: Optional[list] = None) -> list[dict]:
    """Instance scores (Dice, AJI, PQ) or, with ``semantic``, foreground-map scores (pixel AUC, IoU, Dice
    against binary masks: CryoNuSeg, the paper's Table 6) of every image, upright and at every angle.
    ``upright_maps``: a list that receives each image's upright block maps (instances of a checkpoint),
    for :func:`training.protocol.postprocess_grid`."""
    from .classical import classical_nuclei

    post = PostProcess(**loaded.meta.get("postprocess", {})) if loaded is not None else None

    def score(truth, pred, mask=None) -> dict:
        return semantic_scores(pred, truth, mask) if semantic else segmentation_scores(truth, pred, mask)

    target = loaded.meta.get("stain_norm") if loaded is not None else None
    rows = []
    for s in samples:
        source = upright_stain_stats(s, target, loaded.spec.mpp) if target else None  # once per image, for every angle
        for angle in [0.0] + [float(a) for a in angles if a % 360]:
            if loaded is None:
                labels = classical_nuclei(rotate_image(s.native_image, angle), s.native_mpp)
                pred = (labels > 0).astype(np.uint8) * 255 if semantic else labels
                pred = rotate_image(pred, -angle, nearest=True, border="constant")
                valid = central_disc(s.native_labels.shape)
            elif semantic:
                pred, valid = nuclei_probability(loaded.module, s, loaded.spec.mpp, device, angle, mean=loaded.mean, std=loaded.std,
                                                 stain_target=target, stain_source=source)
            else:
                blocks = nuclei_block_maps(loaded.module, s, loaded.spec.mpp, device, angle, mean=loaded.mean, std=loaded.std,
                                           stain_target=target, stain_source=source)
                if angle == 0 and upright_maps is not None:
                    upright_maps.append(blocks)
                pred = native_labels(blocks, post, loaded.module, s, loaded.spec.mpp, angle)
                valid = central_disc(s.native_labels.shape)
            if angle == 0:
                found = {} if semantic else nucleus_recall(s.native_labels, pred, s.native_image)
                rows.append({"image": s.name, "view": "upright", "value": 0.0, **score(s.native_labels, pred), **found})
            rows.append({"image": s.name, "view": "angle", "value": angle, **score(s.native_labels, pred, valid)})
        up = next(r for r in rows if r["image"] == s.name and r["view"] == "upright")
        log(f"  {name_of(loaded)}: {sum(r['view'] == 'upright' for r in rows)}/{len(samples)} images, {s.name}: dice {up['dice']:.3f}")
    return rows


def name_of(loaded) -> str:
    """The label a model gets in progress lines: the checkpoint's file name, or ``classical``."""
    return CLASSICAL if loaded is None else Path(str(loaded.spec.model)).name


def _summarise(rows: list[dict], metrics: Sequence[str]) -> dict:
    out = {}
    upright = [r for r in rows if r["view"] == "upright"] or [r for r in rows if r["view"] == "angle" and r["value"] == 0]
    for m in metrics:
        out[f"{m}_upright"] = float(np.mean([r[m] for r in upright]))
        by_angle = {}
        for r in rows:
            if r["view"] == "angle":
                by_angle.setdefault(r["value"], []).append(r[m])
        per_angle = {a: float(np.mean(v)) for a, v in sorted(by_angle.items())}
        vals = np.array(list(per_angle.values()))
        out[f"{m}_per_angle"] = per_angle
        out[f"{m}_rotated_mean"] = float(vals.mean())
        out[f"{m}_rotated_std"] = float(vals.std())
        out[f"{m}_rotated_min"] = float(vals.min())
        flips = [r[m] for r in rows if r["view"] == "flip"]
        if flips:
            out[f"{m}_flips"] = {r["value"]: r[m] for r in rows if r["view"] == "flip"}
    for k in RECALL_KEYS:  # nuclei instances: which true nuclei were found (upright, by stain and size)
        if upright and all(k in r for r in upright):
            vals = [r[k] for r in upright if not np.isnan(r[k])]
            out[f"{k}_upright"] = float(np.mean(vals)) if vals else float("nan")
    return out


def evaluate(models: Sequence[str], data_cfg: DataConfig, out: str | Path, task: Optional[str] = None,
             angles: Optional[Sequence[float]] = None, split: str = "all", device: str = "auto",
             log: Callable[[str], None] = print, images: Optional[Sequence[str]] = None, limit: Optional[int] = None,
             workers: int = 0, stain_norm: Optional[dict] = None, sensitivity: bool = False,
             postprocess: Optional[dict] = None, group: Optional[tuple[str, str, Sequence[str]]] = None) -> dict:
    """Score checkpoints (and/or ``classical``) on a dataset, upright and rotated.

    Args:
        models: checkpoint paths, or ``classical``.
        data_cfg: the dataset (``kind``, ``root``, ``mpp``...); with ``split`` ``val`` or
            ``train`` only that side of its split is scored, with ``all`` every image, with
            ``test`` PCam's test file. Tile sets stream (any size).
        out: folder for ``evaluation.json``, ``evaluation.csv`` and ``polar.png``.
        angles: degrees; default every 10 (classify) or 30 (segment) from 0 to 350.
        images: score only the images whose names match one of these shell patterns (``*_03``).
        group: nuclei: ``(csv, column, values)``, score only the images whose ``column`` in that CSV is
            one of ``values`` (one organ of ``configs/splits/monuseg2018.csv``); with ``images``, both apply.
        limit: score at most this many images (the first, by name) or tiles.
        workers: DataLoader workers decoding tiles.
        stain_norm: a stain target (:func:`pipeline.stain.fit_stain_target`) every nuclei model maps
            its images onto, in place of the one its checkpoint stores (``{}``: none at all).
        sensitivity: nuclei instances: also score every checkpoint upright under each foreground
            threshold x marker height (``TUNE_FG`` x ``TUNE_H``, the rest of its rule kept):
            ``postprocess_sensitivity`` in its report.
        postprocess: nuclei: every checkpoint's post-processing is replaced by these fields of
            :class:`pipeline.instances.PostProcess` (one rule for all the models compared).

    Raises:
        ModelError: a checkpoint that cannot be read or does not fit the data.
        DataError: a bad dataset file.
    """
    from pipeline.infer import prepare_model
    from pipeline.runtime import resolve_device

    if not models:
        raise ValueError("name at least one checkpoint (or 'classical') to evaluate")
    task = task or ("segment" if data_cfg.kind == "nuclei" else "classify")
    if task not in ("segment", "semantic", "classify"):
        raise ValueError(f"task must be segment, semantic or classify, got {task!r}")
    model_task = "segment" if task == "semantic" else task
    if group and task == "classify":
        raise ValueError("--group picks nuclei images; tile sets have no groups CSV")
    members = images_in_group(*group) if group else None  # a bad CSV or group fails before any model loads
    dev = resolve_device(device)
    loaded = {name: _load(name, model_task) for name in models}
    if stain_norm is not None:
        if task == "classify":
            raise ValueError("stain normalisation is for nuclei models")
        for m in loaded.values():
            if m is not None:
                m.meta["stain_norm"] = stain_norm
    if postprocess:
        if task == "classify":
            raise ValueError("post-processing is for nuclei models")
        for m in loaded.values():
            if m is not None:
                m.meta["postprocess"] = postprocess_from(postprocess, m.meta.get("postprocess", {})).to_dict()
    first = next((m for m in loaded.values() if m is not None), None)
    mpp = first.spec.mpp if first else 0.5
    tile_px = first.spec.tile_px if first else 256
    if any(m is not None and (m.spec.mpp, m.spec.tile_px) != (mpp, tile_px) for m in loaded.values()) and task == "classify":
        raise ModelError("checkpoints evaluated side by side on tiles must share mpp and tile size")
    import dataclasses

    if task == "classify":
        tiles, classes, digest = tile_split(data_cfg, split, mpp, tile_px, log=log)
        if limit:
            tiles = tiles.subset(np.arange(min(limit, len(tiles))))
        n = len(tiles)
    else:
        if split == "test":
            raise ValueError("--split test is for PCam's *_test_x.h5; nuclei sets split into train and val")
        data = load_dataset(dataclasses.replace(data_cfg, val_fraction=data_cfg.val_fraction if split != "all" else 0.0,
                                                split_csv=data_cfg.split_csv if split != "all" else None), model_task, mpp, tile_px)
        samples = sorted({"all": data.train + data.val, "train": data.train, "val": data.val}[split], key=lambda s: s.name)
        if images:
            import fnmatch

            samples = [s for s in samples if any(fnmatch.fnmatchcase(s.name, p) or s.name == Path(p).stem for p in images)]
        if members is not None:
            samples = [s for s in samples if Path(s.name).stem in members]
        samples = samples[:limit] if limit else samples
        if not samples:
            raise ValueError(f"{data_cfg.root}: no image to score (split {split!r}" + (f", images {list(images)}" if images else "")
                             + (f", {group[1]} {list(group[2])}" if group else "") + ")")
        classes, digest, n = data.classes, data.digest, len(samples)
    if angles is None:
        angles = list(range(0, 360, 10 if task == "classify" else 30))
    metrics = ["accuracy", "balanced_accuracy"] + (["auc"] if task == "classify" and len(classes) == 2 else []) \
        if task == "classify" else ["dice", "aji", "pq"] if task == "segment" else ["auc", "iou", "dice"]
    report = {"task": task, "data": str(data_cfg.root), "split": split, "n": n, "angles": list(angles),
              "dataset_digest": digest, "models": {}}
    all_rows = []
    for name, m in loaded.items():
        log(f"evaluating {name} on {n} {'tiles' if task == 'classify' else 'images'}")
        if m is not None:
            prepare_model(m, dev)
        upright_maps = [] if sensitivity and task == "segment" and m is not None else None
        rows = _classify(m, tiles, angles, dev, workers=workers, log=log) if task == "classify" else \
            _nuclei(m, samples, angles, dev, log, semantic=task == "semantic", upright_maps=upright_maps)
        report["models"][name] = _summarise(rows, metrics)
        if task != "classify" and m is not None:
            report["models"][name]["postprocess"] = PostProcess(**m.meta.get("postprocess", {})).to_dict()
        if sensitivity and task == "segment" and m is not None:
            log(f"  {name_of(m)}: post-processing sensitivity ({len(TUNE_FG) * len(TUNE_H)} settings, upright)")
            report["models"][name]["postprocess_sensitivity"] = postprocess_grid(
                m.module, samples, m.spec.mpp, dev, mean=m.mean, std=m.std, stain_target=m.meta.get("stain_norm"), full=True,
                maps=upright_maps, base=PostProcess(**m.meta.get("postprocess", {})))
        all_rows += [{"model": name, **r} for r in rows]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_rows(all_rows, out / "evaluation.csv", report)
    _polar_plot(report, {"classify": metrics[1], "segment": "dice", "semantic": "dice"}[task], out / "polar.png")
    return report


def _polar_plot(report: dict, metric: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = plt.figure(figsize=(5.5, 5.5))
    ax = fig.add_subplot(projection="polar")
    lo = 1.0
    for name, res in report["models"].items():
        per = res[f"{metric}_per_angle"]
        a = np.deg2rad(list(per) + [list(per)[0]])
        v = list(per.values()) + [list(per.values())[0]]
        lo = min(lo, min(v))
        ax.plot(a, v, marker="o", ms=3, label=Path(name).stem)
    ax.set_ylim(max(0.0, lo - 0.1), 1.0)
    ax.set_title(f"{metric.replace('_', ' ')} by rotation angle ({report['split']}, n={report['n']})")
    ax.legend(loc="lower left", fontsize=8, bbox_to_anchor=(-0.1, -0.12))
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)
