"""The training loop: one function, ``train(cfg)``, for nuclei U-Nets and tile classifiers.

Modelled on torchvision's classification reference: DistributedDataParallel when launched
by ``torchrun`` (NCCL on CUDA, gloo on CPU), autocast on CUDA, channels-last, a cosine
schedule with linear warm-up stepped per iteration, and after every epoch a validation, a
line in ``metrics.csv`` / ``metrics.json``, ``last.pt`` (the whole training state, for
``--resume``) and, when the selected validation score improves, ``best.pt`` (the inference
checkpoint ``gmrpath predict/segment --model`` read). Every file is written to a temporary
name and renamed. Crops and augmentation depend on the seed, the epoch and the sample index
only, so a resumed run continues exactly where an uninterrupted one would be.

Example::

    from training.config import load_train_config
    from training.loop import train
    summary = train(load_train_config("configs/train_nuclei_gmr.yaml"))
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F
import yaml

from gmr_models import create_model, freeze_kernels
from pipeline.instances import PostProcess
from pipeline.models import save_checkpoint, state_mismatch

from .augment import build_augment
from .config import TrainConfig, config_dict
from .datasets import LoadedData, load_dataset
from .protocol import MEAN, STD, TUNE_FG, TUNE_H, evaluate_nuclei_image, tune_postprocess, upright_stain_stats
from .records import atomic_save, code_version, write_rows
from .samples import NucleiCrops
from .tilesets import batches as _batches, tile_sets

__all__ = ["train", "TRAIN_STATE_FORMAT", "segment_loss", "loss_warning"]

TRAIN_STATE_FORMAT = "gmrpath-train-state-v1"


def _distributed() -> tuple[int, int, int]:
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1:
        return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0))
    return 0, 1, 0


def _device(name: str, local_rank: int) -> torch.device:
    from pipeline.runtime import resolve_device

    dev = resolve_device(name)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", local_rank)
    return dev


def _autocast(device: torch.device, amp: bool, cpu_bf16: bool = False):
    """Mixed precision: bf16 (else fp16) autocast on CUDA with ``amp``; bf16 on the CPU only with ``cpu_bf16``
    (faster only on processors with bf16 instructions: ``gmrpath benchmark train`` tells)."""
    if amp and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16)
    if cpu_bf16 and device.type == "cpu":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return torch.autocast(device.type, enabled=False)


def segment_loss(logits: torch.Tensor, target: torch.Tensor, separation_weight: float = 0.0) -> torch.Tensor:
    """Foreground BCE + soft Dice, plus MSE of the sigmoid distance map; with
    ``separation_weight``, plus that weight times the distance error averaged over the foreground
    dilated by 2 px only (about a fifth of the pixels, where touching nuclei are told apart).
    Pixels whose distance target is negative (binary-mask images: unknown) are left out of both
    distance terms, which are averaged over the pixels that have one.

    Shape:
        logits ``(N, 2, H, W)``, target ``(N, 2, H, W)`` (foreground, distance or -1) -> scalar.
    """
    fg_logit, fg = logits[:, 0].float(), target[:, 0]
    bce = F.binary_cross_entropy_with_logits(fg_logit, fg)
    p = fg_logit.sigmoid()
    soft_dice = 1 - (2 * (p * fg).sum() + 1) / (p.sum() + fg.sum() + 1)
    known = (target[:, 1] >= 0).float()
    err = (logits[:, 1].float().sigmoid() - target[:, 1].clamp_min(0)).square() * known
    loss = bce + soft_dice + 2.0 * err.sum() / known.sum().clamp_min(1.0)
    if separation_weight:
        near = F.max_pool2d((fg > 0).float()[:, None], 5, stride=1, padding=2)[:, 0] * known
        loss = loss + separation_weight * (err * near).sum() / near.sum().clamp_min(1.0)
    return loss


def loss_warning(row: dict) -> str:
    """A line when an epoch's validation loss is over 100x its training loss (else ""): batch-norm
    statistics, a mismatch between the splits, or divergence; worth a look before trusting the run."""
    if row.get("val_loss", 0.0) > 100 * max(row["train_loss"], 1e-12):
        return (f"warning: epoch {row['epoch']}: validation loss {row['val_loss']:.4g} is over 100x the training loss "
                f"{row['train_loss']:.4g}: batch-norm statistics, a data mismatch between the splits, or divergence")
    return ""


def _stain_normalise(data: LoadedData, cfg: TrainConfig, log) -> LoadedData:
    """The training images mapped onto the reference's stains, each by its own stats as inference maps
    a slide (validation images are mapped when scored, on the segment path); the target goes with them."""
    import dataclasses

    from pipeline.stain import fit_stain_target, stain_stats, stain_transfer, typical_stats

    method, reference = cfg.stain_norm["method"], cfg.stain_norm["reference"]
    stats = {}
    for s in data.train:  # each image's stats, measured once: they choose an ``auto`` reference and map the image
        try:
            stats[s.name] = stain_stats(method, s.image)
        except ValueError as err:
            raise ValueError(f"{s.name}: {err}") from None
    target = typical_stats(stats) if reference == "auto" else fit_stain_target(method, reference)
    train = [dataclasses.replace(s, image=stain_transfer(s.image, stats[s.name], target)) for s in data.train]
    log(f"stain normalisation: {len(train)} training images mapped onto {target['reference']} ({target['method']})")
    return dataclasses.replace(data, train=train, stain_target=target)


def fixed_postprocess(cfg: TrainConfig) -> PostProcess:
    """The post-processing a run validates with and stores: the config's mapping, else the default."""
    return PostProcess(**cfg.postprocess) if isinstance(cfg.postprocess, dict) else PostProcess()


