"""Models for the pipeline: build from a registry name, or load a checkpoint safely.

A checkpoint is a plain dict of tensors and primitives written by :func:`save_checkpoint` and
read back with ``torch.load(..., weights_only=True)``: no code from a file is ever executed.

Example:
    >>> from pipeline.config import ModelSpec
    >>> loaded = load_model(ModelSpec(model="gmr_resnet18", model_kwargs={"base_channels": 8}))
    >>> loaded.name, loaded.trained
    ('gmr_resnet18', False)
"""

from __future__ import annotations

import hashlib
import math
import pickle
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from gmr_models import create_model

from .config import ModelSpec, invariance_multiple, is_checkpoint_path
from .outputs import atomic_path

__all__ = ["ModelError", "LoadedModel", "load_model", "save_checkpoint", "set_postprocess", "state_mismatch", "CHECKPOINT_FORMAT"]

CHECKPOINT_FORMAT = "gmrpath-checkpoint-v1"
MAX_PARAMETERS = 500_000_000  # 2 GB of float32 weights: far above any network here, far below a machine's memory
DEFAULT_MEAN = (0.5, 0.5, 0.5)
DEFAULT_STD = (0.5, 0.5, 0.5)


class ModelError(ValueError):
    """A model name or checkpoint cannot be used; the message names it."""


@dataclass
class LoadedModel:
    """A ready model with what the pipeline needs to feed it and to report it."""

    module: nn.Module
    name: str
    checksum: str
    trained: bool
    mean: tuple
    std: tuple
    spec: ModelSpec
    meta: dict = field(default_factory=dict)
    adopted: list = field(default_factory=list)  # settings taken from the checkpoint instead of the preset


