"""k-fold cross-validation by whole image: k trainings, each scored upright and rotated.

Fold ``i`` trains on the other folds (``data.folds = k``, ``data.fold = i``) into
``OUT/fold<i>/``, then its ``best.pt`` is evaluated on fold ``i`` by the paper's protocol
(:func:`training.evaluate.evaluate`). ``OUT/cv.json`` gathers every fold and the mean and
standard deviation over folds. Finished folds are skipped on a rerun (with ``resume``,
an unfinished one continues).

Example::

    from training.config import load_train_config
    cross_validate(load_train_config("configs/train_kather_gmr.yaml"), folds=5)
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Callable

import numpy as np

from .config import TrainConfig

__all__ = ["cross_validate", "SEGMENT_ANGLES"]

SEGMENT_ANGLES = [0, 90, 180, 270, 45]  # nuclei folds: the model card's angles (tiles: every 10 degrees)


def cross_validate(cfg: TrainConfig, folds: int, resume: bool = False, skip_bad: bool = False,
                   log: Callable[[str], None] = print) -> dict:
    """Train and score ``folds`` folds; returns (and writes ``OUT/cv.json``) the per-fold and pooled scores."""
    from .evaluate import evaluate
    from .loop import train

    if folds < 2:
        raise ValueError(f"cross-validation needs at least 2 folds, got {folds}")
    root = Path(cfg.out)
    per_fold = []
    for i in range(folds):
        fold_cfg = dataclasses.replace(cfg, out=str(root / f"fold{i}"), data=dataclasses.replace(cfg.data, folds=folds, fold=i))
        summary_path = Path(fold_cfg.out) / "summary.json"
        if not summary_path.is_file():
            log(f"fold {i + 1}/{folds}: training")
            train(fold_cfg, resume=resume and (Path(fold_cfg.out) / "last.pt").is_file(), skip_bad=skip_bad, log=log)
        report = evaluate([str(Path(fold_cfg.out) / "best.pt")], fold_cfg.data, Path(fold_cfg.out) / "eval", task=cfg.task,
                          split="val", device=cfg.device, log=log, angles=None if cfg.task == "classify" else SEGMENT_ANGLES)
        scores = next(iter(report["models"].values()))
        per_fold.append({"fold": i, "n_val": report["n"], **{k: v for k, v in scores.items() if not isinstance(v, dict)}})
    keys = [k for k in per_fold[0] if k not in ("fold", "n_val")]
    pooled = {k: {"mean": float(np.mean([f[k] for f in per_fold])), "sd": float(np.std([f[k] for f in per_fold], ddof=1))}
              for k in keys}
    result = {"model": cfg.model, "folds": folds, "per_fold": per_fold, "pooled": pooled}
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / ".cv.json.tmp"
    tmp.write_text(json.dumps(result, indent=1))
    tmp.replace(root / "cv.json")
    return result