def _validate_segment(module, data: LoadedData, cfg: TrainConfig, device) -> dict:
    from .metrics import segmentation_scores

    freeze_kernels(module.eval())
    post = fixed_postprocess(cfg)
    rows = []
    for s in data.val:  # the fixed rule here (tune: the default, tuned once at the end of the run)
        source = upright_stain_stats(s, data.stain_target, cfg.mpp)  # once per image, for every angle
        labels, valid = evaluate_nuclei_image(module, s, cfg.mpp, device, post, 0.0, cfg.amp, stain_target=data.stain_target,
                                              stain_source=source)
        rows.append(segmentation_scores(s.native_labels, labels))
        for angle in cfg.val_angles:
            rot, valid = evaluate_nuclei_image(module, s, cfg.mpp, device, post, float(angle), cfg.amp,
                                               stain_target=data.stain_target, stain_source=source)
            sc = segmentation_scores(s.native_labels, rot, valid)
            rows[-1].update({f"dice_{angle:g}": sc["dice"], f"aji_{angle:g}": sc["aji"]})
    return {f"val_{k}": float(np.mean([r[k] for r in rows])) for k in rows[0]} if rows else {}


def _validate_classify(module, loader, device, n_classes: int, amp: bool, bad: list, channels_last: bool = True) -> dict:
    from .metrics import classification_scores

    freeze_kernels(module.eval())
    probs, labels, loss = [], [], 0.0
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    with torch.no_grad(), _autocast(device, amp):
        for x, y in _batches(loader, bad):
            logits = module(x.to(device).contiguous(memory_format=fmt)).float()
            loss += float(F.cross_entropy(logits, y.to(device), reduction="sum"))
            probs.append(logits.softmax(1).cpu().numpy())
            labels.append(y.numpy())
    if not probs:
        return {}
    probs, labels = np.concatenate(probs), np.concatenate(labels)
    return {"val_loss": loss / len(labels), **{f"val_{k}": v for k, v in classification_scores(probs, labels, n_classes).items()}}


def _init_weights(module: torch.nn.Module, cfg: TrainConfig, log: Callable[[str], None]) -> None:
    """Load ``cfg.init``'s weights into ``module`` (fine-tuning).

    Raises:
        ValueError: the checkpoint is unreadable, made for another task, or does not fit the model.
    """
    from pipeline.config import ModelSpec
    from pipeline.models import ModelError, load_model

    try:
        loaded = load_model(ModelSpec(task=cfg.task, model=cfg.init, classes=["x"]), check=False)
    except ModelError as err:
        raise ValueError(f"init: {err}") from None
    if loaded.meta.get("task", cfg.task) != cfg.task:
        raise ValueError(f"init: {cfg.init}: a {loaded.meta.get('task')} checkpoint cannot start a {cfg.task} run")
    state = loaded.module.state_dict()
    mismatch = state_mismatch(module, state)
    if mismatch:
        raise ValueError(f"init: {cfg.init} does not fit {cfg.model} with model_kwargs {cfg.model_kwargs}: {mismatch}")
    module.load_state_dict(state)
    log(f"init: weights from {cfg.init} (checksum {loaded.checksum})")


