"""Pipeline configuration: frozen dataclasses, loaded from YAML and validated before any work.

The same file drives ``gmrpath`` and the Snakemake workflow. A wrong key, type or path is a
:class:`ConfigError` (a ValueError) naming the file and the key.

Example:
    >>> cfg = load_config("configs/default.yaml")
    >>> cfg.classify.tile_px, cfg.classify.mpp
    (224, 0.5)
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

__all__ = ["ConfigError", "ModelSpec", "TissueConfig", "RunConfig", "PipelineConfig", "load_config", "PRESETS"]


class ConfigError(ValueError):
    """A configuration value is wrong; the message names the file and the key."""


NCT_CRC_CLASSES = ["ADI", "BACK", "DEB", "LYM", "MUC", "MUS", "NORM", "STR", "TUM"]

#: Trained weights that ship with the repository (see models/README.md for their model cards).
MODELS_DIR = Path(__file__).resolve().parents[1] / "models"
NUCLEI_MODEL = MODELS_DIR / "nuclei_gmr_unet.pt"

#: Task presets: what each model expects (classes, tile size and resolution).
PRESETS: dict[str, dict[str, Any]] = {
    "nct_crc": dict(task="classify", model="gmr_resnet18", classes=NCT_CRC_CLASSES, tile_px=224, mpp=0.5),
    "pcam": dict(task="classify", model="gmr_resnet18", classes=["normal", "tumour"], tile_px=96, mpp=0.972),
    # the GMR U-Net trained on MoNuSeg 2018 (CC BY-NC-SA 4.0: see models/nuclei_gmr_unet.md)
    "nuclei": dict(task="segment", model=str(NUCLEI_MODEL), classes=["nucleus"], tile_px=128, mpp=0.5, overlap_px=32),
}


def is_checkpoint_path(model: str) -> bool:
    """A ``model`` value names a checkpoint file (``.pt`` or a path), not a registry entry."""
    return model.endswith(".pt") or "/" in model or "\\" in model


@dataclass(frozen=True)
class ModelSpec:
    """One model and the tiles it sees.

    Attributes:
        task: ``classify`` (per-tile class probabilities) or ``segment`` (per-pixel nuclei map).
        model: a registry name (random weights until trained ones exist) or a checkpoint path
            (``.pt`` written by ``pipeline.models.save_checkpoint``; loaded with weights_only=True).
        model_kwargs: arguments for ``create_model`` when ``model`` is a name.
        classes: class names (classify) or the foreground name (segment).
        tile_px: tile side in pixels at ``mpp``.
        mpp: resolution the model works at, micrometres per pixel.
        stride_px: classify: grid step in pixels at ``mpp`` (default ``tile_px``: no overlap).
        overlap_px: segment: the least margin read around each block, pixels at ``mpp`` (the
            network's receptive radius is used when it is larger).
        seed: seed for the random initialisation of an untrained model (reproducible demo runs).
        stain_norm: segment: map each slide's stains onto a reference before the network,
            ``"METHOD:REFERENCE_IMAGE"`` (``macenko``, ``vahadane`` or ``reinhard``); ``"none"`` turns
            off a checkpoint's own; null (default) uses the checkpoint's, if it stores one.
        postprocess: segment: overrides of the checkpoint's post-processing (``fg_threshold``,
            ``marker_h``, ``min_area_px`` of :class:`pipeline.instances.PostProcess`); empty: its own.
        from_preset: the fields (of classes, tile_px, mpp) that came from a preset and were not set
            by the user: a checkpoint's own values replace these (set internally, not in YAML).
    """

    task: str = "classify"
    model: str = "gmr_resnet18"
    model_kwargs: dict = field(default_factory=dict)
    classes: list = field(default_factory=lambda: list(NCT_CRC_CLASSES))
    tile_px: int = 224
    mpp: float = 0.5
    stride_px: Optional[int] = None
    overlap_px: int = 32
    seed: int = 0
    stain_norm: Optional[str] = None
    postprocess: dict = field(default_factory=dict)
    from_preset: tuple = field(default=(), compare=False, repr=False)

    @property
    def step_px(self) -> int:
        return self.stride_px or self.tile_px


@dataclass(frozen=True)
class TissueConfig:
    """Tissue detection on a low-resolution thumbnail.

    Attributes:
        mask_mpp: resolution of the tissue mask.
        min_tissue_fraction: a tile is kept when at least this fraction of it is tissue.
        min_object_um2: tissue pieces smaller than this are dropped (dust, debris).
    """

    mask_mpp: float = 8.0
    min_tissue_fraction: float = 0.25
    min_object_um2: float = 5000.0


@dataclass(frozen=True)
class RunConfig:
    """How inference runs. ``device``: auto, cpu, cuda, cuda:N; ``tta``: none or d4; ``viewer``: write
    ``OUT/<slide>/viewer/index.html`` (the slide with its layers, :mod:`pipeline.write_viewer`)."""

    device: str = "auto"
    batch_size: int = 16
    num_workers: int = 2
    tta: str = "none"
    amp: bool = True
    chunk_tiles: int = 16
    viewer: bool = True


@dataclass(frozen=True)
class PipelineConfig:
    """Everything one run needs. Paths are resolved against the config file's folder's parent
    (the repository root for files under ``configs/``)."""

    slides: str = "data/demo"
    out: str = "results/demo"
    mpp: Optional[float] = None
    mpp_csv: Optional[str] = None
    classify: Optional[ModelSpec] = field(default_factory=ModelSpec)
    segment: Optional[ModelSpec] = None
    tissue: TissueConfig = field(default_factory=TissueConfig)
    run: RunConfig = field(default_factory=RunConfig)


def _build(cls, data: Any, where: str, source: str):
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: {where} must be a mapping, got {type(data).__name__}")
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ConfigError(f"{source}: unknown key(s) {unknown} in {where}; allowed: {sorted(known)}")
    kwargs = {}
    for name, value in data.items():
        key = f"{where}.{name}" if where else name
        if name in ("classify", "segment"):
            kwargs[name] = None if value is None else _model_spec(value, key, source)
        elif name == "tissue":
            kwargs[name] = _build(TissueConfig, value, key, source)
        elif name == "run":
            kwargs[name] = _build(RunConfig, value, key, source)
        else:
            kwargs[name] = value
    try:
        obj = cls(**kwargs)
    except TypeError as err:
        raise ConfigError(f"{source}: {where or 'top level'}: {err}") from None
    _check_types(obj, where, source)
    return obj


ADOPTABLE = ("classes", "tile_px", "mpp")  # what a checkpoint knows better than a preset


def preset_spec(preset: str, **fields) -> ModelSpec:
    """The spec of ``preset`` with ``fields`` set; the preset's classes, tile_px and mpp that
    ``fields`` leave alone may be replaced by a checkpoint's own (see ``from_preset``)."""
    return ModelSpec(**{**PRESETS[preset], **fields}, from_preset=tuple(k for k in ADOPTABLE if k not in fields))