def _state_checksum(module: nn.Module) -> str:
    h = hashlib.sha256()
    for key, tensor in sorted(module.state_dict().items()):
        h.update(key.encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def _out_kwargs(spec: ModelSpec) -> dict:
    return {"out_channels": len(spec.classes)} if spec.task == "segment" else {"num_classes": len(spec.classes)}


def _sized_model(name: str, kwargs: dict, where: str, state: dict | None = None) -> nn.Module:
    """``create_model(name, **kwargs)``, after building it on the meta device (no memory) to refuse
    a network of more than :data:`MAX_PARAMETERS` parameters, or one ``state`` does not fit,
    before anything is allocated."""
    with torch.device("meta"):
        shell = create_model(name, **kwargs)
    n = sum(p.numel() for p in shell.parameters())
    if n > MAX_PARAMETERS:
        raise ModelError(f"{where}: {name} with {kwargs} would have {n:,} parameters (limit {MAX_PARAMETERS:,}); "
                         "check the model arguments")
    if state is not None:
        mismatch = state_mismatch(shell, state)
        if mismatch:
            raise ModelError(f"{where}: checkpoint does not fit model {name!r}: {mismatch}")
    return create_model(name, **kwargs)


def load_model(spec: ModelSpec, check: bool = True) -> LoadedModel:
    """Build ``spec.model`` (a registry name: seeded random weights) or load it (a checkpoint path).

    With ``check`` (the pipeline's case) a checkpoint must have been trained for the spec's
    task, classes and mpp (and, for tile classifiers, tile size); ``check=False`` takes the
    checkpoint's own (evaluation).

    Raises:
        ModelError: unknown name, missing or unreadable checkpoint, or a checkpoint that
            disagrees with the spec (the message says in what).
    """
    if is_checkpoint_path(spec.model):
        return _load_checkpoint(Path(spec.model), spec, check)
    torch.manual_seed(spec.seed)
    try:
        module = _sized_model(spec.model, {**_out_kwargs(spec), **spec.model_kwargs}, f"model {spec.model!r}")
    except ModelError:
        raise
    except (ValueError, TypeError) as err:
        raise ModelError(f"model {spec.model!r}: {err}") from None
    module.eval()
    return LoadedModel(module, spec.model, _state_checksum(module), False, DEFAULT_MEAN, DEFAULT_STD, spec)


def _check_fits(path: Path, ckpt: dict, spec: ModelSpec) -> None:
    task = ckpt.get("meta", {}).get("task")
    if task is not None and task != spec.task:
        raise ModelError(f"{path}: a {task} checkpoint cannot be used to {spec.task}")
    classes, mpp, tile_px = list(ckpt.get("classes", [])), float(ckpt.get("mpp", spec.mpp)), int(ckpt.get("tile_px", spec.tile_px))
    mine = set(spec.from_preset)  # preset values the user did not set: the checkpoint's own win
    diffs = []
    if classes and classes != list(spec.classes) and "classes" not in mine:
        diffs.append(f"classes {classes} (config: {list(spec.classes)})")
    if abs(mpp - spec.mpp) > 1e-6 * spec.mpp and "mpp" not in mine:
        diffs.append(f"mpp {mpp:g} (config: {spec.mpp:g})")
    if spec.task == "classify" and tile_px != spec.tile_px and "tile_px" not in mine:
        diffs.append(f"tile_px {tile_px} (config: {spec.tile_px})")
    if diffs:
        raise ModelError(f"{path}: the checkpoint was trained with {'; '.join(diffs)}: set the same in the config's "
                         f"{spec.task} section, or use a checkpoint made for it")
    n_out = ckpt.get("model_kwargs", {}).get("num_classes")
    if spec.task == "classify" and n_out is not None and n_out != len(classes or spec.classes):
        raise ModelError(f"{path}: the checkpoint's head has {n_out} outputs but names {len(classes)} classes")


def _first_line(text: str) -> str:
    return next((line.strip() for line in text.splitlines() if line.strip()), text)


def _check_metadata(path: Path, ckpt: dict) -> None:
    """The checkpoint's own fields, checked like a config's (one line naming the file and the field)."""
    def bad(name: str, want: str) -> None:
        raise ModelError(f"{path}: checkpoint field {name} must be {want}, got {ckpt.get(name)!r}")

    if not isinstance(ckpt.get("model"), str):
        bad("model", "a registry name")
    if not isinstance(ckpt.get("model_kwargs", {}), dict):
        bad("model_kwargs", "a mapping")
    if not isinstance(ckpt.get("state_dict"), dict):
        bad("state_dict", "a mapping of tensors")
    tile = ckpt.get("tile_px", 1)
    if isinstance(tile, bool) or not isinstance(tile, int) or not 1 <= tile <= 65536:
        bad("tile_px", "a positive int up to 65536 (classifiers: their tile; segmenters: the training crop)")
    mpp = ckpt.get("mpp", 1.0)
    if isinstance(mpp, bool) or not isinstance(mpp, (int, float)) or not math.isfinite(mpp) or mpp <= 0:
        bad("mpp", "a positive number")
    classes = ckpt.get("classes", ["x"])
    if not isinstance(classes, list) or not all(isinstance(c, str) and c for c in classes) or len(set(classes)) != len(classes):
        bad("classes", "a list of distinct names")
    for name in ("mean", "std"):
        v = ckpt.get(name, [1.0, 1.0, 1.0])
        if not isinstance(v, (list, tuple)) or len(v) != 3 or not all(isinstance(x, (int, float)) and math.isfinite(x) for x in v):
            bad(name, "three finite numbers")
        if name == "std" and any(x <= 0 for x in v):
            bad(name, "three positive numbers")


def state_mismatch(module: torch.nn.Module, state: dict) -> str:
    """"" when ``state`` fits ``module``, else one line: how many tensors differ, and the first."""
    own = module.state_dict()
    missing = [k for k in own if k not in state]
    extra = [k for k in state if k not in own]
    def shape(t) -> tuple:
        return tuple(t.shape) if isinstance(t, torch.Tensor) else ("not a tensor",)

    shapes = [(k, shape(state[k]), tuple(v.shape)) for k, v in own.items() if k in state and shape(state[k]) != tuple(v.shape)]
    parts = []
    if shapes:
        k, got, want = shapes[0]
        parts.append(f"{len(shapes)} tensor(s) of another shape (first: {k} is {list(got)}, the model needs {list(want)})")
    if missing:
        parts.append(f"{len(missing)} missing (first: {missing[0]})")
    if extra:
        parts.append(f"{len(extra)} unexpected (first: {extra[0]})")
    return "; ".join(parts)


def _read_checkpoint(path: Path) -> dict:
    """A GMR-Path checkpoint's dict, read with ``weights_only=True``; :class:`ModelError` naming the file otherwise."""
    if not path.is_file():
        raise ModelError(f"{path}: model checkpoint not found")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        import re

        text = str(err)
        found = re.search(r"GLOBAL ([\w.]+)", text)
        if found or re.search(r"Unsupported (global|class)", text):  # the weights-only unpickler met a class or function
            what = f" ({found.group(1)})" if found else ""
            raise ModelError(f"{path}: refused: the file carries Python code or objects{what}, not only weights; "
                             "GMR-Path never runs code from a checkpoint") from None
        reason = text.split("WeightsUnpickler error:", 1)[-1]  # e.g. "Unsupported operand 123": bytes of another kind
        raise ModelError(f"{path}: not a checkpoint (a pickle reader fails on it: {_first_line(reason)})") from None
    except Exception as err:  # noqa: BLE001 - corrupt or truncated files
        raise ModelError(f"{path}: not a checkpoint, or a damaged one ({type(err).__name__}: {_first_line(str(err))})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise ModelError(f"{path}: not a GMR-Path checkpoint (expected a dict with format={CHECKPOINT_FORMAT!r})")
    _check_metadata(path, ckpt)
    return ckpt


def _load_checkpoint(path: Path, spec: ModelSpec, check: bool = True) -> LoadedModel:
    ckpt = _read_checkpoint(path)
    if check:
        _check_fits(path, ckpt, spec)
    classes = list(ckpt.get("classes", spec.classes))
    bad = next((k for k, t in ckpt["state_dict"].items()
                if isinstance(t, torch.Tensor) and t.is_floating_point() and not bool(torch.isfinite(t).all())), None)
    if bad is not None:
        raise ModelError(f"{path}: the weights hold NaN or infinite values (first: {bad}); the training that wrote them diverged")
    try:
        module = _sized_model(ckpt["model"], ckpt.get("model_kwargs", {}), str(path), ckpt["state_dict"])
    except ModelError:
        raise
    except (KeyError, ValueError, TypeError, RuntimeError) as err:
        raise ModelError(f"{path}: cannot build model {ckpt.get('model')!r}: {_first_line(str(err))}") from None
    module.load_state_dict(ckpt["state_dict"])
    multiple = invariance_multiple(module)
    tile = int(ckpt.get("tile_px", spec.tile_px))
    if spec.task == "classify" and multiple and tile % multiple:
        raise ModelError(f"{path}: tile_px {tile} is not a multiple of {multiple}: {ckpt['model']} would lose its exact "
                         "invariance to 90-degree rotations and flips")
    module.eval()
    digest = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    own = ModelSpec(
        task=spec.task, model=str(path), model_kwargs=dict(ckpt.get("model_kwargs", {})), classes=classes,
        tile_px=int(ckpt.get("tile_px", spec.tile_px)), mpp=float(ckpt.get("mpp", spec.mpp)),
        stride_px=spec.stride_px, overlap_px=spec.overlap_px, seed=spec.seed, stain_norm=spec.stain_norm,
    )
    stain = dict(ckpt.get("meta", {})).get("stain_norm")
    if stain:
        from .stain import check_stain_target

        try:
            check_stain_target(stain)
        except ValueError as err:
            raise ModelError(f"{path}: {err}") from None
    adopted = [f"{k} {getattr(own, k)}" for k in spec.from_preset if getattr(own, k) != getattr(spec, k)]
    return LoadedModel(
        module, ckpt["model"], digest, True, tuple(ckpt.get("mean", DEFAULT_MEAN)), tuple(ckpt.get("std", DEFAULT_STD)), own,
        dict(ckpt.get("meta", {})), adopted,
    )


def save_checkpoint(module: nn.Module, path: str | Path, model: str, model_kwargs: dict, classes: list, tile_px: int,
                    mpp: float, mean=DEFAULT_MEAN, std=DEFAULT_STD, meta: dict | None = None) -> Path:
    """Write a checkpoint :func:`load_model` reads (atomically: temporary file, then rename).

    ``meta`` (plain JSON-like values) carries what training knows: task, post-processing
    thresholds, dataset digest, code version, validation scores.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "format": CHECKPOINT_FORMAT, "model": model, "model_kwargs": dict(model_kwargs), "classes": list(classes),
        "tile_px": int(tile_px), "mpp": float(mpp), "mean": list(mean), "std": list(std),
        "meta": dict(meta or {}), "state_dict": module.state_dict(),
    }
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)
    return path


def set_postprocess(path: str | Path, rule: dict, out: str | Path | None = None, note: str = "") -> dict:
    """Store a nuclei checkpoint's post-processing rule; its weights and the rest stay as they are.

    The new rule (fields of :class:`pipeline.instances.PostProcess`, merged over the stored
    ones) is validated first; ``meta.postprocess_history`` records the old rule, the new one and
    ``note`` (the validation scores in ``meta.val_metrics`` were computed under the old rule).
    Written atomically to ``out`` (default: in place). Returns the new rule.

    Example::

        set_postprocess("best.pt", {"marker_h": 0.15}, note="chosen out of fold")

    Raises:
        ModelError: not a readable nuclei checkpoint.
        ValueError: a bad rule.
    """
    from .instances import PostProcess, postprocess_from

    path = Path(path)
    ckpt = _read_checkpoint(path)
    meta = dict(ckpt.get("meta", {}))
    if meta.get("task") != "segment":
        raise ModelError(f"{path}: a {meta.get('task')} checkpoint has no post-processing (nuclei models only)")
    old = PostProcess(**meta.get("postprocess", {})).to_dict()
    new = postprocess_from(rule, old).to_dict()
    meta["postprocess_history"] = list(meta.get("postprocess_history", [])) + [{"from": old, "to": new, "note": note}]
    meta["postprocess"] = new
    ckpt["meta"] = meta
    target = Path(out) if out is not None else path
    target.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(target) as tmp:
        torch.save(ckpt, tmp)
    return new