def _config_changes(stored: dict, current: dict, prefix: str = "") -> list[str]:
    """Keys whose values differ (keys newer code added, absent from ``stored``, are ignored)."""
    out = []
    for key, old in stored.items():
        new = current.get(key, old)
        if isinstance(old, dict) and isinstance(new, dict):
            out += _config_changes(old, new, f"{prefix}{key}.")
        elif old != new and key not in ("epochs", "num_workers", "device"):
            out.append(f"{prefix}{key}: {old!r} -> {new!r}")
    return out


def _write_skipped(out: Path, bad: list[str], log) -> None:
    """List the tiles ``skip_bad`` dropped (``skipped.txt``), and say so once per new one."""
    path = out / "skipped.txt"
    known = set(path.read_text().splitlines()) if path.is_file() else set()
    new = [b for b in bad if b not in known]
    for line in new:
        log(f"skipped: {line}")
    if new:
        tmp = path.with_name(".skipped.txt.tmp")
        tmp.write_text("\n".join(sorted(known | set(new))) + "\n")
        tmp.replace(path)


def _write_metrics(out: Path, history: list[dict]) -> None:
    write_rows(history, out / "metrics.csv")


def _schedule(optimizer, cfg: TrainConfig, steps_per_epoch: int):
    total = cfg.epochs * steps_per_epoch
    warm = max(1, int(cfg.optim.warmup_epochs * steps_per_epoch)) if cfg.optim.warmup_epochs > 0 else 0

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warm) / max(1, total - warm))))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def train(cfg: TrainConfig, resume: bool = False, skip_bad: bool = False,
          log: Callable[[str], None] = print, progress: Optional[Callable[[int, int, dict], None]] = None) -> dict:
    """Train ``cfg.model`` on ``cfg.data``; returns the run summary (also ``summary.json``).

    Raises:
        DataError: a bad dataset file (unless ``skip_bad``).
        ValueError: ``resume`` without a ``last.pt`` from the same config.
    """
    rank, world, local_rank = _distributed()
    device = _device(cfg.device, local_rank)
    if world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    out = Path(cfg.out)
    quiet = log if rank == 0 else (lambda _: None)
    data = load_dataset(cfg.data, cfg.task, cfg.mpp, cfg.tile_px, skip_bad) if cfg.task == "segment" else \
        tile_sets(cfg.data, cfg.mpp, cfg.tile_px, skip_bad, log=quiet)
    if cfg.task == "segment" and cfg.stain_norm:
        data = _stain_normalise(data, cfg, quiet)
    out.mkdir(parents=True, exist_ok=True)  # after the data: a run that cannot start leaves no folder
    for line in data.skipped:
        quiet(f"skipped: {line}")
    what = "images" if cfg.task == "segment" else "tiles"
    quiet(f"data: {len(data.train)} train / {len(data.val) if data.val else 0} val {what}, classes {data.classes}, digest {data.digest}")
    if not data.train:
        raise ValueError(f"{cfg.data.root}: the split leaves no training images")
    out_key = "out_channels" if cfg.task == "segment" else "num_classes"
    n_out = 2 if cfg.task == "segment" else len(data.classes)
    model_kwargs = {**cfg.model_kwargs, out_key: n_out}
    torch.manual_seed(cfg.seed)
    fmt = torch.channels_last if cfg.channels_last else torch.contiguous_format
    module = create_model(cfg.model, **model_kwargs).to(device).to(memory_format=fmt)
    augment = build_augment(cfg.augment)
    bad: list[str] = []  # tiles found unreadable mid-run (skip_bad)
    if cfg.task == "segment":
        train_set = NucleiCrops(data.train, cfg.tile_px, cfg.samples_per_epoch, augment, cfg.seed, MEAN, STD,
                                cfg.targets == "aligned")
    else:
        train_set = data.train.view(augment, cfg.seed, MEAN, STD)
        val_loader = torch.utils.data.DataLoader(data.val.view(None, cfg.seed, MEAN, STD), batch_size=cfg.batch_size,
                                                 num_workers=cfg.num_workers, pin_memory=device.type == "cuda") if data.val else None
    sampler = torch.utils.data.DistributedSampler(train_set, world, rank, shuffle=True, seed=cfg.seed) if world > 1 else None
    loader = torch.utils.data.DataLoader(
        train_set, batch_size=cfg.batch_size, sampler=sampler, shuffle=sampler is None and cfg.task == "classify",
        num_workers=cfg.num_workers, drop_last=len(train_set) >= cfg.batch_size * world, pin_memory=device.type == "cuda",
        persistent_workers=False, generator=torch.Generator().manual_seed(cfg.seed))
    if cfg.optim.name == "sgd":
        optimizer = torch.optim.SGD(module.parameters(), lr=cfg.optim.lr, momentum=0.9, nesterov=True, weight_decay=cfg.optim.weight_decay)
    else:
        optimizer = torch.optim.AdamW(module.parameters(), lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay)
    steps_per_epoch = max(1, len(loader))
    scheduler = _schedule(optimizer, cfg, steps_per_epoch)
    use_fp16 = cfg.amp and device.type == "cuda" and not torch.cuda.is_bf16_supported()
    scaler = torch.amp.GradScaler("cuda", enabled=use_fp16)
    net = torch.nn.parallel.DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None) if world > 1 else module
    if cfg.compile:
        net = torch.compile(net)

    start_epoch, history, best, best_epoch = 0, [], -math.inf, -1
    state_path = out / "last.pt"
    if cfg.init and not resume:
        _init_weights(module, cfg, log if rank == 0 else (lambda _: None))
    if resume:
        if not state_path.is_file():
            raise ValueError(f"{state_path}: nothing to resume (no last.pt in {out})")
        try:
            state = torch.load(state_path, map_location=device, weights_only=True)
        except Exception as err:  # noqa: BLE001 - truncated, corrupt, or carrying code (refused by weights_only)
            why = "it carries Python code or objects (refused)" if "GLOBAL" in str(err) else f"{type(err).__name__}"
            raise ValueError(f"{state_path}: cannot resume from it: not a readable training state ({why}); "
                             "start again without --resume, or restore it") from None
        if not isinstance(state, dict) or state.get("format") != TRAIN_STATE_FORMAT:
            raise ValueError(f"{state_path}: not a GMR-Path training state")
        changed = _config_changes(state.get("config", {}), json.loads(json.dumps(config_dict(cfg))))
        if changed:
            raise ValueError(f"{state_path}: was written with a different training config ({changed[0]}); resume needs the same one")
        module.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start_epoch, history, best, best_epoch = state["epoch"] + 1, list(state["history"]), state["best"], state["best_epoch"]
        if rank == 0:
            log(f"resumed from {state_path} after epoch {state['epoch'] + 1}")
    if rank == 0:
        (out / "config.yaml").write_text(yaml.safe_dump(config_dict(cfg), sort_keys=False))

    loss_fn = (lambda out, y: segment_loss(out, y, cfg.separation_weight)) if cfg.task == "segment" else F.cross_entropy
    for epoch in range(start_epoch, cfg.epochs):
        t0 = time.perf_counter()
        train_set.set_epoch(epoch)
        if sampler is not None:
            sampler.set_epoch(epoch)
        elif cfg.task == "classify":
            loader.generator.manual_seed(cfg.seed * 1000 + epoch)
        net.train()
        total, count, lr_used = 0.0, 0, optimizer.param_groups[0]["lr"]
        for step, (x, y) in enumerate(_batches(loader, bad)):
            x = x.to(device, non_blocking=True).contiguous(memory_format=fmt)
            y = y.to(device, non_blocking=True)
            with _autocast(device, cfg.amp, cfg.cpu_bf16):
                loss = loss_fn(net(x).float(), y)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            lr_used = optimizer.param_groups[0]["lr"]  # the rate this step ran with (the schedule moves it after)
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            total, count = total + float(loss.detach()) * len(x), count + len(x)
            if progress is not None and rank == 0:
                progress(step + 1, steps_per_epoch, {"epoch": epoch + 1, "loss": total / count})
        row = {"epoch": epoch + 1, "lr": lr_used, "train_loss": total / max(count, 1)}
        if world > 1:
            t = torch.tensor([total, count], dtype=torch.float64, device=device)
            torch.distributed.all_reduce(t)
            row["train_loss"] = float(t[0] / t[1])
        if rank == 0:
            row["train_s"] = round(time.perf_counter() - t0, 1)
            if data.val and ((epoch + 1) % cfg.val_every == 0 or epoch + 1 == cfg.epochs):
                row.update(_validate_segment(module, data, cfg, device) if cfg.task == "segment"
                           else _validate_classify(module, val_loader, device, len(data.classes), cfg.amp, bad, cfg.channels_last))
            if bad:
                _write_skipped(out, bad, log)
            row["epoch_s"] = round(time.perf_counter() - t0, 1)
            warning = loss_warning(row)
            if warning:
                log(warning)
            history.append(row)
            score = epoch if cfg.select == "last" else row.get(cfg.select, -row["train_loss"])
            if score > best:
                best, best_epoch = score, epoch + 1
                _save_inference(module, cfg, data, model_kwargs, out / "best.pt", epoch + 1, row)
            atomic_save({"format": TRAIN_STATE_FORMAT, "epoch": epoch, "model": module.state_dict(),
                          "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "history": history,
                          "best": best, "best_epoch": best_epoch, "config": json.loads(json.dumps(config_dict(cfg)))}, state_path)
            _write_metrics(out, history)
            log(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))
        if world > 1:
            torch.distributed.barrier()
    chosen = "the last epoch (no selection)" if cfg.select == "last" else f"the epoch with the highest {cfg.select}"
    summary = {"out": str(out), "epochs": cfg.epochs, "best_epoch": best_epoch,
               "best": str(out / "best.pt"), "last": str(state_path), "digest": data.digest,
               "note": f"best.pt is {chosen}; per-epoch validation scores use the post-processing "
                       f"{fixed_postprocess(cfg).to_dict()}" + ("; postprocess.val_aji_tuned is the validation AJI after "
                                                              "tuning the thresholds on the same images" if cfg.postprocess == "tune"
                                                              and cfg.task == "segment" else "")}
    if cfg.select != "last":
        summary[f"{cfg.select}_at_best_epoch"] = best
    if rank == 0 and cfg.task == "segment" and data.val and cfg.postprocess == "tune" and (out / "best.pt").is_file():
        summary["postprocess"] = _tune_best(out / "best.pt", data, cfg, device, log)
    if rank == 0:
        (out / "summary.json").write_text(json.dumps(summary, indent=1))
    if world > 1:
        torch.distributed.destroy_process_group()
    return summary