def _model_spec(value: Any, where: str, source: str) -> ModelSpec:
    if isinstance(value, dict) and "from_preset" in value:
        raise ConfigError(f"{source}: unknown key 'from_preset' in {where}")
    preset = value.get("preset") if isinstance(value, dict) else None
    if preset is not None:
        if preset not in PRESETS:
            raise ConfigError(f"{source}: {where}.preset {preset!r} unknown; choose one of {sorted(PRESETS)}")
        own = {k: v for k, v in value.items() if k != "preset"}
        value = {**PRESETS[preset], **own}
    spec = _build(ModelSpec, value, where, source)
    return dataclasses.replace(spec, from_preset=tuple(k for k in ADOPTABLE if k not in own)) if preset is not None else spec


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def invariance_multiple(module) -> int:
    """The input-side multiple that keeps a GMR network's output exactly invariant to 90-degree
    rotations and flips (0 for networks without that guarantee)."""
    return int(getattr(module, "size_multiple", 0)) if getattr(module, "conv_type", "") == "gmr" else 0


_MULTIPLES: dict[str, int] = {}


def _size_multiple(model: str, model_kwargs: dict, n_classes: int) -> int:
    """:func:`invariance_multiple` of a registry model (0 when it cannot be built here)."""
    import json

    key = json.dumps([model, model_kwargs, n_classes], sort_keys=True, default=str)
    if key not in _MULTIPLES:
        from gmr_models import create_model

        try:
            _MULTIPLES[key] = invariance_multiple(create_model(model, **{"num_classes": n_classes, **model_kwargs}))
        except Exception:  # noqa: BLE001 - a bad name or argument is reported when the model is built
            _MULTIPLES[key] = 0
    return _MULTIPLES[key]


