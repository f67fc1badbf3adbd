"""Tile sets that stream (NCT-CRC-HE-100K and PCam layouts, generated here from the real demo tissue):
indexing reads no pixel, items are read per worker, bad files are named mid-run (or skipped and
listed), PCam's split files and .h5.gz; and the whole path a user with the real data runs:
train one epoch -> evaluate at rotations and flips -> predict the demo slide with the checkpoint."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from benchmarks.synthetic import NCT_CRC_CLASSES, read_demo_tissue, tissue_tiles, write_pcam_h5, write_tile_folder
from conftest import DEMO_SLIDE
from gmrpath.cli import app
from training.config import DataConfig
from training.datasets import DataError, resample_image
from training.tilesets import batches as _batches, fit_tile, tile_sets, tile_split, unpacked_h5

TINY_RESNET = {"base_channels": 4, "kernel_sizes": [5, 3, 3, 3]}


@pytest.fixture(scope="module")
def tiles224():
    return tissue_tiles(read_demo_tissue(DEMO_SLIDE), 12, 224, seed=0)


@pytest.fixture(scope="module")
def nct(tmp_path_factory, tiles224):
    """NCT-CRC-HE-100K (train) and CRC-VAL-HE-7K (validation) layouts: 9 class folders of TIFFs."""
    root = tmp_path_factory.mktemp("nct")
    write_tile_folder(root / "NCT-CRC-HE-100K", tiles224, 27)
    write_tile_folder(root / "CRC-VAL-HE-7K", tiles224[::-1], 18)
    return root


def test_indexing_decodes_nothing_and_items_match_the_files(tmp_path, tiles224):
    root = write_tile_folder(tmp_path / "set", tiles224, 18, classes=("A", "B"))
    (root / "A" / "A-000000.tif").write_bytes(b"not a tiff")  # found only when read
    data = tile_sets(DataConfig(kind="folder", root=str(root), mpp=0.5, val_fraction=0.0), 0.5, 224)
    assert data.classes == ["A", "B"] and len(data.train) == 18 and data.val is None
    raw = data.train.view(raw=True)
    i = data.train.names.index("B/B-000001")
    x, label, err = raw[i]
    assert label == 1 and err == "" and torch.equal(x, torch.from_numpy(tiles224[1]))
    with pytest.raises(DataError, match="A-000000.tif: cannot decode"):
        raw[data.train.names.index("A/A-000000")]
    # another resolution: resampled to the model's, then centre-cropped (never stretched)
    small = tile_sets(DataConfig(kind="folder", root=str(root), mpp=0.25, val_fraction=0.0), 0.5, 96).train.view(raw=True)
    assert torch.equal(small[i][0], torch.from_numpy(fit_tile(resample_image(tiles224[1], 0.25, 0.5), 96)))


def test_a_bad_file_mid_epoch_is_one_line_or_skipped_and_listed(tmp_path, tiles224):
    root = write_tile_folder(tmp_path / "set", tiles224, 8, classes=("A", "B"))
    bad_file = root / "B" / "B-000003.tif"
    bad_file.unlink()
    bad_file.write_bytes(b"\x00" * 100)
    cfg = DataConfig(kind="folder", root=str(root), mpp=0.5, val_fraction=0.0)
    stream = tile_sets(cfg, 0.5, 64).train.view()
    loader = torch.utils.data.DataLoader(stream, batch_size=4, num_workers=1)
    with pytest.raises(DataError) as err:
        list(_batches(loader, []))
    assert str(err.value).startswith(str(bad_file)) and "\n" not in str(err.value)  # no worker traceback
    skipping = tile_sets(cfg, 0.5, 64, skip_bad=True).train.view()
    bad: list[str] = []
    got = list(_batches(torch.utils.data.DataLoader(skipping, batch_size=4, num_workers=1), bad))
    assert sum(len(y) for _, y in got) == 7 and len(bad) == 1 and str(bad_file) in bad[0]


def test_h5_rows_are_read_per_item_in_each_worker(tmp_path, tiles224):
    tiles = tiles224[:, :96, :96]
    write_pcam_h5(tmp_path, "all", tiles, 40, chunk_rows=1, compression="gzip")  # no PCam split name: split by rows
    data = tile_sets(DataConfig(kind="h5", root=str(tmp_path), mpp=0.972, val_fraction=0.25, seed=1), 0.972, 96)
    assert len(data.train) == 30 and len(data.val) == 10
    assert not set(data.train.rows) & set(data.val.rows)
    raw = data.train.view(raw=True)
    assert torch.equal(raw[3][0], torch.from_numpy(tiles[int(data.train.rows[3]) % len(tiles)]))
    # two workers open their own handles: the same items as in this process
    loader = torch.utils.data.DataLoader(raw, batch_size=8, num_workers=2)
    assert torch.equal(torch.cat([b[0] for b in loader]), torch.stack([raw[i][0] for i in range(len(raw))]))


def test_pcam_split_files_gzipped_as_distributed(tmp_path, tiles224):
    tiles = tiles224[:, :96, :96]
    for split, n in (("train", 24), ("valid", 8), ("test", 12)):
        write_pcam_h5(tmp_path, split, tiles, n, gz=True)
    lines: list[str] = []
    data = tile_sets(DataConfig(kind="h5", root=str(tmp_path), mpp=0.972), 0.972, 96, log=lines.append)
    assert (len(data.train), len(data.val), len(data.test)) == (24, 8, 12)
    assert sum("unpacking" in line for line in lines) == 6
    unpacked = tmp_path / "camelyonpatch_level_2_split_train_x.h5"
    stamp = unpacked.stat().st_mtime_ns
    assert unpacked_h5(Path(f"{unpacked}.gz"), log=lines.append) == unpacked and unpacked.stat().st_mtime_ns == stamp
    test, classes, _ = tile_split(DataConfig(kind="h5", root=str(tmp_path), mpp=0.972), "test", 0.972, 96)
    assert len(test) == 12 and classes == ["normal", "tumour"]
    broken = tmp_path / "b"
    broken.mkdir()
    (broken / "camelyonpatch_level_2_split_train_x.h5.gz").write_bytes(b"\x1f\x8b\x08\x00garbage")
    (broken / "camelyonpatch_level_2_split_train_y.h5").write_bytes(b"")
    with pytest.raises(DataError, match="train_x.h5.gz: cannot unpack"):
        tile_sets(DataConfig(kind="h5", root=str(broken), mpp=0.972), 0.972, 96, log=lambda s: None)
    assert not list(broken.glob("*.part")) and not (broken / "camelyonpatch_level_2_split_train_x.h5").exists()


def test_val_root_is_the_validation_side(nct, tmp_path, tiles224):
    data = tile_sets(DataConfig(kind="folder", root=str(nct / "NCT-CRC-HE-100K"), val_root=str(nct / "CRC-VAL-HE-7K"),
                                mpp=0.5), 0.5, 224)
    assert data.classes == list(NCT_CRC_CLASSES) and (len(data.train), len(data.val)) == (27, 18)
    odd = write_tile_folder(tmp_path / "odd", tiles224, 2, classes=("ADI", "XYZ"))
    with pytest.raises(DataError, match="label 'XYZ' is not one of the classes"):
        tile_sets(DataConfig(kind="folder", root=str(nct / "NCT-CRC-HE-100K"), val_root=str(odd), mpp=0.5), 0.5, 224)


def _write_config(path: Path, **over) -> Path:
    cfg = yaml.safe_load(Path("configs/train_nct_crc_gmr.yaml").read_text())
    cfg.update(over)
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_nct_crc_recipe_trains_evaluates_and_predicts_the_demo_slide(nct, tmp_path):
    """The user's path with the real data, on its layout: the paper's config (shrunk only in size and
    length), one epoch -> evaluate on CRC-VAL-HE-7K at rotations and flips -> predict with the preset."""
    config = _write_config(tmp_path / "nct.yaml", model_kwargs=TINY_RESNET, epochs=1, batch_size=8, num_workers=1,
                           out=str(tmp_path / "run"),
                           data={"kind": "folder", "root": str(nct / "NCT-CRC-HE-100K"), "val_root": str(nct / "CRC-VAL-HE-7K"),
                                 "mpp": 0.5})
    runner = CliRunner()
    result = runner.invoke(app, ["train", str(config), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "27 train / 18 val tiles" in result.output
    log_lines = (tmp_path / "run" / "train.log").read_text().splitlines()  # the run's log, as printed
    assert "27 train / 18 val tiles" in log_lines[0] and log_lines[-1].startswith("epoch=1 ")
    ckpt = tmp_path / "run" / "best.pt"
    meta = torch.load(ckpt, weights_only=True)["meta"]
    assert meta["train_tiles"] == 27 and meta["val_tiles"] == 18 and "train_images" not in meta
    result = runner.invoke(app, ["evaluate", str(ckpt), "--data", str(nct / "CRC-VAL-HE-7K"), "--mpp", "0.5",
                                 "--angles", "0:360:45", "--out", str(tmp_path / "eval"), "--workers", "1"])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "eval" / "evaluation.json").read_text())
    r = report["models"][str(ckpt)]
    assert report["n"] == 18 and len(r["accuracy_per_angle"]) == 8 and set(r["accuracy_flips"]) == {"horizontal", "vertical"}
    # exact D4 invariance of the GMR network: quarter turns and flips score as upright
    assert r["accuracy_per_angle"]["90.0"] == r["accuracy_per_angle"]["180.0"] == r["accuracy_upright"]
    assert set(r["accuracy_flips"].values()) == {r["accuracy_upright"]}
    result = runner.invoke(app, ["predict", str(DEMO_SLIDE), "--model", str(ckpt),  # the default config: preset nct_crc
                                 "--out", str(tmp_path / "pred"), "--device", "cpu", "--num-workers", "0"])
    assert result.exit_code == 0, result.output
    summary = json.loads(next((tmp_path / "pred").rglob("*.summary.json")).read_text())
    assert list(summary["class_fraction"]) == list(NCT_CRC_CLASSES) and summary["trained"] is True


def test_pcam_recipe_trains_and_evaluates_the_test_file(tmp_path, tiles224):
    tiles = tiles224[:, :96, :96]
    for split, n in (("train", 32), ("valid", 8), ("test", 8)):
        write_pcam_h5(tmp_path / "pcam", split, tiles, n, gz=split == "test")
    cfg = yaml.safe_load(Path("configs/train_pcam_gmr.yaml").read_text())
    cfg.update(model_kwargs=TINY_RESNET, epochs=1, batch_size=16, num_workers=0, out=str(tmp_path / "run"),
               data={**cfg["data"], "root": str(tmp_path / "pcam")})
    (tmp_path / "pcam.yaml").write_text(yaml.safe_dump(cfg))
    runner = CliRunner()
    result = runner.invoke(app, ["train", str(tmp_path / "pcam.yaml"), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "32 train / 8 val tiles" in result.output
    result = runner.invoke(app, ["evaluate", str(tmp_path / "run" / "best.pt"), "--data", str(tmp_path / "pcam"),
                                 "--mpp", "0.972", "--split", "test", "--angles", "0,90", "--out", str(tmp_path / "eval"),
                                 "--workers", "0"])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "eval" / "evaluation.json").read_text())
    assert report["n"] == 8 and "auc_upright" in report["models"][str(tmp_path / "run" / "best.pt")]


def test_skip_bad_lists_the_file_and_training_goes_on(tmp_path, tiles224):
    root = write_tile_folder(tmp_path / "set", tiles224[:, :64, :64], 12, classes=("A", "B"), link=False)
    (root / "A" / "A-000004.tif").write_bytes(b"broken")
    base = {"task": "classify", "model": "gmr_resnet18", "model_kwargs": TINY_RESNET, "tile_px": 64, "mpp": 0.5, "epochs": 1,
            "batch_size": 4, "num_workers": 0, "out": str(tmp_path / "run"), "select": "val_accuracy",
            "data": {"kind": "folder", "root": str(root), "mpp": 0.5, "val_fraction": 0.0}}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(base))
    runner = CliRunner()
    result = runner.invoke(app, ["train", str(tmp_path / "c.yaml"), "--device", "cpu"])
    assert result.exit_code == 1 and "A-000004.tif: cannot decode" in result.output and "Traceback" not in result.output
    result = runner.invoke(app, ["train", str(tmp_path / "c.yaml"), "--device", "cpu", "--skip-bad"])
    assert result.exit_code == 0, result.output
    assert "A-000004.tif" in (tmp_path / "run" / "skipped.txt").read_text()


@pytest.mark.parametrize("config", ["train_nct_crc_gmr", "train_nct_crc_resnet", "train_pcam_gmr", "train_pcam_resnet"])
def test_paper_recipes_are_the_papers_settings(config):
    from training.config import load_train_config

    cfg = load_train_config(f"configs/{config}.yaml", check_paths=False)
    nct = "nct" in config
    assert (cfg.tile_px, cfg.batch_size, cfg.epochs) == ((224, 24, 50) if nct else (96, 64, 100))
    assert (cfg.optim.name, cfg.optim.lr, cfg.task, cfg.augment.geometric) == ("sgd", 0.02, "classify", False)
    assert cfg.model == ("gmr_resnet18" if "gmr" in config else "resnet18")
    twin = load_train_config(f"configs/{config.replace('gmr', 'resnet') if 'gmr' in config else config.replace('resnet', 'gmr')}.yaml",
                             check_paths=False)
    # the twins differ in the network only
    import dataclasses

    strip = lambda c: {k: v for k, v in dataclasses.asdict(c).items() if k not in ("model", "model_kwargs", "out")}  # noqa: E731
    assert strip(cfg) == strip(twin)
    assert os.path.basename(cfg.data.root) == ("NCT-CRC-HE-100K" if nct else "pcam")
    # --set model_kwargs.base_channels=8 narrows the network and keeps its kernels
    narrow = load_train_config(f"configs/{config}.yaml", {"model_kwargs": {"base_channels": 8}}, check_paths=False)
    assert narrow.model_kwargs == {**cfg.model_kwargs, "base_channels": 8}