def _tune_best(path: Path, data: LoadedData, cfg: TrainConfig, device, log) -> dict:
    """Tune the post-processing of ``best.pt`` on the validation images and store it there."""
    from pipeline.models import CHECKPOINT_FORMAT

    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if ckpt.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path}: not a GMR-Path checkpoint")
    module = create_model(ckpt["model"], **ckpt["model_kwargs"])
    module.load_state_dict(ckpt["state_dict"])
    module.to(device).to(memory_format=torch.channels_last)
    log(f"tuning post-processing on {len(data.val)} validation images ({len(TUNE_FG) * len(TUNE_H)} settings)")
    step = max(1, (len(data.val) + len(TUNE_FG) * len(TUNE_H)) // 6)
    post, rows = tune_postprocess(module, data.val, cfg.mpp, device, cfg.amp,
                                  progress=lambda done, total: log(f"  tuning {done}/{total}") if done % step == 0 or done == total else None,
                                  stain_target=data.stain_target)
    best = max(r["val_aji"] for r in rows)
    ckpt["meta"] = {**ckpt.get("meta", {}), "postprocess": post.to_dict(), "postprocess_tuning": rows}
    atomic_save(ckpt, path)
    log(f"post-processing tuned on {len(data.val)} validation images: {post.to_dict()} (val AJI {best:.4f})")
    return {**post.to_dict(), "val_aji_tuned": best}


def _save_inference(module, cfg: TrainConfig, data: LoadedData, model_kwargs: dict, path: Path, epoch: int, row: dict) -> None:
    meta = {"task": cfg.task, "epoch": epoch, "dataset_digest": data.digest, "code_version": code_version(),
            "val_metrics": {k: v for k, v in row.items() if k.startswith("val_")}}
    if cfg.task == "segment":
        meta.update(train_images=sorted(s.name for s in data.train), val_images=sorted(s.name for s in data.val))
    else:  # tile sets are too large to list: their sizes and digest identify them
        meta.update(train_tiles=len(data.train), val_tiles=len(data.val) if data.val else 0, data_root=Path(cfg.data.root).name)
    if cfg.init:
        meta["init"] = Path(cfg.init).name
    if cfg.task == "segment":
        meta["postprocess"] = fixed_postprocess(cfg).to_dict()
        if data.stain_target:
            meta["stain_norm"] = data.stain_target
    save_checkpoint(module, path, cfg.model, model_kwargs, data.classes, cfg.tile_px, cfg.mpp, MEAN, STD, meta=meta)