def _check_types(obj, where: str, source: str) -> None:
    def bad(name, want):
        key = f"{where}.{name}" if where else name
        raise ConfigError(f"{source}: {key} must be {want}, got {getattr(obj, name)!r}")

    if isinstance(obj, ModelSpec):
        if obj.task not in ("classify", "segment"):
            bad("task", "'classify' or 'segment'")
        if not isinstance(obj.model, str) or not obj.model:
            bad("model", "a registry name or a checkpoint path")
        if not isinstance(obj.model_kwargs, dict):
            bad("model_kwargs", "a mapping")
        for name in ("tile_px", "overlap_px", "seed"):
            if not _is_int(getattr(obj, name)) or getattr(obj, name) < (1 if name == "tile_px" else 0):
                bad(name, "a positive int" if name == "tile_px" else "an int >= 0")
        if obj.stride_px is not None and (not _is_int(obj.stride_px) or obj.stride_px < 1):
            bad("stride_px", "a positive int or null")
        if not _is_number(obj.mpp) or obj.mpp <= 0:
            bad("mpp", "a positive number (micrometres per pixel)")
        if not isinstance(obj.classes, list) or not obj.classes or not all(isinstance(c, str) and c for c in obj.classes):
            bad("classes", "a non-empty list of names")
        if len(set(obj.classes)) != len(obj.classes):
            bad("classes", "distinct names")
        if obj.task == "segment" and obj.overlap_px * 2 >= obj.tile_px:
            bad("overlap_px", "less than half of tile_px")
        if obj.stain_norm is not None and obj.stain_norm != "none":
            from .stain import STAIN_METHODS, split_stain_option

            try:
                _, reference = split_stain_option(obj.stain_norm)
            except ValueError:
                reference = None
            if obj.task != "segment" or reference is None:
                bad("stain_norm", f"null, 'none' or METHOD:REFERENCE_IMAGE with METHOD one of {STAIN_METHODS} (nuclei only)")
            if not Path(reference).is_file():
                bad("stain_norm", f"a reference image that exists ({reference} does not)")
        if obj.postprocess and obj.task != "segment":
            bad("postprocess", "empty for a classify model (post-processing is for nuclei only)")
        try:
            from .instances import postprocess_from
            postprocess_from(obj.postprocess)
        except ValueError as err:
            raise ConfigError(f"{source}: {where}.postprocess: {err}") from None
        if obj.task == "classify" and not is_checkpoint_path(obj.model):
            multiple = _size_multiple(obj.model, obj.model_kwargs, len(obj.classes))
            if multiple and obj.tile_px % multiple:
                bad("tile_px", f"a multiple of {multiple} for {obj.model} (other sizes break its exact invariance "
                               f"to 90-degree rotations and flips; e.g. {obj.tile_px // multiple * multiple or multiple} "
                               f"or {(obj.tile_px // multiple + 1) * multiple})")
    elif isinstance(obj, TissueConfig):
        if not _is_number(obj.mask_mpp) or obj.mask_mpp <= 0:
            bad("mask_mpp", "a positive number")
        if not _is_number(obj.min_tissue_fraction) or not 0 <= obj.min_tissue_fraction <= 1:
            bad("min_tissue_fraction", "between 0 and 1")
        if not _is_number(obj.min_object_um2) or obj.min_object_um2 < 0:
            bad("min_object_um2", "a number of square micrometres >= 0")
    elif isinstance(obj, RunConfig):
        if obj.tta not in ("none", "d4"):
            bad("tta", "'none' or 'd4'")
        for name in ("batch_size", "chunk_tiles"):
            if not _is_int(getattr(obj, name)) or getattr(obj, name) < 1:
                bad(name, "a positive int")
        if not _is_int(obj.num_workers) or obj.num_workers < 0:
            bad("num_workers", "an int >= 0")
        if not isinstance(obj.device, str) or not re.fullmatch(r"auto|cpu|cuda(:\d+)?", obj.device):
            bad("device", "'auto', 'cpu', 'cuda' or 'cuda:N'")
        for name in ("amp", "viewer"):
            if not isinstance(getattr(obj, name), bool):
                bad(name, "true or false")
    elif isinstance(obj, PipelineConfig):
        for name in ("slides", "out"):
            if not isinstance(getattr(obj, name), str) or not getattr(obj, name):
                bad(name, "a path")
        if obj.mpp_csv is not None and not isinstance(obj.mpp_csv, str):
            bad("mpp_csv", "a path or null")
        if obj.mpp is not None and (not _is_number(obj.mpp) or obj.mpp <= 0):
            bad("mpp", "a positive number or null")


