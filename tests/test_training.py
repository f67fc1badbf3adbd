"""Training package: config, datasets, targets, augmentation, metrics, post-processing, loop, DDP, evaluation.

Data is generated here (blobs on an H&E-like background, coloured tiles) so every test runs
without ../shared; tests that use the real MoNuSeg and Kather data skip only when it is absent.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from conftest import REPO, SHARED_DATA
from pipeline.instances import PostProcess, instances_from_maps
from pipeline.models import load_model
from pipeline.config import ModelSpec
from training.augment import build_augment
from training.config import AugmentConfig, DataConfig, TrainConfigError, load_train_config
from training.datasets import DataError, Sample, load_dataset, split_names
from training.tilesets import tile_sets
from training.samples import NucleiCrops
from training.metrics import aji, classification_scores, panoptic_quality, segmentation_scores
from training.targets import nuclei_targets

TINY_UNET = {"base_channels": 4, "kernel_sizes": [5, 3]}


def blobs(rng, size=96, n=14, radius=(4, 7)):
    """An H&E-like image with purple discs (some touching) and their instance mask."""
    from skimage.draw import disk

    img = np.empty((size, size, 3), np.uint8)
    img[:] = (235, 190, 215)
    labels = np.zeros((size, size), np.int32)
    for k in range(1, n + 1):
        r = int(rng.integers(*radius))
        c = rng.integers(r, size - r, 2)
        rr, cc = disk((c[0], c[1]), r, shape=labels.shape)
        free = labels[rr, cc] == 0
        labels[rr[free], cc[free]] = k
        img[rr[free], cc[free]] = (90, 50, 150)
    img = np.clip(img + rng.normal(0, 6, img.shape), 0, 255).astype(np.uint8)
    return img, labels


def write_blob_set(root: Path, names: list[str], seed: int, size: int = 96, binary: bool = False) -> Path:
    """``root/images/*.png`` with instance masks (``labels/*.tif``) or, ``binary``, 0/255 masks (``masks/*.png``)."""
    import tifffile

    masks = root / ("masks" if binary else "labels")
    (root / "images").mkdir()
    masks.mkdir()
    rng = np.random.default_rng(seed)
    for name in names:
        img, lab = blobs(rng, size=size)
        Image.fromarray(img).save(root / "images" / f"{name}.png")
        if binary:
            Image.fromarray(((lab > 0) * 255).astype(np.uint8)).save(masks / f"{name}.png")
        else:
            tifffile.imwrite(masks / f"{name}.tif", lab.astype(np.uint16))
    return root


@pytest.fixture(scope="module")
def nuclei_dir(tmp_path_factory):
    return write_blob_set(tmp_path_factory.mktemp("nuclei"), [f"img{i}" for i in range(5)], seed=0)


@pytest.fixture(scope="module")
def tiles_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiles")
    rng = np.random.default_rng(1)
    for name, colour in (("purple", (120, 60, 160)), ("pink", (240, 170, 200))):
        (root / name).mkdir()
        for i in range(6):
            img = np.clip(np.array(colour) + rng.normal(0, 20, (40, 40, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(img).save(root / name / f"{i}.png")
    return root


def write_cfg(tmp_path, **kw) -> Path:
    data = {"task": "segment", "model": "gmr_unet", "model_kwargs": TINY_UNET, "tile_px": 32, "mpp": 0.5, "epochs": 2,
            "batch_size": 4, "samples_per_epoch": 8, "num_workers": 0, "out": str(tmp_path / "run"), "val_angles": [45],
            "optim": {"name": "adamw", "lr": 0.01, "warmup_epochs": 0},
            "data": {"kind": "nuclei", "root": "", "mpp": 0.5, "val_fraction": 0.4, "seed": 0}}
    for k, v in kw.items():
        data[k] = {**data[k], **v} if isinstance(v, dict) and isinstance(data.get(k), dict) else v
    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


# --- config ---------------------------------------------------------------------------------------------------

TRAIN_CONFIGS = sorted(p.stem for p in (REPO / "configs").glob("train_*.yaml"))


def test_every_training_config_is_tested():
    assert len(TRAIN_CONFIGS) >= 30 and "train_nuclei_gmr_oriented_long" in TRAIN_CONFIGS


@pytest.mark.parametrize("name", TRAIN_CONFIGS)
def test_shipped_training_configs_load_and_build(name):
    """Every ``configs/train_*.yaml`` validates, and its network builds from its ``model_kwargs``.

    Data paths are checked where they point into ../shared (present here and in CI); others
    (PCam, NCT-CRC, a previous run's ``init``) are the user's to download or train.
    """
    from gmr_models import create_model

    cfg = load_train_config(REPO / "configs" / f"{name}.yaml", check_paths=False)
    assert cfg.augment.geometric is False  # the paper's protocol: no rotation augmentation
    assert Path(cfg.out).is_absolute()
    for csv_path in (cfg.data.split_csv, cfg.data.groups_csv, cfg.data.mpp_csv):
        assert csv_path is None or Path(csv_path).is_file(), csv_path  # repo files: always there
    if SHARED_DATA.is_dir() and Path(cfg.data.root).is_relative_to(SHARED_DATA.resolve()):
        assert Path(cfg.data.root).is_dir(), cfg.data.root
    out_key = "out_channels" if cfg.task == "segment" else "num_classes"
    net = create_model(cfg.model, **{**cfg.model_kwargs, out_key: 2})
    assert sum(p.numel() for p in net.parameters()) > 1000


@pytest.mark.parametrize("override, key", [
    ({"epochs": 0}, "epochs"), ({"tile_px": True}, "tile_px"), ({"mpp": float("nan")}, "mpp"), ({"amp": "yes"}, "amp"),
    ({"data": {"kind": "zip"}}, "data.kind"), ({"data": {"mpp": None}}, "data.mpp"), ({"optim": {"name": "lion"}}, "optim.name"),
    ({"augment": {"blur": 2}}, "augment.blur"), ({"data": {"folds": 1}}, "data.folds"), ({"bogus": 1}, "bogus"),
    ({"augment": {"geometric": "no"}}, "augment.geometric"), ({"val_angles": "45"}, "val_angles"),
])
def test_bad_training_config_names_file_and_key(tmp_path, override, key):
    path = write_cfg(tmp_path, **override)
    with pytest.raises(TrainConfigError, match=key.replace(".", r"\.")) as err:
        load_train_config(path, {"data": {"root": str(tmp_path)}})
    assert str(path) in str(err.value)


def test_missing_data_root_is_an_error(tmp_path):
    with pytest.raises(TrainConfigError, match="data.root .* does not exist"):
        load_train_config(write_cfg(tmp_path), {"data": {"root": str(tmp_path / "nope")}})


# --- datasets and splits ---------------------------------------------------------------------------------------

def test_nuclei_dataset_resamples_and_splits_by_image(nuclei_dir):
    data = load_dataset(DataConfig(kind="nuclei", root=str(nuclei_dir), mpp=0.25, val_fraction=0.4), "segment", 0.5, 32)
    assert len(data.train) == 3 and len(data.val) == 2
    assert not {s.name for s in data.train} & {s.name for s in data.val}
    s = data.train[0]
    assert s.image.shape == (48, 48, 3) and s.labels.shape == (48, 48)  # 0.25 -> 0.5 mpp: half the side
    assert s.native_labels.shape == (96, 96) and s.native_mpp == 0.25
    again = load_dataset(DataConfig(kind="nuclei", root=str(nuclei_dir), mpp=0.25, val_fraction=0.4), "segment", 0.5, 32)
    assert again.digest == data.digest and [s.name for s in again.val] == [s.name for s in data.val]


def test_split_groups_and_folds_keep_patients_whole():
    names = [f"P{p}-{i}" for p in range(6) for i in range(3)]
    groups = {n: n.split("-")[0] for n in names}
    train, val = split_names(names, groups, DataConfig(val_fraction=0.34, seed=3))
    assert {groups[n] for n in train}.isdisjoint({groups[n] for n in val}) and val
    seen = set()
    for fold in range(3):
        tr, va = split_names(names, groups, DataConfig(folds=3, fold=fold))
        assert {groups[n] for n in tr}.isdisjoint({groups[n] for n in va})
        seen |= va
    assert seen == set(names)  # every image validated exactly once across folds


def test_split_csv(tmp_path, nuclei_dir):
    csv = tmp_path / "split.csv"
    csv.write_text("image,split\nimg0,val\nimg1,train\nimg2,train\nimg3,train\nimg4,val\n")
    data = load_dataset(DataConfig(kind="nuclei", root=str(nuclei_dir), mpp=0.5, split_csv=str(csv)), "segment", 0.5, 32)
    assert sorted(s.name for s in data.val) == ["img0", "img4"]
    csv.write_text("image,split\nimg0,val\nimg2,train\n")  # a CSV may name a few images: the rest are unused
    data = load_dataset(DataConfig(kind="nuclei", root=str(nuclei_dir), mpp=0.5, split_csv=str(csv)), "segment", 0.5, 32)
    assert [s.name for s in data.val] == ["img0"] and [s.name for s in data.train] == ["img2"]
    csv.write_text("image,split\nother,val\n")
    with pytest.raises(DataError, match="names none of the 5 image"):
        load_dataset(DataConfig(kind="nuclei", root=str(nuclei_dir), mpp=0.5, split_csv=str(csv)), "segment", 0.5, 32)


def test_groups_csv_with_one_fold_per_group_leaves_one_organ_out(tmp_path, nuclei_dir):
    """data.groups_csv + group_column (the MoNuSeg split CSV's organ): folds = organs gives leave-one-organ-out."""
    csv = tmp_path / "organs.csv"
    csv.write_text("image,split,organ\nimg0,train,liver\nimg1,train,liver\nimg2,val,breast\nimg3,train,colon\nimg4,train,breast\n")
    organ = {"img0": "liver", "img1": "liver", "img2": "breast", "img3": "colon", "img4": "breast"}
    held_out = []
    for fold in range(3):
        cfg = DataConfig(kind="nuclei", root=str(nuclei_dir), mpp=0.5, groups_csv=str(csv), group_column="organ", folds=3, fold=fold)
        data = load_dataset(cfg, "segment", 0.5, 32)
        organs = {organ[s.name] for s in data.val}
        assert len(organs) == 1 and organs.isdisjoint(organ[s.name] for s in data.train)
        held_out += organs
    assert sorted(held_out) == ["breast", "colon", "liver"]
    csv.write_text("image,organ\nimg0,liver\n")
    with pytest.raises(DataError, match="names no group for image 'img1'"):
        load_dataset(DataConfig(kind="nuclei", root=str(nuclei_dir), mpp=0.5, groups_csv=str(csv), group_column="organ",
                                folds=2), "segment", 0.5, 32)
    with pytest.raises(DataError, match="needs 'image' and 'site' columns"):
        load_dataset(DataConfig(kind="nuclei", root=str(nuclei_dir), mpp=0.5, groups_csv=str(csv), group_column="site",
                                folds=2), "segment", 0.5, 32)


def _copy_tree(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_bad_nuclei_files_are_named_or_skipped(tmp_path, nuclei_dir):
    root = _copy_tree(nuclei_dir, tmp_path / "d")
    (root / "images" / "broken.png").write_bytes(b"not a png")
    (root / "labels" / "broken.tif").write_bytes(b"nor a tiff")
    cfg = DataConfig(kind="nuclei", root=str(root), mpp=0.5, val_fraction=0.0)
    with pytest.raises(DataError, match="broken.png: cannot decode image"):
        load_dataset(cfg, "segment", 0.5, 32)
    data = load_dataset(cfg, "segment", 0.5, 32, skip_bad=True)
    assert len(data.train) == 5 and len(data.skipped) == 1 and "broken.png" in data.skipped[0]
    (root / "images" / "broken.png").unlink()
    import tifffile

    tifffile.imwrite(root / "labels" / "img0.tif", np.zeros((50, 60), np.uint16))
    with pytest.raises(DataError, match=r"img0.tif: mask size \(50, 60\) differs from image size \(96, 96\)"):
        load_dataset(cfg, "segment", 0.5, 32)


def test_binary_masks_become_instances(tmp_path):
    root = tmp_path / "b"
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    img, lab = blobs(np.random.default_rng(2), n=6, radius=(3, 4))
    Image.fromarray(img).save(root / "images" / "a.png")
    Image.fromarray(((lab > 0) * 255).astype(np.uint8)).save(root / "labels" / "a.png")
    data = load_dataset(DataConfig(kind="nuclei", root=str(root), mpp=0.5, val_fraction=0), "segment", 0.5, 16)
    from scipy import ndimage

    assert data.train[0].labels.max() == ndimage.label(lab > 0)[1] >= 2


def test_tile_datasets_folder_csv_and_errors(tmp_path, tiles_dir):
    data = tile_sets(DataConfig(kind="folder", root=str(tiles_dir), mpp=0.25, val_fraction=0.25), 0.5, 16)
    assert data.classes == ["pink", "purple"] and len(data.train) + len(data.val) == 12
    assert data.train.view(raw=True)[0][0].shape == (16, 16, 3)  # 40 px at 0.25 -> 20 px at 0.5, centre crop 16
    csv = tmp_path / "tiles.csv"
    csv.write_text("path,label\n" + "".join(f"{p},{p.parent.name}\n" for p in sorted(tiles_dir.rglob("*.png"))))
    assert len(tile_sets(DataConfig(kind="csv", root=str(csv), mpp=0.5, val_fraction=0), 0.5, 16).train) == 12
    with pytest.raises(DataError, match="label 'pink' is not one of the classes"):
        tile_sets(DataConfig(kind="csv", root=str(csv), mpp=0.5, classes=["purple", "other"]), 0.5, 16)
    empty = _copy_tree(tiles_dir, tmp_path / "t")
    (empty / "mucus").mkdir()
    with pytest.raises(DataError, match="mucus: empty class folder"):
        tile_sets(DataConfig(kind="folder", root=str(empty), mpp=0.5), 0.5, 16)
    with pytest.raises(DataError, match="tile sets stream"):
        load_dataset(DataConfig(kind="folder", root=str(tiles_dir), mpp=0.5), "classify", 0.5, 16)


def test_h5_pairs(tmp_path):
    import h5py

    rng = np.random.default_rng(0)
    with h5py.File(tmp_path / "train_x.h5", "w") as f:
        f["x"] = rng.integers(0, 255, (6, 32, 32, 3), dtype=np.uint8)
    with h5py.File(tmp_path / "train_y.h5", "w") as f:
        f["y"] = np.array([0, 1, 0, 1, 1, 0], np.uint8).reshape(6, 1, 1, 1)
    data = tile_sets(DataConfig(kind="h5", root=str(tmp_path), mpp=0.972, val_fraction=0), 0.972, 32)
    assert data.train.labels.tolist() == [0, 1, 0, 1, 1, 0] and data.classes == ["normal", "tumour"]
    with h5py.File(tmp_path / "train_y.h5", "w") as f:
        f["y"] = np.array([0, 1, 0, 1, 7, 0], np.uint8)
    with pytest.raises(DataError, match="train_y.h5: label 7 out of range"):
        tile_sets(DataConfig(kind="h5", root=str(tmp_path), mpp=0.972), 0.972, 32)


# --- targets, augmentation, post-processing ---------------------------------------------------------------------

def test_targets_are_exactly_rotation_equivariant():
    _, lab = blobs(np.random.default_rng(3), size=64)
    fg, dist = nuclei_targets(lab)
    assert fg.max() == 1 and np.all(dist[lab == 0] == 0)
    for v in np.unique(lab)[1:]:
        assert dist[lab == v].max() == pytest.approx(1.0)  # every nucleus peaks at 1, large or small
    for k in (1, 2, 3):
        fg_r, dist_r = nuclei_targets(np.rot90(lab, k))
        assert np.array_equal(fg_r, np.rot90(fg, k)) and np.allclose(dist_r, np.rot90(dist, k), atol=1e-6)
    fg_f, dist_f = nuclei_targets(lab[:, ::-1])
    assert np.allclose(dist_f, dist[:, ::-1], atol=1e-6)


def test_targets_at_the_model_resolution_lie_where_the_image_nuclei_do(tmp_path, nuclei_dir):
    from scipy import ndimage

    from training.datasets import resample_image
    from training.samples import model_targets
    from training.targets import resize_labels

    lab = np.zeros((400, 400), np.int32)
    yy, xx = np.mgrid[:400, :400]
    lab[(yy - 200.5) ** 2 + (xx - 200.5) ** 2 < 81] = 1  # a disc centred between native pixels
    img = np.repeat(np.where(lab[..., None] > 0, 255, 0).astype(np.uint8), 3, axis=2)
    small = resample_image(img, 0.25, 0.5)
    nearest = resize_labels(lab, small.shape[:2])
    sample = Sample("disc", small, "disc", labels=nearest, native_image=img, native_labels=lab, native_mpp=0.25)
    maps = model_targets(sample)
    assert maps.shape == (200, 200, 2) and maps.dtype == np.float32
    centre = np.array(ndimage.center_of_mass(small[..., 0].astype(float)))
    for k in (0, 1):  # foreground and distance sit on the image's nucleus to 1e-3 px...
        assert np.allclose(ndimage.center_of_mass(maps[..., k]), centre, atol=1e-3)
    # ...where nearest-neighbour labels are 0.17 px off, a shift an equivariant network cannot learn
    assert np.allclose(np.array(ndimage.center_of_mass(nearest.astype(float))) - centre, 0.172, atol=0.005)
    assert 0 < maps[..., 0][(maps[..., 0] > 0) & (maps[..., 0] < 1)].size  # soft at the border
    data = load_dataset(DataConfig(kind="nuclei", root=str(nuclei_dir), mpp=0.25, val_fraction=0.0), "segment", 0.5, 32)
    crops = NucleiCrops(data.train, 32, 4)
    assert np.array_equal(crops.targets[0], model_targets(data.train[0]))
    nearest = NucleiCrops(data.train, 32, 4, aligned=False)  # targets: nearest (the shipped model's recipe)
    assert np.array_equal(nearest.targets[0], np.stack(nuclei_targets(data.train[0].labels), -1))
    with pytest.raises(TrainConfigError, match="targets must be 'aligned' or 'nearest'"):
        load_train_config(write_cfg(tmp_path, targets="exact"), check_paths=False)


def test_augmentation_is_seeded_and_keeps_geometry_off_by_default():
    img, lab = blobs(np.random.default_rng(4), size=48)
    fg, dist = nuclei_targets(lab)
    tgt = np.stack([fg, dist], -1)
    aug = build_augment(AugmentConfig(hed=1.0, blur=1.0, noise=1.0))
    a, b = aug(image=img, mask=tgt, seed=5), aug(image=img, mask=tgt, seed=5)
    assert np.array_equal(a["image"], b["image"]) and not np.array_equal(a["image"], img)
    assert np.array_equal(a["mask"], tgt)  # colour, blur and noise never move the targets
    geo = build_augment(AugmentConfig(hed=0, blur=0, noise=0, geometric=True))
    assert any(not np.array_equal(geo(image=img, mask=tgt, seed=s)["mask"], tgt) for s in range(4))
    assert build_augment(AugmentConfig(hed=0, blur=0, noise=0)) is None


def test_nuclei_crops_are_reproducible(nuclei_dir):
    data = load_dataset(DataConfig(kind="nuclei", root=str(nuclei_dir), mpp=0.5, val_fraction=0), "segment", 0.5, 32)
    ds = NucleiCrops(data.train, 32, 10, build_augment(AugmentConfig()), seed=1)
    ds.set_epoch(3)
    x1, y1 = ds[7]
    x2, y2 = ds[7]
    ds.set_epoch(4)
    x3, _ = ds[7]
    assert x1.shape == (3, 32, 32) and y1.shape == (2, 32, 32)
    assert torch.equal(x1, x2) and torch.equal(y1, y2) and not torch.equal(x1, x3)


def test_watershed_separates_touching_nuclei_and_rotates_with_the_image():
    _, lab = blobs(np.random.default_rng(5), size=80, n=12)
    fg, dist = nuclei_targets(lab)
    pred = instances_from_maps(fg, dist, PostProcess(marker_h=0.1, min_area_px=0))
    assert aji(lab, pred) > 0.9 and pred.max() >= lab.max() - 1
    merged = instances_from_maps(fg, None)  # without the distance map, touching nuclei merge
    assert merged.max() < pred.max()
    for k in (1, 2, 3):
        rot = instances_from_maps(np.rot90(fg, k), np.rot90(dist, k), PostProcess(marker_h=0.1, min_area_px=0))
        assert aji(np.rot90(pred, k), rot) == pytest.approx(1.0)


@pytest.mark.parametrize("bad", [{"fg_threshold": 1.0}, {"marker_h": 0}, {"min_area_px": -1}, {"fg_threshold": True},
                                 {"marker_h_dense": 1.2}, {"dense_per_mm2": (9000, 8000)}, {"density_sigma_um": 0}])
def test_postprocess_rejects_bad_values_naming_the_field(bad):
    field = next(iter(bad))
    with pytest.raises(ValueError, match=field) as err:
        PostProcess(**bad)
    assert err.value.field == field  # what lets a command line name its own option for it


# --- metrics -----------------------------------------------------------------------------------------------------

def test_aji_and_pq_by_hand():
    gt = np.zeros((10, 10), np.int32)
    gt[0:4, 0:4] = 1  # 16 px
    gt[6:10, 6:10] = 2  # 16 px
    pred = np.zeros_like(gt)
    pred[0:4, 0:2] = 1  # 8 px inside gt 1: IoU 0.5 (not > 0.5: no PQ match)
    pred[6:10, 6:10] = 2  # exact
    pred[0:2, 8:10] = 3  # a false positive of 4 px
    assert aji(gt, pred) == pytest.approx((8 + 16) / (16 + 16 + 4))
    pq = panoptic_quality(gt, pred)
    assert (pq["tp"], pq["fp"], pq["fn"]) == (1, 2, 1)
    assert pq["pq"] == pytest.approx(1.0 / (1 + 0.5 * 2 + 0.5 * 1))
    assert aji(gt, gt) == 1.0 and aji(gt, np.zeros_like(gt)) == 0.0
    with pytest.raises(ValueError, match="shapes differ"):
        aji(gt, gt[:5])


def test_panoptic_quality_matches_monai():
    from monai.metrics import compute_panoptic_quality

    _, gt = blobs(np.random.default_rng(6), size=80, n=15)
    for shift in (0, 1, 2, 3):
        pred = np.roll(gt, shift, axis=1)
        pred = np.where(pred % 5 == 2, 0, pred)
        ours = panoptic_quality(gt, pred)["pq"]
        theirs = float(compute_panoptic_quality(torch.from_numpy(pred), torch.from_numpy(gt), smooth_numerator=0))
        assert ours == pytest.approx(theirs, abs=1e-6)


def test_segmentation_scores_inside_a_mask():
    _, gt = blobs(np.random.default_rng(7), size=64)
    half = np.zeros(gt.shape, bool)
    half[:, :32] = True
    pred = np.where(half, gt, 0)  # perfect on the left half, nothing on the right
    assert segmentation_scores(gt, pred, half)["dice"] == pytest.approx(1.0)
    assert segmentation_scores(gt, pred)["dice"] < 0.9


def test_nucleus_recall_splits_misses_by_stain_and_size():
    from training.metrics import nucleus_recall

    gt = np.zeros((40, 40), np.int32)
    gt[2:6, 2:6], gt[2:6, 10:14] = 1, 2            # small, dark / small, pale
    gt[20:30, 2:12], gt[20:30, 20:30] = 3, 4      # large, dark / large, pale
    image = np.full((40, 40, 3), 235, np.uint8)
    for i, dark in ((1, True), (2, False), (3, True), (4, False)):
        image[gt == i] = (60, 30, 120) if dark else (190, 170, 215)
    pred = np.isin(gt, [1, 3]).astype(np.int32)    # finds the dark two only
    pred[20:24, 20:30] = 5                         # 40% of nucleus 4: not found
    r = nucleus_recall(gt, pred, image)
    assert r["recall"] == 0.5 and r["recall_dark"] == 1.0 and r["recall_pale"] == 0.0
    assert r["recall_small"] == 0.5 and r["recall_large"] == 0.5
    assert nucleus_recall(gt, pred, image, covered=0.4)["recall_pale"] == 0.5  # the 40% one counts now
    assert np.isnan(nucleus_recall(np.zeros_like(gt), pred, image)["recall"])
    with pytest.raises(ValueError, match="must match"):
        nucleus_recall(gt, pred[:30], image)


def test_evaluate_table_tells_same_named_checkpoints_apart():
    from gmrpath.train import _short_labels

    names = ["r/gmr/fold4/best.pt", "r/unet/fold4/best.pt", "models/x.pt", "classical"]
    assert list(_short_labels(names).values()) == ["gmr/fold4/best.pt", "unet/fold4/best.pt", "models/x.pt", "classical"]


def test_classification_scores():
    labels = np.array([0, 0, 0, 1])
    probs = np.array([[0.9, 0.1], [0.8, 0.2], [0.4, 0.6], [0.3, 0.7]])
    s = classification_scores(probs, labels, 2)
    assert s["accuracy"] == 0.75 and s["balanced_accuracy"] == pytest.approx((2 / 3 + 1) / 2)
    assert s["auc"] == pytest.approx(1.0)


# --- training loop -----------------------------------------------------------------------------------------------

def test_train_writes_checkpoints_the_pipeline_loads_and_resumes_exactly(tmp_path, nuclei_dir):
    from training.loop import train

    path = write_cfg(tmp_path)
    cfg = load_train_config(path, {"data": {"root": str(nuclei_dir)}})
    summary = train(cfg, log=lambda s: None)
    out = Path(cfg.out)
    history = json.loads((out / "metrics.json").read_text())
    # the logged lr is the one epoch 1's last step ran with (step 2 of 4, cosine, no warm-up), not the next one
    assert history[0]["lr"] == pytest.approx(0.01 * 0.5 * (1 + math.cos(math.pi * 1 / 4)))
    assert [r["epoch"] for r in history] == [1, 2] and {"val_dice", "val_aji", "val_pq", "val_dice_45"} <= set(history[0])
    assert (out / "metrics.csv").read_text().count("\n") == 3
    loaded = load_model(ModelSpec(task="segment", model=str(out / "best.pt"), classes=["nucleus"]))
    assert loaded.trained and loaded.meta["task"] == "segment" and loaded.meta["dataset_digest"] == summary["digest"]
    assert loaded.spec.mpp == 0.5 and summary["postprocess"]["fg_threshold"] == loaded.meta["postprocess"]["fg_threshold"]
    tuning = loaded.meta["postprocess_tuning"]  # tuned on the run's own validation images
    assert len(tuning) == 18 and max(r["val_aji"] for r in tuning) == summary["postprocess"]["val_aji_tuned"]
    assert sorted(loaded.meta["val_images"]) and not set(loaded.meta["val_images"]) & set(loaded.meta["train_images"])
    final = torch.load(out / "last.pt", weights_only=True)["model"]
    # a run killed after epoch 1 and resumed ends exactly where the uninterrupted one did
    cfg1 = load_train_config(path, {"data": {"root": str(nuclei_dir)}, "out": str(tmp_path / "split")})

    def kill_in_epoch_2(step, total, info):
        if info["epoch"] == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(cfg1, log=lambda s: None, progress=kill_in_epoch_2)
    state = torch.load(tmp_path / "split" / "last.pt", weights_only=True)
    assert state["epoch"] == 0
    train(cfg1, resume=True, log=lambda s: None)
    resumed = torch.load(tmp_path / "split" / "last.pt", weights_only=True)["model"]
    assert all(torch.equal(final[k], resumed[k]) for k in final)
    other = load_train_config(path, {"data": {"root": str(nuclei_dir)}, "out": str(tmp_path / "split"), "tile_px": 16})
    with pytest.raises(ValueError, match="different training config .*tile_px"):
        train(other, resume=True, log=lambda s: None)
    last = tmp_path / "split" / "last.pt"
    last.write_bytes(last.read_bytes()[:1000])  # a state cut short by a full disk or a kill mid-copy
    with pytest.raises(ValueError, match="last.pt: cannot resume from it: not a readable training state"):
        train(cfg1, resume=True, log=lambda s: None)


def test_init_starts_a_run_from_a_checkpoint_and_refuses_one_that_does_not_fit(tmp_path, nuclei_dir):
    from training.loop import train

    root = {"data": {"root": str(nuclei_dir)}}
    first = load_train_config(write_cfg(tmp_path, epochs=1, val_angles=[]), root)
    train(first, log=lambda s: None)
    start = load_model(ModelSpec(task="segment", model=str(Path(first.out) / "best.pt"), classes=["nucleus"])).module
    # a learning rate of 1e-12 leaves the weights where init put them; a fresh seed would not
    lines = []
    second = load_train_config(write_cfg(tmp_path, epochs=1, val_angles=[], seed=5, optim={"lr": 1e-12}),
                               {**root, "out": str(tmp_path / "ft"), "init": str(Path(first.out) / "best.pt")})
    train(second, log=lines.append)
    tuned = load_model(ModelSpec(task="segment", model=str(tmp_path / "ft" / "best.pt"), classes=["nucleus"]))
    assert any(line.startswith("init: weights from") for line in lines) and tuned.meta["init"] == "best.pt"
    params = dict(tuned.module.named_parameters())
    assert all(torch.allclose(p, params[k], atol=1e-8) for k, p in start.named_parameters())
    fresh = load_train_config(write_cfg(tmp_path, epochs=1, val_angles=[], seed=5), {**root, "out": str(tmp_path / "fresh")})
    train(fresh, log=lambda s: None)
    scratch = dict(load_model(ModelSpec(task="segment", model=str(tmp_path / "fresh" / "best.pt"), classes=["nucleus"])).module.named_parameters())
    assert not all(torch.allclose(p, scratch[k], atol=1e-3) for k, p in start.named_parameters())
    # another width: one line naming the checkpoint and the first tensor that differs
    wide = load_train_config(write_cfg(tmp_path, model_kwargs={**TINY_UNET, "base_channels": 2 * TINY_UNET["base_channels"]}),
                             {**root, "out": str(tmp_path / "wide"), "init": str(Path(first.out) / "best.pt")})
    with pytest.raises(ValueError, match=r"init: .*best.pt does not fit gmr_unet .*another shape"):
        train(wide, log=lambda s: None)
    with pytest.raises(TrainConfigError, match="init .*does not exist"):
        load_train_config(write_cfg(tmp_path), {**root, "init": str(tmp_path / "missing.pt")})


def test_ddp_two_processes_gloo(tmp_path, nuclei_dir):
    path = write_cfg(tmp_path, epochs=1, samples_per_epoch=8, val_angles=[])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29533", "-m", "gmrpath", "train",
           str(path), "--set", f"data.root={nuclei_dir}", "--device", "cpu"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = tmp_path / "run"
    history = json.loads((out / "metrics.json").read_text())
    assert len(history) == 1 and (out / "best.pt").is_file()
    assert json.loads(proc.stdout)["epochs"] == 1  # one summary (rank 0's), valid JSON: not one per process


def test_train_cli_bad_config_is_one_line(tmp_path):
    from typer.testing import CliRunner

    from gmrpath.cli import app

    path = write_cfg(tmp_path, epochs=-1)
    result = CliRunner().invoke(app, ["train", str(path), "--set", f"data.root={tmp_path}"])
    assert result.exit_code == 1
    assert "epochs must be a positive int" in result.output and "Traceback" not in result.output
    (tmp_path / "empty" / "images").mkdir(parents=True)
    (tmp_path / "empty" / "labels").mkdir()
    result = CliRunner().invoke(app, ["train", str(write_cfg(tmp_path)), "--set", f"data.root={tmp_path / 'empty'}",
                                      "--set", f"out={tmp_path / 'run_x'}"])
    assert result.exit_code == 1 and "no images" in result.output
    assert not (tmp_path / "run_x").exists()  # a run that could not start leaves no empty folder


# --- evaluation ----------------------------------------------------------------------------------------------------

def test_classifier_training_and_rotation_evaluation(tmp_path, tiles_dir):
    from training.evaluate import evaluate
    from training.loop import train

    path = write_cfg(tmp_path, task="classify", model="gmr_resnet18", tile_px=16, epochs=2, select="val_accuracy",
                     model_kwargs={"base_channels": 4, "kernel_sizes": [5, 3, 3, 3]}, val_angles=[],
                     optim={"name": "sgd", "lr": 0.02},
                     data={"kind": "folder", "root": str(tiles_dir), "mpp": 0.25, "val_fraction": 0.34})
    cfg = load_train_config(path)
    train(cfg, log=lambda s: None)
    report = evaluate([str(Path(cfg.out) / "best.pt")], cfg.data, tmp_path / "eval", split="val", log=lambda s: None)
    r = next(iter(report["models"].values()))
    per = r["balanced_accuracy_per_angle"]
    assert len(per) == 36
    # a GMR classifier is exactly invariant to 90-degree rotations and flips: the same calls, the same scores
    assert per[90.0] == per[180.0] == per[270.0] == per[0.0] == r["balanced_accuracy_upright"]
    assert set(r["accuracy_flips"].values()) == {r["accuracy_upright"]}
    rows = (tmp_path / "eval" / "evaluation.csv").read_text().splitlines()
    assert len(rows) == 1 + 36 + 2 and (tmp_path / "eval" / "polar.png").stat().st_size > 1000


def test_segmentation_evaluation_side_by_side_with_classical(tmp_path, nuclei_dir):
    from training.evaluate import evaluate
    from training.loop import train

    cfg = load_train_config(write_cfg(tmp_path, epochs=1, val_angles=[]), {"data": {"root": str(nuclei_dir)}})
    train(cfg, log=lambda s: None)
    ckpt = str(Path(cfg.out) / "best.pt")
    report = evaluate([ckpt, "classical"], cfg.data, tmp_path / "eval", angles=[0, 90, 45], split="val", log=lambda s: None)
    gmr, classical = report["models"][ckpt], report["models"]["classical"]
    assert set(gmr["dice_per_angle"]) == {0.0, 45.0, 90.0}
    assert gmr["dice_per_angle"][90.0] == pytest.approx(gmr["dice_per_angle"][0.0], abs=1e-9)  # exact for GMR
    assert classical["dice_upright"] > 0.8  # dark discs on pink: deconvolution + Otsu finds them
    from pipeline.models import ModelError

    with pytest.raises(ModelError, match="cannot classify"):
        evaluate(["classical"], DataConfig(kind="folder", root=str(tmp_path)), tmp_path / "x")


def test_sensitivity_table_holds_every_setting_and_the_fixed_rule_agrees(tmp_path, nuclei_dir, monkeypatch):
    """--sensitivity: 3 x 6 post-processings, upright; the fixed rule's cell equals the main upright scores,
    and the network runs once per image (the grid reuses the upright maps)."""
    import training.evaluate as ev
    import training.protocol as protocol
    from training.loop import train
    from training.protocol import TUNE_FG, TUNE_H

    cfg = load_train_config(write_cfg(tmp_path, epochs=1, val_angles=[], postprocess="fixed", select="last"),
                            {"data": {"root": str(nuclei_dir)}})
    train(cfg, log=lambda s: None)
    ckpt = str(Path(cfg.out) / "best.pt")
    calls, original = [], protocol.nuclei_block_maps

    def counted(*args, **kwargs):
        calls.append(args[1].name)
        return original(*args, **kwargs)

    monkeypatch.setattr(ev, "nuclei_block_maps", counted)
    monkeypatch.setattr(protocol, "nuclei_block_maps", counted)
    report = ev.evaluate([ckpt, "classical"], cfg.data, tmp_path / "eval", angles=[0], split="val", log=lambda s: None,
                         sensitivity=True)
    assert len(calls) == report["n"] and len(set(calls)) == report["n"]
    grid = report["models"][ckpt]["postprocess_sensitivity"]
    assert len(grid) == len(TUNE_FG) * len(TUNE_H) and "postprocess_sensitivity" not in report["models"]["classical"]
    fixed = next(g for g in grid if g["fg_threshold"] == 0.5 and g["marker_h"] == 0.1)
    for m in ("dice", "aji", "pq"):
        assert fixed[m] == pytest.approx(report["models"][ckpt][f"{m}_upright"], abs=1e-9)
    assert len({round(g["aji"], 9) for g in grid}) > 1  # the settings do change the result
    assert json.loads((tmp_path / "eval" / "evaluation.json").read_text())["models"][ckpt]["postprocess_sensitivity"] == grid


def test_classical_baseline_on_real_monuseg():
    image = SHARED_DATA / "nuclei" / "monuseg2018" / "images" / "TCGA-21-5784-01Z-00-DX1.png"
    if not image.is_file():
        pytest.skip("needs ../shared/data/nuclei/monuseg2018")
    import tifffile

    from training.classical import classical_nuclei

    img = np.asarray(Image.open(image).convert("RGB"))[:400, :400]
    gt = tifffile.imread(image.parents[1] / "labels" / f"{image.stem}.tif")[:400, :400]
    scores = segmentation_scores(gt, classical_nuclei(img, 0.25))
    assert scores["dice"] > 0.6 and scores["aji"] > 0.3


def test_checkpoint_must_fit_the_config(tmp_path):
    from gmr_models import create_model
    from pipeline.models import ModelError, save_checkpoint

    net = create_model("gmr_resnet18", num_classes=2, base_channels=4, kernel_sizes=[3, 3, 3, 3])
    path = save_checkpoint(net, tmp_path / "two.pt", "gmr_resnet18", {"num_classes": 2, "base_channels": 4, "kernel_sizes": [3, 3, 3, 3]},
                           ["normal", "tumour"], 96, 0.972, meta={"task": "classify"})
    nct = ModelSpec(model=str(path))  # the nct_crc defaults: 9 classes, 224 px, 0.5 mpp
    with pytest.raises(ModelError, match=r"two.pt: the checkpoint was trained with classes \['normal', 'tumour'\].*mpp 0.972.*tile_px 96"):
        load_model(nct)
    assert load_model(ModelSpec(model=str(path), classes=["normal", "tumour"], tile_px=96, mpp=0.972)).trained
    with pytest.raises(ModelError, match="a classify checkpoint cannot be used to segment"):
        load_model(ModelSpec(task="segment", model=str(path), classes=["nucleus"]))
    bad = save_checkpoint(net, tmp_path / "bad.pt", "gmr_resnet18", {"num_classes": 2, "base_channels": 4, "kernel_sizes": [3, 3, 3, 3]},
                          ["a", "b", "c"], 96, 0.5)
    with pytest.raises(ModelError, match="head has 2 outputs but names 3 classes"):
        load_model(ModelSpec(model=str(bad), classes=["a", "b", "c"], tile_px=96))


def test_segment_maps_turn_exactly_with_the_image_when_padded():
    from gmr_models import create_model
    from pipeline.infer import segment_maps

    net = create_model("gmr_unet", out_channels=2, **TINY_UNET).eval()
    img = np.random.default_rng(0).integers(0, 255, (50, 62, 3), dtype=np.uint8)  # padded to 56 x 64 (even pads)
    maps = segment_maps(net, img, (0.5,) * 3, (0.5,) * 3, torch.device("cpu"), multiple=8)
    assert maps.shape == (2, 50, 62)
    for k in (1, 2, 3):
        rot = segment_maps(net, np.ascontiguousarray(np.rot90(img, k)), (0.5,) * 3, (0.5,) * 3, torch.device("cpu"), multiple=8)
        assert np.allclose(rot, np.rot90(maps, k, axes=(1, 2)), atol=1e-5)


@pytest.mark.parametrize("override, key", [
    ({"tissue": {"min_object_um2": "big"}}, "tissue.min_object_um2"), ({"slides": 123}, "slides"),
    ({"mpp": float("nan")}, "mpp"), ({"mpp": float("inf")}, "mpp"), ({"tissue": {"mask_mpp": float("inf")}}, "tissue.mask_mpp"),
    ({"run": {"device": 7}}, "run.device"), ({"run": {"device": "gpu"}}, "run.device"), ({"run": {"amp": "yes"}}, "run.amp"),
    ({"classify": {"preset": "nct_crc", "tile_px": True}}, "classify.tile_px"),
    ({"classify": {"preset": "pcam", "classes": ["a", "a"]}}, "classify.classes"),
    ({"classify": {"preset": "nct_crc", "mpp": float("nan")}}, "classify.mpp"),
])
def test_pipeline_config_rejects_bad_values_at_load(override, key):
    """Issue 6's validation gaps: each is an error naming the key when the config loads."""
    from pipeline.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=rf"{key.replace('.', '[.]')} must be"):
        load_config(REPO / "configs" / "default.yaml", override)


@pytest.mark.parametrize("bad", ["nan", "inf,0", "10:0:5", "", "0:360:1e-9", "0:inf:1", "a,b"])
def test_evaluate_refuses_bad_angles_in_one_line(bad, tmp_path, nuclei_dir):
    from typer.testing import CliRunner

    from gmrpath.cli import app

    result = CliRunner().invoke(app, ["evaluate", "classical", "--data", str(nuclei_dir), "--mpp", "0.5", "--angles", bad,
                                      "--out", str(tmp_path / "ev")])
    assert result.exit_code == 2 and "--angles" in result.output and "Traceback" not in result.output, result.output
    assert not (tmp_path / "ev").exists()


def test_evaluate_scores_only_the_images_asked_for(tmp_path, nuclei_dir):
    from typer.testing import CliRunner

    from gmrpath.cli import app

    result = CliRunner().invoke(app, ["evaluate", "classical", "--data", str(nuclei_dir), "--mpp", "0.5", "--angles", "0,90",
                                      "--images", "img1", "--images", "img[34]", "--out", str(tmp_path / "ev")])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "ev" / "evaluation.json").read_text())
    assert report["n"] == 3 and "3/3 images" in result.output  # a progress line per image
    found = report["models"]["classical"]
    assert 0 < found["recall_upright"] <= 1 and {"recall_pale_upright", "recall_large_upright"} <= set(found)
    assert "true nuclei found" in result.output
    result = CliRunner().invoke(app, ["evaluate", "classical", "--data", str(nuclei_dir), "--mpp", "0.5", "--angles", "0",
                                      "--limit", "2", "--out", str(tmp_path / "ev2")])
    assert result.exit_code == 0 and json.loads((tmp_path / "ev2" / "evaluation.json").read_text())["n"] == 2
    result = CliRunner().invoke(app, ["evaluate", "classical", "--data", str(nuclei_dir), "--mpp", "0.5", "--images", "zzz*",
                                      "--out", str(tmp_path / "ev3")])
    assert result.exit_code == 1 and "no image to score" in result.output


def test_evaluate_scores_one_group_of_a_groups_csv(tmp_path, nuclei_dir):
    """--group organ=a scores only the images the CSV puts in organ a; bad groups fail naming the CSV."""
    from typer.testing import CliRunner

    from gmrpath.cli import app

    names = sorted(p.stem for p in (nuclei_dir / "images").iterdir())
    groups = tmp_path / "groups.csv"
    groups.write_text("image,organ\n" + "".join(f"{n},{'a' if i % 2 == 0 else 'b'}\n" for i, n in enumerate(names)))
    in_a = names[::2]
    base = ["evaluate", "classical", "--data", str(nuclei_dir), "--mpp", "0.5", "--angles", "0", "--groups-csv", str(groups)]
    result = CliRunner().invoke(app, base + ["--group", "organ=a", "--out", str(tmp_path / "a")])
    assert result.exit_code == 0, result.output
    rows = (tmp_path / "a" / "evaluation.csv").read_text().splitlines()
    scored = {line.split(",")[rows[0].split(",").index("image")] for line in rows[1:]}
    assert scored == set(in_a) and len(in_a) < len(names)
    both = CliRunner().invoke(app, base + ["--group", "organ=a", "--group", "organ=b", "--out", str(tmp_path / "ab")])
    assert both.exit_code == 0 and json.loads((tmp_path / "ab" / "evaluation.json").read_text())["n"] == len(names)
    narrowed = CliRunner().invoke(app, base + ["--group", "organ=a", "--images", names[0], "--out", str(tmp_path / "a0")])
    assert narrowed.exit_code == 0 and json.loads((tmp_path / "a0" / "evaluation.json").read_text())["n"] == 1
    unknown = CliRunner().invoke(app, base + ["--group", "organ=c", "--out", str(tmp_path / "c")])
    assert unknown.exit_code == 1 and "groups.csv" in unknown.output and "known: a, b" in unknown.output
    for bad in (["--group", "organ"], ["--group", "organ=a", "--group", "site=b"], ["--group", "tissue=a"]):
        result = CliRunner().invoke(app, base + bad + ["--out", str(tmp_path / "bad")])
        assert result.exit_code != 0 and not (tmp_path / "bad" / "evaluation.json").exists()
    no_csv = CliRunner().invoke(app, base[:-2] + ["--group", "organ=a", "--out", str(tmp_path / "bad")])
    assert no_csv.exit_code != 0 and "--groups-csv" in no_csv.output


def test_no_selection_run_keeps_the_last_epoch_and_the_fixed_postprocessing(tmp_path, nuclei_dir):
    from pipeline.instances import PostProcess
    from training.loop import train

    path = write_cfg(tmp_path, select="last", postprocess="fixed", separation_weight=1.0, val_angles=[],
                     model_kwargs={**TINY_UNET, "invariant_scales": [1.0]},
                     augment={"brightness_contrast": 0.5, "gamma": 0.5, "grayscale": 0.2, "hsv": 0.5})
    lines = []
    summary = train(load_train_config(path, {"data": {"root": str(nuclei_dir)}}), log=lines.append)
    loaded = load_model(ModelSpec(task="segment", model=str(tmp_path / "run" / "best.pt"), classes=["nucleus"]))
    assert summary["best_epoch"] == 2 and loaded.meta["epoch"] == 2  # the last epoch, whatever validation said
    assert loaded.meta["postprocess"] == PostProcess().to_dict() and "postprocess_tuning" not in loaded.meta
    assert not any("tuning" in line for line in lines) and "postprocess" not in summary
    for bad in ({"select": "best"}, {"postprocess": "auto"}, {"separation_weight": -1}, {"augment": {"gamma": 2}}):
        with pytest.raises(TrainConfigError):
            load_train_config(write_cfg(tmp_path, **bad), {"data": {"root": str(nuclei_dir)}})


def test_val_every_scores_only_every_nth_epoch_and_the_last(tmp_path, nuclei_dir):
    """val_every 2 over 3 epochs: epochs 2 and 3 are validated, epoch 1 is not; a choosing run refuses it."""
    import csv

    from training.loop import train

    path = write_cfg(tmp_path, epochs=3, select="last", postprocess="fixed", val_angles=[], val_every=2)
    train(load_train_config(path, {"data": {"root": str(nuclei_dir)}}), log=lambda line: None)
    rows = list(csv.DictReader(open(tmp_path / "run" / "metrics.csv")))
    assert [bool(r["val_aji"]) for r in rows] == [False, True, True]
    loaded = load_model(ModelSpec(task="segment", model=str(tmp_path / "run" / "best.pt"), classes=["nucleus"]))
    assert loaded.meta["epoch"] == 3 and "val_aji" in loaded.meta["val_metrics"]
    for bad, match in (({"val_every": 0}, "val_every must be an int >= 1"), ({"val_every": 2.0}, "val_every must be an int"),
                       ({"val_every": 2, "select": "val_aji"}, "val_every must be 1 when select is 'val_aji'")):
        with pytest.raises(TrainConfigError, match=match):
            load_train_config(write_cfg(tmp_path, **bad), {"data": {"root": str(nuclei_dir)}})


def test_a_fixed_rule_from_the_config_validates_and_ships(tmp_path, nuclei_dir):
    """postprocess: {fg_threshold, marker_h}: every epoch is validated with it and best.pt stores it."""
    from training.evaluate import evaluate
    from training.loop import train

    rule = {"fg_threshold": 0.4, "marker_h": 0.25}
    path = write_cfg(tmp_path, epochs=1, select="last", postprocess=rule, val_angles=[])
    cfg = load_train_config(path, {"data": {"root": str(nuclei_dir)}})
    summary = train(cfg, log=lambda line: None)
    best = str(tmp_path / "run" / "best.pt")
    loaded = load_model(ModelSpec(task="segment", model=best, classes=["nucleus"]))
    assert loaded.meta["postprocess"] == PostProcess(**rule).to_dict() and "marker_h': 0.25" in summary["note"]
    scored = evaluate([best], cfg.data, tmp_path / "eval", split="val", angles=[0], log=lambda line: None)["models"][best]
    assert loaded.meta["val_metrics"]["val_aji"] == pytest.approx(scored["aji_upright"])  # validated under the rule
    for bad, match in (({"marker_h": 2}, "postprocess: marker_h must be"), ({"h": 0.2}, r"postprocess: unknown field\(s\) \['h'\]"),
                       ({}, "postprocess must be")):
        with pytest.raises(TrainConfigError, match=match):
            load_train_config(write_cfg(tmp_path, postprocess=bad), {"data": {"root": str(nuclei_dir)}})


def test_rgb_instance_masks_are_decoded_by_colour(tmp_path):
    from PIL import Image

    from training.datasets import read_mask

    rgb = np.zeros((20, 20, 3), np.uint8)
    rgb[2:6, 2:6] = (255, 0, 0)
    rgb[2:6, 6:10] = (255, 1, 0)  # touching, one channel apart: still two nuclei
    rgb[12:16, 12:16] = (7, 7, 200)
    Image.fromarray(rgb).save(tmp_path / "m.png")
    labels = read_mask(tmp_path / "m.png")
    assert labels[0, 0] == 0 and len(np.unique(labels[labels > 0])) == 3 and labels[3, 3] != labels[3, 7]
    grey = np.repeat((labels > 0).astype(np.uint8)[..., None] * 255, 3, axis=2)
    Image.fromarray(grey).save(tmp_path / "g.png")
    assert read_mask(tmp_path / "g.png").max() == 2  # binary stored as RGB: connected components


def test_semantic_scores_agree_with_monai_and_fail_for_a_wrong_map():
    from monai.metrics import compute_roc_auc

    from training.metrics import semantic_scores

    rng = np.random.default_rng(0)
    truth = rng.random((40, 50)) > 0.7
    prob = np.clip(truth * 60 + rng.normal(100, 50, truth.shape), 0, 255).astype(np.uint8)
    ref = float(compute_roc_auc(torch.tensor(prob.ravel() / 255.0), torch.tensor(truth.ravel().astype(float))))
    assert semantic_scores(prob, truth)["auc"] == pytest.approx(ref, abs=1e-12)
    perfect = semantic_scores(truth.astype(np.uint8) * 255, truth)
    assert perfect == {"auc": 1.0, "iou": 1.0, "dice": 1.0}
    assert semantic_scores((~truth).astype(np.uint8) * 255, truth)["auc"] == 0.0


def test_evaluate_semantic_scores_foreground_maps_upright_and_rotated(tmp_path, nuclei_dir):
    from typer.testing import CliRunner

    from gmrpath.cli import app

    result = CliRunner().invoke(app, ["evaluate", "classical", "--data", str(nuclei_dir), "--mpp", "0.5", "--semantic",
                                      "--angles", "0,90,45", "--limit", "2", "--out", str(tmp_path / "ev")])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "ev" / "evaluation.json").read_text())
    r = report["models"]["classical"]
    assert report["task"] == "semantic" and {"auc_upright", "iou_upright", "dice_upright", "dice_rotated_mean"} <= set(r)
    assert 0.8 < r["dice_upright"] <= 1.0 and 0.8 < r["auc_upright"] <= 1.0


def _reference_aji(gt: np.ndarray, pred: np.ndarray) -> float:
    """Kumar et al. (2017) AJI written out literally: loops over nuclei, no sparse tables."""
    used, inter_sum, union_sum = set(), 0, 0
    preds = [j for j in np.unique(pred) if j]
    for i in [i for i in np.unique(gt) if i]:
        g = gt == i
        best, best_j = -1.0, None
        for j in preds:
            p = pred == j
            iou = (g & p).sum() / (g | p).sum()
            if iou > best:
                best, best_j = iou, j
        if best > 0:
            p = pred == best_j
            inter_sum += (g & p).sum()
            union_sum += (g | p).sum()
            used.add(best_j)
        else:
            union_sum += g.sum()
    union_sum += sum((pred == j).sum() for j in preds if j not in used)
    return inter_sum / union_sum


@pytest.mark.parametrize("case", ["merge", "split", "shared", "miss_and_false", "random"])
def test_aji_matches_a_literal_reference(case):
    gt = np.zeros((30, 30), np.int32)
    gt[2:8, 2:8], gt[2:8, 9:15], gt[20:26, 20:26] = 1, 2, 3
    pred = np.zeros_like(gt)
    if case == "merge":  # one prediction covers two nuclei
        pred[2:8, 2:15], pred[20:26, 20:26] = 1, 2
    elif case == "split":  # one nucleus cut in two
        pred[2:8, 2:5], pred[2:8, 5:8], pred[2:8, 9:15], pred[20:26, 20:26] = 1, 2, 3, 4
    elif case == "shared":  # one prediction matched by several nuclei (the union counted once per match)
        pred[2:8, 4:13] = 1
        pred[20:26, 21:26] = 2
    elif case == "miss_and_false":
        pred[2:8, 2:8], pred[12:16, 12:16] = 1, 2
    else:
        rng = np.random.default_rng(3)
        pred = (rng.random(gt.shape) > 0.6) * rng.integers(1, 6, gt.shape)
    assert aji(gt, pred) == pytest.approx(_reference_aji(gt, pred), abs=1e-12)


def test_a_validation_loss_far_above_training_is_flagged():
    from training.loop import loss_warning

    line = loss_warning({"epoch": 3, "train_loss": 2.08, "val_loss": 7.672e5})
    assert line.startswith("warning: epoch 3: validation loss 7.672e+05 is over 100x the training loss 2.08")
    assert loss_warning({"epoch": 3, "train_loss": 2.08, "val_loss": 2.5}) == ""
    assert loss_warning({"epoch": 3, "train_loss": 0.4}) == ""  # segmentation rows have no val_loss


@pytest.mark.parametrize("command", ["train", "evaluate", "segment", "predict"])
def test_cli_threads_sets_torchs_thread_count(tmp_path, command):
    """--threads N on train, evaluate, segment and predict: torch uses N threads (runs sharing a machine each
    take their share); 0 is refused before anything starts."""
    import torch
    from typer.testing import CliRunner

    from gmrpath.cli import app

    path = write_cfg(tmp_path, epochs=-1)  # a config that is refused: the thread count is set before it is read
    args = {"train": ["train", str(path), "--set", f"data.root={tmp_path}"],
            "evaluate": ["evaluate", "classical", "--data", str(tmp_path)],  # no --mpp: refused after the threads are set
            "segment": ["segment", str(tmp_path / "missing.svs"), "--out", str(tmp_path / "o")],
            "predict": ["predict", str(tmp_path / "missing.svs"), "--out", str(tmp_path / "o")]}[command]
    before = torch.get_num_threads()
    wanted = 1 if before != 1 else 2
    try:
        result = CliRunner().invoke(app, args + ["--threads", str(wanted)])
        assert result.exit_code in (1, 2) and torch.get_num_threads() == wanted, result.output
    finally:
        torch.set_num_threads(before)
    result = CliRunner().invoke(app, args + ["--threads", "0"])
    assert result.exit_code == 2 and "--threads" in result.output


# --- binary-mask images added to training (data.extra, semantic) ------------------------------------------------

@pytest.fixture(scope="module")
def binary_dir(tmp_path_factory):
    """A CryoNuSeg-like set: 0/255 foreground masks (touching nuclei merged) and a split CSV naming only some images."""
    root = write_blob_set(tmp_path_factory.mktemp("binary"), ["bin_00", "bin_01", "bin_02"], seed=3, size=64, binary=True)
    (root / "split.csv").write_text("image,split\nbin_00,train\nbin_01,train\n")  # bin_02 is a test image: unused
    return root


def test_extra_binary_sets_only_add_training_images_without_a_distance_target(nuclei_dir, binary_dir):
    from training.samples import model_targets

    extra = DataConfig(kind="nuclei", root=str(binary_dir), labels="masks", mpp=0.5, semantic=True, split_csv=str(binary_dir / "split.csv"))
    cfg = DataConfig(kind="nuclei", root=str(nuclei_dir), mpp=0.5, val_fraction=0.4)
    plain = load_dataset(cfg, "segment", 0.5, 32)
    data = load_dataset(DataConfig(**{**cfg.__dict__, "extra": [extra]}), "segment", 0.5, 32)
    added = [s for s in data.train if s.semantic]
    assert sorted(s.name for s in added) == [f"{binary_dir.name}/bin_00", f"{binary_dir.name}/bin_01"]  # not bin_02
    assert [s.name for s in data.val] == [s.name for s in plain.val]  # validation is the main set's alone
    assert [s.name for s in data.train if not s.semantic] == [s.name for s in plain.train]
    assert data.digest != plain.digest
    t = model_targets(added[0])
    assert (t[..., 1] == -1).all() and np.array_equal(t[..., 0] > 0.5, added[0].labels > 0)
    assert (model_targets(data.train[0])[..., 1] >= 0).all()  # instance-mask images keep their distance target
    x, y = NucleiCrops(added, 32, 4)[0]
    assert (y[1] == -1).all() and y[0].max() > 0


def test_segment_loss_ignores_the_distance_of_binary_mask_images_and_is_unchanged_otherwise():
    from torch.nn import functional as F

    from training.loop import segment_loss

    torch.manual_seed(0)
    logits = torch.randn(2, 2, 16, 16)
    target = torch.rand(2, 2, 16, 16)
    target[:, 0] = (target[:, 0] > 0.5).float()
    # with every distance known, the loss is the original one (plain mean of the distance error)
    p, fg = logits[:, 0].sigmoid(), target[:, 0]
    err = (logits[:, 1].sigmoid() - target[:, 1]).square()
    near = F.max_pool2d(fg[:, None], 5, stride=1, padding=2)[:, 0]
    want = (F.binary_cross_entropy_with_logits(logits[:, 0], fg) + 1 - (2 * (p * fg).sum() + 1) / (p.sum() + fg.sum() + 1)
            + 2 * err.mean() + (err * near).sum() / near.sum())
    assert torch.allclose(segment_loss(logits, target, 1.0), want, atol=1e-6)
    # a binary-mask image (distance -1): its distance logits get no gradient, its foreground logits do
    target[1, 1] = -1
    logits.requires_grad_(True)
    segment_loss(logits, target, 1.0).backward()
    assert logits.grad[1, 1].abs().max() == 0 and logits.grad[1, 0].abs().max() > 0 and logits.grad[0, 1].abs().max() > 0


@pytest.mark.parametrize("extra, key", [
    ("nope", "data.extra"), ([{"kind": "folder", "mpp": 0.5}], r"data.extra\[0\]"), ([{"root": "x"}], r"data.extra\[0\].mpp"),
    ([{"mpp": 0.5, "bogus": 1}], r"data.extra\[0\]"), ([{"mpp": 0.5, "semantic": "yes"}], r"data.extra\[0\].semantic"),
])
def test_bad_extra_sets_name_the_key(tmp_path, extra, key):
    path = write_cfg(tmp_path, data={"extra": extra})
    with pytest.raises(TrainConfigError, match=key) as err:
        load_train_config(path, {"data": {"root": str(tmp_path)}})
    assert str(path) in str(err.value)


def test_extra_set_paths_are_resolved_and_checked(tmp_path, binary_dir):
    path = write_cfg(tmp_path, data={"extra": [{"root": str(binary_dir), "labels": "masks", "mpp": 0.5, "semantic": True,
                                                "split_csv": "split.csv"}]})
    with pytest.raises(TrainConfigError, match=r"data.extra\[0\].split_csv .* does not exist"):
        load_train_config(path, {"data": {"root": str(tmp_path)}})
    (tmp_path / "split.csv").write_text((binary_dir / "split.csv").read_text())
    cfg = load_train_config(path, {"data": {"root": str(tmp_path)}})
    assert cfg.data.extra[0].split_csv == str(tmp_path / "split.csv") and cfg.data.extra[0].semantic is True


def test_training_with_an_extra_binary_set_runs_and_counts_its_images(tmp_path, nuclei_dir, binary_dir):
    from training.loop import train

    path = write_cfg(tmp_path, epochs=1, select="last", postprocess="fixed", separation_weight=1.0, val_angles=[],
                     data={"extra": [{"root": str(binary_dir), "labels": "masks", "mpp": 0.5, "semantic": True,
                                      "split_csv": str(binary_dir / "split.csv")}]})
    lines = []
    summary = train(load_train_config(path, {"data": {"root": str(nuclei_dir)}}), log=lines.append)
    assert any(line.startswith("data: 5 train / 2 val images") for line in lines)  # 3 + the 2 named binary images
    assert summary["best_epoch"] == 1 and any("train_loss=" in line and "nan" not in line for line in lines)
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert saved["data"]["extra"][0]["semantic"] is True  # the run's config records the extra set


def test_leave_one_group_out_scores_each_group_once_next_to_the_classical_baseline(tmp_path, nuclei_dir):
    from training.crossval import cross_validate
    from training.evaluate import evaluate

    groups = {"img0": "a", "img1": "a", "img2": "b", "img3": "b", "img4": "c"}
    (tmp_path / "groups.csv").write_text("image,organ\n" + "".join(f"{k},{v}\n" for k, v in groups.items()))
    path = write_cfg(tmp_path, epochs=1, select="last", postprocess="fixed", val_angles=[],
                     data={"groups_csv": str(tmp_path / "groups.csv"), "group_column": "organ"})
    cfg = load_train_config(path, {"data": {"root": str(nuclei_dir)}})
    result = cross_validate(cfg, folds=3, log=lambda line: None)

    saved = json.loads((tmp_path / "run" / "cv.json").read_text())
    assert saved == json.loads(json.dumps(result))
    held_out = [f["groups"] for f in result["per_fold"]]
    assert all(len(g) == 1 for g in held_out) and sorted(g[0] for g in held_out) == ["a", "b", "c"]
    for fold in result["per_fold"]:
        names = [k for k, v in groups.items() if v == fold["groups"][0]]
        assert fold["n_val"] == len(names)
        direct = evaluate(["classical"], cfg.data, tmp_path / f"direct{fold['fold']}", task="segment", angles=[0],
                          images=names, log=lambda line: None)["models"]["classical"]
        assert fold["classical_dice_upright"] == pytest.approx(direct["dice_upright"], abs=1e-9)
        assert fold["classical_aji_upright"] == pytest.approx(direct["aji_upright"], abs=1e-9)
        assert 0.0 <= fold["aji_upright"] <= 1.0
    for key in ("dice_upright", "aji_upright", "classical_aji_upright"):
        values = [f[key] for f in result["per_fold"]]
        assert result["pooled"][key]["mean"] == pytest.approx(np.mean(values))
        assert result["pooled"][key]["sd"] == pytest.approx(np.std(values, ddof=1))

    grids = [f["postprocess_sensitivity"] for f in result["per_fold"]]  # out-of-fold threshold choice
    table = result["pooled_postprocess"]
    assert len(table) == len(grids[0]) > 1 and [r["aji"] for r in table] == sorted((r["aji"] for r in table), reverse=True)
    for row in table:
        same = [next(g for g in grid if (g["fg_threshold"], g["marker_h"]) == (row["fg_threshold"], row["marker_h"])) for grid in grids]
        assert row["aji"] == pytest.approx(np.mean([g["aji"] for g in same]))
        assert row["dice"] == pytest.approx(np.mean([g["dice"] for g in same]))

    from rich.console import Console

    from gmrpath.train import _cv_table

    console = Console(record=True, width=200)
    console.print(_cv_table(result, str(tmp_path / "run")))
    text = console.export_text()
    assert "classical aji" in text and "held out" in text and f"{result['pooled']['aji_upright']['mean']:.3f} ±" in text
    assert f"marker_h {table[0]['marker_h']}" in text

    lines = []  # a rerun trains nothing: every fold has its summary
    cross_validate(cfg, folds=3, log=lines.append)
    assert not any("training" in line for line in lines)


def test_cross_validation_runs_only_the_folds_asked_for(tmp_path, nuclei_dir):
    """--cv 3 --folds 1: fold 1 trains and is scored, folds 0 and 2 are not touched; cv.json says so."""
    from typer.testing import CliRunner

    from gmrpath.cli import app
    from training.crossval import cross_validate

    path = write_cfg(tmp_path, epochs=1, select="last", postprocess="fixed", val_angles=[])
    cfg = load_train_config(path, {"data": {"root": str(nuclei_dir)}})
    for bad in ([3], [-1], [1, 1], []):
        with pytest.raises(ValueError, match="folds to run"):
            cross_validate(cfg, folds=3, only=bad, log=lambda line: None)
    assert not (tmp_path / "run").exists()  # refused before anything trains

    result = cross_validate(cfg, folds=3, only=[1], log=lambda line: None)
    assert result["folds_run"] == [1] and [f["fold"] for f in result["per_fold"]] == [1]
    assert sorted(p.name for p in (tmp_path / "run").glob("fold*")) == ["fold1"]
    fold_log = (tmp_path / "run" / "fold1" / "train.log").read_text().splitlines()  # each fold keeps its log
    assert fold_log[0].startswith("data: ") and fold_log[-1].startswith("epoch=1 ") and len(fold_log) == 2
    assert result["pooled"]["aji_upright"] == {"mean": result["per_fold"][0]["aji_upright"], "sd": None}
    assert json.loads((tmp_path / "run" / "cv.json").read_text())["folds_run"] == [1]
    from rich.console import Console

    from gmrpath.train import _cv_table

    console = Console(record=True, width=200)
    console.print(_cv_table(result, str(tmp_path / "run")))
    assert "folds 1 only" in console.export_text() and "±" not in console.export_text()

    runner = CliRunner()
    for args, message in ((["--folds", "0"], "give --cv K too"), (["--cv", "3", "--folds", "0;2"], "separated by commas"),
                          (["--cv", "3", "--folds", "0,5"], "folds to run")):
        res = runner.invoke(app, ["train", str(path), "--set", f"data.root={nuclei_dir}", *args])
        assert res.exit_code != 0 and message in res.output, res.output
    assert sorted(p.name for p in (tmp_path / "run").glob("fold*")) == ["fold1"]


def test_evaluate_scores_every_checkpoint_under_a_given_post_processing(tmp_path, nuclei_dir):
    """--fg-threshold / --marker-h: the override's upright AJI is its own cell of the sensitivity table."""
    from training.evaluate import evaluate

    model = str(REPO / "models" / "nuclei_gmr_unet.pt")
    data = DataConfig(kind="nuclei", root=str(nuclei_dir), mpp=0.5, val_fraction=0.0)
    quiet = dict(task="segment", angles=[0], log=lambda line: None, device="cpu")
    plain = evaluate([model], data, tmp_path / "plain", sensitivity=True, **quiet)["models"][model]
    own = load_model(ModelSpec(task="segment", model=model, classes=["nucleus"])).meta["postprocess"]
    assert plain["postprocess"] == own  # the checkpoint's
    grid = {(g["fg_threshold"], g["marker_h"]): g for g in plain["postprocess_sensitivity"]}
    assert grid[(own["fg_threshold"], own["marker_h"])]["aji"] == pytest.approx(plain["aji_upright"])
    other = max(grid, key=lambda k: abs(grid[k]["aji"] - plain["aji_upright"]))
    assert abs(grid[other]["aji"] - plain["aji_upright"]) > 1e-3  # a setting that changes the score
    fg, h = other
    scored = evaluate([model], data, tmp_path / "set", postprocess={"fg_threshold": fg, "marker_h": h}, **quiet)["models"][model]
    assert scored["postprocess"] == PostProcess(**{**own, "fg_threshold": fg, "marker_h": h}).to_dict()  # the rest kept
    assert scored["aji_upright"] == pytest.approx(grid[other]["aji"]) and scored["dice_upright"] == pytest.approx(grid[other]["dice"])
    with pytest.raises(ValueError, match="marker_h must be"):
        evaluate([model], data, tmp_path / "bad", postprocess={"marker_h": 2.0}, **quiet)


def test_set_postprocess_changes_the_rule_and_nothing_else(tmp_path):
    import shutil

    from typer.testing import CliRunner

    from gmrpath.cli import app

    src = tmp_path / "m.pt"
    shutil.copy(REPO / "models" / "nuclei_gmr_unet.pt", src)
    before = torch.load(src, weights_only=True)
    result = CliRunner().invoke(app, ["set-postprocess", str(src), "--marker-h", "0.2", "--out", str(tmp_path / "n.pt"),
                                      "--note", "a test"])
    assert result.exit_code == 0, result.output
    assert torch.load(src, weights_only=True)["meta"] == before["meta"]  # --out: the source is untouched
    after = torch.load(tmp_path / "n.pt", weights_only=True)
    old_rule = PostProcess(**before["meta"]["postprocess"]).to_dict()  # fields added since it was saved take their defaults
    assert after["meta"]["postprocess"] == {**old_rule, "marker_h": 0.2}
    assert after["meta"]["postprocess_history"][-1] == {"from": old_rule, "to": after["meta"]["postprocess"], "note": "a test"}
    assert all(torch.equal(before["state_dict"][k], v) for k, v in after["state_dict"].items())
    assert {k: v for k, v in after.items() if k not in ("meta", "state_dict")} == \
        {k: v for k, v in before.items() if k not in ("meta", "state_dict")}
    loaded = load_model(ModelSpec(task="segment", model=str(tmp_path / "n.pt"), classes=["nucleus"]))
    assert loaded.meta["postprocess"]["marker_h"] == 0.2
    for args, match in (([str(src), "--marker-h", "1.5"], "marker_h must be"), ([str(src)], "--marker-h and/or --marker-h-dense"),
                        ([str(tmp_path / "missing.pt"), "--marker-h", "0.2"], "missing.pt")):
        bad = CliRunner().invoke(app, ["set-postprocess", *args])
        assert bad.exit_code != 0 and match in bad.output, bad.output
    assert torch.load(src, weights_only=True)["meta"] == before["meta"]  # a refused rule writes nothing
