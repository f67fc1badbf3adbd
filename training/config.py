"""Training configuration: frozen dataclasses read from YAML and validated before any work.

One file (``configs/train_*.yaml``) says what to train on what, how, and where to write. A
wrong key, type or path is a :class:`TrainConfigError` naming the file and the key.

Example:
    >>> cfg = load_train_config("configs/train_nuclei_gmr.yaml", {"data": {"root": "."}}, check_paths=False)
    >>> cfg.model, cfg.task
    ('gmr_unet', 'segment')
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from pipeline.config import ConfigError, load_yaml

__all__ = ["TrainConfigError", "DataConfig", "AugmentConfig", "OptimConfig", "TrainConfig", "load_train_config"]

DATA_KINDS = ("nuclei", "folder", "csv", "h5")


class TrainConfigError(ValueError):
    """A training configuration value is wrong; the message names the file and the key."""


@dataclass(frozen=True)
class DataConfig:
    """Where the labelled data is and how it is split.

    Attributes:
        kind: ``nuclei`` (``images/`` + ``labels/`` pairs), ``folder`` (one folder per class),
            ``csv`` (``path,label`` rows) or ``h5`` (PCam-style ``*_x.h5`` / ``*_y.h5``).
        root: the dataset folder (``csv``: the CSV file; ``h5``: the folder holding the pairs).
        val_root: tiles (``folder`` / ``csv``): a second set of the same kind that is the whole
            validation side (NCT-CRC's CRC-VAL-HE-7K); ``root`` is then all training.
        mpp: the images' micrometres per pixel (resampled to the model's ``mpp``).
        mpp_csv: instead of ``mpp``, a CSV with a per-image ``mpp`` (or ``mpp_nominal``) column.
        images, labels: sub-folders of ``root`` for ``nuclei``.
        classes: class names (classification); default: sorted folder names / labels.
        split_csv: a CSV ``image,split`` (split ``train`` or ``val``) naming whole images.
        val_fraction: else this fraction of whole images (or patient groups) goes to validation...
        seed: ...drawn with this seed.
        group_regex: optional regex whose first group names the patient of an image file; all
            images of one patient land on the same side of the split.
        groups_csv, group_column: instead, a CSV naming each image's group in a column (e.g. the
            MoNuSeg split CSV's ``organ``: with ``folds`` = the number of organs, cross-validation
            leaves one organ out per fold).
        folds, fold: k-fold cross-validation instead: the groups, shuffled with ``seed``, are
            dealt into ``folds`` folds and fold ``fold`` is the validation side.
        semantic: nuclei: the masks are binary foreground (touching nuclei merged, as in
            CryoNuSeg), so each nucleus's distance map is unknown: only the foreground loss
            trains on these images.
        extra: nuclei: more sets that only add training images, each a mapping of the keys
            above (its own ``root``, ``mpp``, ``labels``, ``semantic``...; its ``split_csv``'s
            ``train`` rows, or all its images without one). Validation, and so every choice,
            stays on this set's validation side.
    """

    kind: str = "nuclei"
    root: str = "../shared/data/nuclei/monuseg2018"
    val_root: Optional[str] = None
    mpp: Optional[float] = None
    mpp_csv: Optional[str] = None
    images: str = "images"
    labels: str = "labels"
    classes: Optional[list] = None
    split_csv: Optional[str] = None
    val_fraction: float = 0.2
    seed: int = 0
    group_regex: Optional[str] = None
    groups_csv: Optional[str] = None
    group_column: str = "group"
    folds: int = 0
    fold: int = 0
    semantic: bool = False
    extra: list = field(default_factory=list)


@dataclass(frozen=True)
class AugmentConfig:
    """Albumentations augmentation (probabilities per sample; 0 switches one off).

    Geometric augmentation (``geometric``: random 90-degree rotations, flips and free
    rotations) is off by default: GMR networks get rotation robustness from their
    architecture, and the paper trains without it. Turn it on for baselines.
    """

    hed: float = 0.5
    hed_strength: float = 0.2
    hsv: float = 0.0
    brightness_contrast: float = 0.0
    gamma: float = 0.0
    grayscale: float = 0.0
    blur: float = 0.2
    noise: float = 0.2
    elastic: float = 0.0
    geometric: bool = False


@dataclass(frozen=True)
class OptimConfig:
    """Optimiser (``sgd``: momentum 0.9, Nesterov; or ``adamw``) and cosine schedule with linear warm-up."""

    name: str = "sgd"
    lr: float = 2e-2
    weight_decay: float = 1e-4
    warmup_epochs: float = 1.0


@dataclass(frozen=True)
class TrainConfig:
    """Everything one training run needs.

    Attributes:
        task: ``segment`` (nuclei) or ``classify`` (tiles).
        model: registry name; ``model_kwargs`` its arguments (``out_channels`` / ``num_classes`` are set here).
        tile_px: crop side at ``mpp`` (segment: random crops; classify: tiles are resized to it).
        mpp: the model's resolution, micrometres per pixel.
        epochs, batch_size: length of the run; ``samples_per_epoch`` random crops make a segment epoch.
        out: run folder (metrics, ``last.pt`` with the full training state, ``best.pt`` for inference).
        seed: seeds the model, the crops and the augmentation: the same seed reproduces a run on one device.
        num_workers: DataLoader workers; ``amp``: autocast on CUDA; ``device``: auto, cpu, cuda, cuda:N.
        channels_last: NHWC memory layout (faster convolutions on most devices); ``cpu_bf16``: bf16
            autocast on the CPU (only faster with bf16 instructions); ``compile``: ``torch.compile``
            the network (slow first steps, faster after). ``gmrpath benchmark train`` measures each.
        val_angles: rotations (degrees) at which validation is also scored each epoch.
        val_every: validate every this many epochs, and always after the last; above 1 only with
            ``select: last`` (an epoch never validated cannot be chosen). Saves time when the
            validation images choose nothing.
        select: the validation metric that picks ``best.pt`` (higher is better), or ``last``: no
            selection, ``best.pt`` is the last epoch (the validation images then choose nothing).
        postprocess: ``tune`` (foreground threshold and marker height chosen on the validation
            images at the end), ``fixed`` (the defaults of :class:`~pipeline.instances.PostProcess`
            for every model: one rule, chosen on no image), or a mapping of ``PostProcess``'s
            fields (a fixed rule chosen elsewhere, e.g. out of fold): used for validation and stored.
        separation_weight: weight of a second distance-map error averaged over the foreground
            dilated by 2 px only (where touching nuclei are told apart); 0 leaves it out.
        stain_norm: nuclei: ``{method: macenko | vahadane | reinhard, reference: IMAGE | auto}`` (``auto``:
            the training image whose stats are nearest the training set's median). Every image
            is mapped onto the reference's stains first (:mod:`pipeline.stain`), in training, in
            validation and, since the checkpoint stores the reference's stats, at inference.
        init: optional checkpoint (a ``best.pt`` or a shipped ``.pt``) whose weights start the run
            instead of random ones (fine-tuning, timm's ``--initial-checkpoint``); it must fit
            ``model`` and ``model_kwargs``. ``--resume`` ignores it and continues ``last.pt``.
    """

    task: str = "segment"
    model: str = "gmr_unet"
    model_kwargs: dict = field(default_factory=dict)
    data: DataConfig = field(default_factory=DataConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    tile_px: int = 128
    mpp: float = 0.5
    epochs: int = 30
    batch_size: int = 8
    samples_per_epoch: int = 400
    out: str = "results/train/run"
    seed: int = 0
    num_workers: int = 1
    amp: bool = True
    device: str = "auto"
    val_angles: list = field(default_factory=list)
    val_every: int = 1
    select: str = "val_aji"
    init: Optional[str] = None
    targets: str = "aligned"
    postprocess: Any = "tune"  # "tune", "fixed" or a mapping of PostProcess fields
    separation_weight: float = 0.0
    channels_last: bool = True
    cpu_bf16: bool = False
    compile: bool = False
    stain_norm: Optional[dict] = None


_NESTED = {"data": DataConfig, "augment": AugmentConfig, "optim": OptimConfig}


def _number(value: Any, positive: bool = True) -> bool:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    return ok and (value > 0 if positive else value >= 0)


def _build(cls, data: Any, where: str, source: str):
    if not isinstance(data, dict):
        raise TrainConfigError(f"{source}: {where or 'the config'} must be a mapping, got {type(data).__name__}")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise TrainConfigError(f"{source}: unknown key(s) {unknown} in {where or 'top level'}; allowed: {sorted(known)}")
    kwargs = {k: (_build(_NESTED[k], v, k, source) if k in _NESTED and cls is TrainConfig else v) for k, v in data.items()}
    if cls is DataConfig and "extra" in kwargs:
        if not isinstance(kwargs["extra"], list):
            raise TrainConfigError(f"{source}: data.extra must be a list of data mappings, got {type(kwargs['extra']).__name__}")
        kwargs["extra"] = [_build(DataConfig, e, f"data.extra[{i}]", source) for i, e in enumerate(kwargs["extra"])]
    return cls(**kwargs)


def _validate(cfg: TrainConfig, source: str) -> None:
    def bad(key, want, value):
        raise TrainConfigError(f"{source}: {key} must be {want}, got {value!r}")

    if cfg.task not in ("segment", "classify"):
        bad("task", "'segment' or 'classify'", cfg.task)
    for key in ("tile_px", "epochs", "batch_size", "samples_per_epoch"):
        v = getattr(cfg, key)
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            bad(key, "a positive int", v)
    for key, v in (("seed", cfg.seed), ("num_workers", cfg.num_workers), ("data.seed", cfg.data.seed)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            bad(key, "an int >= 0", v)
    if not _number(cfg.mpp):
        bad("mpp", "a positive number", cfg.mpp)
    for key in ("amp", "channels_last", "cpu_bf16", "compile"):
        if not isinstance(getattr(cfg, key), bool):
            bad(key, "true or false", getattr(cfg, key))
    if not isinstance(cfg.device, str):
        bad("device", "'auto', 'cpu', 'cuda' or 'cuda:N'", cfg.device)
    if not isinstance(cfg.model_kwargs, dict):
        bad("model_kwargs", "a mapping", cfg.model_kwargs)
    if cfg.targets not in ("aligned", "nearest"):
        bad("targets", "'aligned' or 'nearest'", cfg.targets)
    if isinstance(cfg.postprocess, dict) and cfg.postprocess:
        from pipeline.instances import postprocess_from

        try:
            postprocess_from(cfg.postprocess)
        except ValueError as err:
            raise TrainConfigError(f"{source}: postprocess: {err}") from None
    elif cfg.postprocess not in ("tune", "fixed"):
        bad("postprocess", "'tune', 'fixed' or a mapping of fg_threshold, marker_h, min_area_px", cfg.postprocess)
    if not isinstance(cfg.select, str) or not (cfg.select == "last" or cfg.select.startswith("val_")):
        bad("select", "'last' or a validation metric such as 'val_aji'", cfg.select)
    if isinstance(cfg.val_every, bool) or not isinstance(cfg.val_every, int) or cfg.val_every < 1:
        bad("val_every", "an int >= 1", cfg.val_every)
    if cfg.val_every > 1 and cfg.select != "last":
        bad("val_every", f"1 when select is {cfg.select!r} (every epoch must be scored to choose one), or select: last",
            cfg.val_every)
    if not _number(cfg.separation_weight, positive=False):
        bad("separation_weight", "a number >= 0", cfg.separation_weight)
    if cfg.stain_norm is not None:
        from pipeline.stain import STAIN_METHODS

        sn = cfg.stain_norm
        if cfg.task != "segment" or not isinstance(sn, dict) or set(sn) != {"method", "reference"} \
                or sn["method"] not in STAIN_METHODS or not isinstance(sn["reference"], str):
            bad("stain_norm", f"null or {{method: one of {STAIN_METHODS}, reference: IMAGE or auto}} (nuclei only)", sn)
    if cfg.init is not None and (not isinstance(cfg.init, str) or not cfg.init):
        bad("init", "a checkpoint path", cfg.init)
    if not isinstance(cfg.val_angles, list) or not all(_number(a, positive=False) for a in cfg.val_angles):
        bad("val_angles", "a list of angles in degrees >= 0", cfg.val_angles)
    d = cfg.data
    if d.kind not in DATA_KINDS:
        bad("data.kind", f"one of {DATA_KINDS}", d.kind)
    if d.mpp is None and d.mpp_csv is None:
        bad("data.mpp", "the images' micrometres per pixel (or set data.mpp_csv)", d.mpp)
    if d.mpp is not None and not _number(d.mpp):
        bad("data.mpp", "a positive number", d.mpp)
    if d.val_root is not None and (d.kind not in ("folder", "csv") or not isinstance(d.val_root, str) or not d.val_root):
        bad("data.val_root", "a folder (or CSV) of validation tiles, for data.kind folder or csv", d.val_root)
    if not (_number(d.val_fraction, positive=False) and d.val_fraction < 1):
        bad("data.val_fraction", "a number in [0, 1)", d.val_fraction)
    if d.classes is not None and (not isinstance(d.classes, list) or len(set(map(str, d.classes))) != len(d.classes)):
        bad("data.classes", "a list of distinct names", d.classes)
    if isinstance(d.folds, bool) or not isinstance(d.folds, int) or d.folds < 0 or d.folds == 1:
        bad("data.folds", "0 (no cross-validation) or an int >= 2", d.folds)
    if isinstance(d.fold, bool) or not isinstance(d.fold, int) or not 0 <= d.fold < max(d.folds, 1):
        bad("data.fold", f"an int in [0, {max(d.folds, 1)})", d.fold)
    if not isinstance(d.semantic, bool) or (d.semantic and d.kind != "nuclei"):
        bad("data.semantic", "true or false (true only for data.kind nuclei)", d.semantic)
    if d.extra and (cfg.task != "segment" or d.kind != "nuclei"):
        bad("data.extra", "empty except for nuclei segmentation (task segment, data.kind nuclei)", d.extra)
    for i, e in enumerate(d.extra):
        where = f"data.extra[{i}]"
        if e.kind != "nuclei" or e.extra or e.folds or e.val_root is not None:
            bad(where, "a nuclei set (kind nuclei) without its own extra, folds or val_root", dataclasses.asdict(e))
        if e.mpp is None and e.mpp_csv is None or e.mpp is not None and not _number(e.mpp):
            bad(f"{where}.mpp", "a positive number (or set mpp_csv)", e.mpp)
        if not isinstance(e.semantic, bool):
            bad(f"{where}.semantic", "true or false", e.semantic)
    a = cfg.augment
    for key in ("hed", "hsv", "brightness_contrast", "gamma", "grayscale", "blur", "noise", "elastic"):
        v = getattr(a, key)
        if not (_number(v, positive=False) and v <= 1):
            bad(f"augment.{key}", "a probability in [0, 1]", v)
    if not isinstance(a.geometric, bool):
        bad("augment.geometric", "true or false", a.geometric)
    o = cfg.optim
    if o.name not in ("sgd", "adamw"):
        bad("optim.name", "'sgd' or 'adamw'", o.name)
    if not _number(o.lr):
        bad("optim.lr", "a positive number", o.lr)
    for key in ("weight_decay", "warmup_epochs"):
        if not _number(getattr(o, key), positive=False):
            bad(f"optim.{key}", "a number >= 0", getattr(o, key))


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        nested = k in _NESTED or k == "model_kwargs"  # --set model_kwargs.base_channels=8 keeps the other kwargs
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) and nested else v
    return out


def load_train_config(path: str | Path, overrides: Optional[dict] = None, check_paths: bool = True) -> TrainConfig:
    """Read and validate a training YAML; ``overrides`` (nested mappings) win.

    Relative paths (``data.root``, ``data.split_csv``, ``data.mpp_csv``, ``out``, ``init``) are resolved
    against the repository root for files under ``configs/``, else the file's folder.

    Raises:
        TrainConfigError: unknown key, wrong type or value, missing data path.
    """
    path = Path(path)
    if not path.is_file():
        raise TrainConfigError(f"{path}: training config not found")
    try:
        data = load_yaml(path) or {}
    except ConfigError as err:
        raise TrainConfigError(str(err)) from None
    if not isinstance(data, dict):
        raise TrainConfigError(f"{path}: a training config must be a mapping")
    data = _merge(data, overrides or {})
    try:
        cfg = _build(TrainConfig, data, "", str(path))
    except TypeError as err:
        raise TrainConfigError(f"{path}: {err}") from None
    _validate(cfg, str(path))
    base = path.resolve().parent
    base = base.parent if base.name == "configs" else base

    def resolve(p):
        return None if p is None else str(Path(p) if Path(p).is_absolute() else (base / p).resolve())

    def resolve_data(dc: DataConfig) -> DataConfig:
        return dataclasses.replace(dc, root=resolve(dc.root), val_root=resolve(dc.val_root), split_csv=resolve(dc.split_csv),
                                   mpp_csv=resolve(dc.mpp_csv), groups_csv=resolve(dc.groups_csv), extra=[resolve_data(e) for e in dc.extra])

    d = resolve_data(cfg.data)
    stain = cfg.stain_norm
    if stain and stain["reference"] != "auto":
        stain = {**stain, "reference": resolve(stain["reference"])}
    cfg = dataclasses.replace(cfg, data=d, out=resolve(cfg.out), init=resolve(cfg.init), stain_norm=stain)
    if check_paths:
        paths = [("data.root", d.root), ("data.val_root", d.val_root), ("data.split_csv", d.split_csv), ("data.mpp_csv", d.mpp_csv),
                 ("data.groups_csv", d.groups_csv), ("init", cfg.init),
                 ("stain_norm.reference", stain["reference"] if stain and stain["reference"] != "auto" else None)]
        for i, e in enumerate(d.extra):
            paths += [(f"data.extra[{i}].{k}", getattr(e, k)) for k in ("root", "split_csv", "mpp_csv", "groups_csv")]
        for key, p in paths:
            if p is not None and not Path(p).exists():
                raise TrainConfigError(f"{path}: {key} {p} does not exist")
    return cfg


def config_dict(cfg: TrainConfig) -> dict:
    """The plain mapping of a config (written beside every run)."""
    return dataclasses.asdict(cfg)