SLIDE_EXTENSIONS = (".svs", ".ndpi", ".tif", ".tiff", ".mrxs", ".scn", ".vms", ".vmu", ".bif", ".svslide", ".qptiff")


def scan_slides(slides: str | Path) -> tuple[dict[str, Path], list[tuple[Path, str]]]:
    """Slides under ``slides`` (a folder, not recursive, or one file) by slide id, and the
    entries with a slide extension that cannot be slides (a dangling link, a folder named
    ``x.svs``) with the reason, so a workflow can report and skip them.

    Raises:
        ConfigError: the path does not exist, or two files have the same slide id.
    """
    from .read import slide_id

    root = Path(slides)
    if not root.exists() and not root.is_symlink():
        raise ConfigError(f"{root}: slides path does not exist")
    entries = [root] if not root.is_dir() else sorted(p for p in root.iterdir() if p.suffix.lower() in SLIDE_EXTENSIONS)
    found: dict[str, Path] = {}
    skipped: list[tuple[Path, str]] = []
    for f in entries:
        if f.is_symlink() and not f.exists():
            skipped.append((f, f"dangling link to {os.readlink(f)}"))
            continue
        if not f.is_file():
            skipped.append((f, "not a file (a folder named like a slide?)"))
            continue
        sid = slide_id(f)
        if sid in found:
            raise ConfigError(f"{root}: two slides share the id {sid!r}: {found[sid].name} and {f.name}")
        found[sid] = f
    return found, skipped


def find_slides(slides: str | Path) -> dict[str, Path]:
    """The readable-looking slides of :func:`scan_slides`.

    Raises:
        ConfigError: no slides found, or two files with the same slide id.
    """
    found, _ = scan_slides(slides)
    if not found:
        raise ConfigError(f"{slides}: no slides found (looked for {', '.join(SLIDE_EXTENSIONS)})")
    return found


