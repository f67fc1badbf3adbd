"""k-fold cross-validation by whole image: k trainings, each scored upright and rotated.

Fold ``i`` trains on the other folds (``data.folds = k``, ``data.fold = i``) into
``OUT/fold<i>/`` (its log in ``train.log``), then its ``best.pt`` is evaluated on fold ``i`` by the paper's protocol
(:func:`training.evaluate.evaluate`); a nuclei fold also scores the classical baseline
(``classical_*`` keys) on the same held-out images, names their groups and scores every
post-processing setting upright (``postprocess_sensitivity``): averaged over folds, that is a
threshold choice made out of fold (``pooled_postprocess``, best AJI first). ``OUT/cv.json``
gathers every fold and the mean and standard deviation over folds. Finished folds are skipped
on a rerun (with ``resume``, an unfinished one continues). ``only`` runs some of the k folds (the
others untouched); ``cv.json`` then names them (``folds_run``) and pools over those alone.

Example::

    from training.config import load_train_config
    cross_validate(load_train_config("configs/train_kather_gmr.yaml"), folds=5)
"""

from __future__ import annotations

import csv
import dataclasses
import json
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np

from .config import TrainConfig
from .records import tee_log

__all__ = ["cross_validate", "SEGMENT_ANGLES"]

SEGMENT_ANGLES = [0, 90, 180, 270, 45]  # nuclei folds: the model card's angles (tiles: every 10 degrees)


def cross_validate(cfg: TrainConfig, folds: int, resume: bool = False, skip_bad: bool = False,
                   log: Callable[[str], None] = print, only: Optional[Sequence[int]] = None) -> dict:
    """Train and score ``folds`` folds (or the folds in ``only``); returns (and writes ``OUT/cv.json``) the
    per-fold and pooled scores.

    Raises:
        ValueError: fewer than 2 folds, or an ``only`` fold outside ``0 .. folds - 1`` or repeated.
    """
    from .datasets import group_of
    from .evaluate import CLASSICAL, evaluate
    from .loop import train

    if folds < 2:
        raise ValueError(f"cross-validation needs at least 2 folds, got {folds}")
    run = list(range(folds)) if only is None else [int(i) for i in only]
    if not run or len(set(run)) != len(run) or not all(0 <= i < folds for i in run):
        raise ValueError(f"folds to run must be distinct, in 0..{folds - 1}, got {list(only or [])}")
    root = Path(cfg.out)
    nuclei = cfg.task == "segment"
    per_fold = []
    for n, i in enumerate(run):
        fold_cfg = dataclasses.replace(cfg, out=str(root / f"fold{i}"), data=dataclasses.replace(cfg.data, folds=folds, fold=i))
        summary_path = Path(fold_cfg.out) / "summary.json"
        if not summary_path.is_file():
            log(f"fold {i} ({n + 1}/{len(run)} of {folds}-fold): training")
            train(fold_cfg, resume=resume and (Path(fold_cfg.out) / "last.pt").is_file(), skip_bad=skip_bad,
                  log=tee_log(log, Path(fold_cfg.out) / "train.log"))
        best, eval_dir = str(Path(fold_cfg.out) / "best.pt"), Path(fold_cfg.out) / "eval"
        report = evaluate([best] + ([CLASSICAL] if nuclei else []), fold_cfg.data, eval_dir, task=cfg.task,
                          split="val", device=cfg.device, log=log, angles=SEGMENT_ANGLES if nuclei else None,
                          sensitivity=nuclei)
        row = {"fold": i, "n_val": report["n"], **_scalars(report["models"][best])}
        if nuclei:
            row.update({f"{CLASSICAL}_{k}": v for k, v in _scalars(report["models"][CLASSICAL]).items()})
            with open(eval_dir / "evaluation.csv", newline="") as fh:
                row["groups"] = sorted({group_of(fold_cfg.data, r["image"]) for r in csv.DictReader(fh)})
            row["postprocess_sensitivity"] = report["models"][best]["postprocess_sensitivity"]
        per_fold.append(row)
    keys = [k for k in per_fold[0] if k not in ("fold", "n_val", "groups", "postprocess_sensitivity")]
    pooled = {k: {"mean": float(np.mean([f[k] for f in per_fold])),
                  "sd": float(np.std([f[k] for f in per_fold], ddof=1)) if len(per_fold) > 1 else None} for k in keys}
    result = {"model": cfg.model, "folds": folds, "folds_run": run, "per_fold": per_fold, "pooled": pooled}
    if nuclei:
        result["pooled_postprocess"] = _pooled_grid([f["postprocess_sensitivity"] for f in per_fold])
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / ".cv.json.tmp"
    tmp.write_text(json.dumps(result, indent=1))
    tmp.replace(root / "cv.json")
    return result


def _scalars(scores: dict) -> dict:
    return {k: v for k, v in scores.items() if not isinstance(v, (dict, list))}


def _pooled_grid(grids: list[list[dict]]) -> list[dict]:
    """Each post-processing setting's Dice, AJI and PQ averaged over folds, best mean AJI first."""
    settings = [(g["fg_threshold"], g["marker_h"]) for g in grids[0]]
    pooled = []
    for fg, h in settings:
        rows = [next(g for g in grid if (g["fg_threshold"], g["marker_h"]) == (fg, h)) for grid in grids]
        pooled.append({"fg_threshold": fg, "marker_h": h, **{k: float(np.mean([r[k] for r in rows])) for k in ("dice", "aji", "pq")}})
    return sorted(pooled, key=lambda r: -r["aji"])