def config_from_dict(
    data: dict, source: str = "<dict>", base: Path | None = None, need_slides: bool = True
) -> PipelineConfig:
    """Validate a config mapping (what :func:`load_config` does after reading the YAML).

    Relative paths are resolved against ``base`` (default: the working directory). With
    ``need_slides=False`` (the per-slide commands, which name their slide) the ``slides`` path
    need not exist.

    Raises:
        ConfigError: unknown keys, wrong types, a missing slides path or mpp CSV.
    """
    base = Path.cwd() if base is None else Path(base)
    cfg = _build(PipelineConfig, data, "", source)

    def resolve(p: Optional[str]) -> Optional[str]:
        return None if p is None else str(p if Path(p).is_absolute() else (base / p))

    cfg = dataclasses.replace(cfg, slides=resolve(cfg.slides), out=resolve(cfg.out), mpp_csv=resolve(cfg.mpp_csv))
    for name in ("classify", "segment"):
        spec = getattr(cfg, name)
        if spec is not None and is_checkpoint_path(spec.model):
            cfg = dataclasses.replace(cfg, **{name: dataclasses.replace(spec, model=resolve(spec.model))})
    if need_slides and not Path(cfg.slides).exists():
        raise ConfigError(f"{source}: slides path {cfg.slides} does not exist")
    if cfg.mpp_csv is not None and not Path(cfg.mpp_csv).is_file():
        raise ConfigError(f"{source}: mpp_csv {cfg.mpp_csv} does not exist")
    if cfg.classify is None and cfg.segment is None:
        raise ConfigError(f"{source}: nothing to do: set classify and/or segment")
    return cfg


def config_to_dict(cfg: PipelineConfig) -> dict:
    """The plain mapping of a config (round-trips through :func:`config_from_dict`)."""
    out = dataclasses.asdict(cfg)
    for task in ("classify", "segment"):
        if isinstance(out.get(task), dict):
            out[task].pop("from_preset", None)
    return out


MAX_YAML_NODES = 100_000


def load_yaml(path: str | Path) -> Any:
    """``yaml.safe_load`` of a config file, refusing documents that expand to more than
    :data:`MAX_YAML_NODES` values (a few aliases nested in each other, the "billion laughs",
    load instantly but expand exponentially when the config is copied or written).

    Raises:
        ConfigError: missing file, invalid YAML, or too large once aliases are expanded.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path}: not valid YAML: {' '.join(str(err).split())}") from None
    stack, seen = [data], 0
    while stack:
        node = stack.pop()
        seen += 1
        if seen > MAX_YAML_NODES:
            raise ConfigError(f"{path}: more than {MAX_YAML_NODES} values once YAML aliases are expanded; refusing to expand it")
        if isinstance(node, dict):
            stack.extend(node.keys())
            stack.extend(node.values())
        elif isinstance(node, (list, tuple)):
            stack.extend(node)
    return data


def load_config(
    path: str | Path | None = None,
    overrides: Optional[dict] = None,
    override_source: str = "command line",
    need_slides: bool = True,
) -> PipelineConfig:
    """Read and validate a YAML config; ``overrides`` (e.g. Snakemake's ``--config``) win.

    Relative paths (``slides``, ``out``, ``mpp_csv``, checkpoint paths) are resolved against
    the repository root when the file lives in ``configs/``, else against the file's folder;
    relative paths in ``overrides`` against the working directory. A bad override is blamed on
    ``override_source`` (e.g. ``"--mpp"``), not on the file.

    Raises:
        ConfigError: unknown keys, wrong types, a missing slides path or mpp CSV.
    """
    data: dict = {}
    source = "<defaults>"
    base = Path.cwd()
    if path is not None:
        path = Path(path)
        source = str(path)
        data = load_yaml(path) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: a config must be a mapping of keys to values")
        base = path.resolve().parent
        if base.name == "configs":
            base = base.parent
    overrides = dict(overrides or {})
    if overrides:
        _build(PipelineConfig, overrides, "", override_source)  # each override checked on its own first
    for key in ("slides", "out", "mpp_csv"):  # paths given on a command line are relative to where it runs
        if isinstance(overrides.get(key), str) and not Path(overrides[key]).is_absolute():
            overrides[key] = str(Path.cwd() / overrides[key])
    return config_from_dict({**data, **overrides}, source, base, need_slides)
