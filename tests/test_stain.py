"""Stain normalisation (pipeline.stain): stats and transfer, one mapping per slide, errors that name the
file, and the option carried from training through the checkpoint to `gmrpath segment` and evaluation."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from pipeline.stain import (STAIN_METHODS, check_stain_target, fit_stain_target, slide_stain_stats, stain_mapper,
                            stain_stats, stain_transfer)

DEMO = Path(__file__).resolve().parents[1] / "data" / "demo"


def he_crop(size: int = 256) -> np.ndarray:
    """Real H&E from the bundled demo slide (users' clones have it too)."""
    from benchmarks.synthetic import demo_slide_path
    from pipeline.read import open_slide, read_region

    slide = open_slide(demo_slide_path())
    w, h = slide.dimensions
    return read_region(slide, (w // 2 - size, h // 2 - size), (size, size), slide.mpp * 2)


def restain(image: np.ndarray, h_scale: float, e_scale: float) -> np.ndarray:
    """The same tissue with its haematoxylin and eosin scaled: another lab's staining."""
    from skimage.color import hed2rgb, rgb2hed

    hed = rgb2hed(image)
    hed[..., 0] *= h_scale
    hed[..., 1] *= e_scale
    return (np.clip(hed2rgb(hed), 0, 1) * 255).round().astype(np.uint8)


@pytest.mark.parametrize("method", ["macenko", "reinhard"])
def test_mapping_an_image_onto_its_own_stats_keeps_it(method):
    image = he_crop()
    stats = stain_stats(method, image)
    assert check_stain_target(json.loads(json.dumps(stats))) == stats  # plain JSON values
    out = stain_transfer(image, stats, stats)
    assert out.shape == image.shape and out.dtype == np.uint8
    assert np.abs(out.astype(int) - image).mean() < 4.0


@pytest.mark.parametrize("method,factor", [("macenko", 0.6), ("reinhard", 0.85)])
def test_another_labs_staining_is_brought_back_towards_the_reference(method, factor):
    """Macenko separates the stains and undoes most of the change; Reinhard matches LAB statistics only."""
    reference = he_crop()
    other = restain(reference, 0.55, 1.6)  # pale nuclei, strong eosin
    before = np.abs(other.astype(int) - reference).mean()
    after = np.abs(stain_transfer(other, stain_stats(method, other), stain_stats(method, reference)).astype(int) - reference).mean()
    assert after < factor * before, (before, after)


def test_bad_input_raises_one_clear_error(tmp_path):
    with pytest.raises(ValueError, match="must be one of"):
        stain_stats("ruifrok?", he_crop(64))
    with pytest.raises(ValueError, match="RGB uint8"):
        stain_stats("macenko", np.zeros((8, 8), np.uint8))
    with pytest.raises(ValueError, match="cannot separate the stains"):
        stain_stats("macenko", np.full((64, 64, 3), 255, np.uint8))
    with pytest.raises(ValueError, match="stain target"):
        check_stain_target({"method": "macenko", "stain_matrix": [[1, 2, 3]]})
    with pytest.raises(ValueError, match="source stats are reinhard"):
        image = he_crop(64)
        stain_transfer(image, stain_stats("reinhard", image), stain_stats("macenko", image))
    broken = tmp_path / "ref.png"
    broken.write_bytes(b"not an image")
    with pytest.raises(ValueError, match=r"ref.png: cannot read"):
        fit_stain_target("macenko", str(broken))
    blank = tmp_path / "blank.png"
    Image.fromarray(np.full((32, 32, 3), 255, np.uint8)).save(blank)
    with pytest.raises(ValueError, match=r"blank.png: cannot separate"):
        fit_stain_target("macenko", str(blank))


def test_a_slide_is_mapped_once_so_blocks_agree():
    """Every block of a slide gets the slide's mapping: blocks mapped apart equal the image mapped whole."""
    from pipeline.read import slide_from_array

    image = restain(he_crop(256), 0.6, 1.4)
    target = stain_stats("macenko", he_crop(256))
    slide = slide_from_array(image, 0.5)
    mapper = stain_mapper(slide, target, 0.5)
    whole = stain_transfer(image, slide_stain_stats(slide, "macenko", 0.5), target)
    blocks = np.concatenate([mapper(image[:, :128]), mapper(image[:, 128:])], axis=1)
    assert np.array_equal(blocks, whole)
    # re-estimating the stains per block (what TIAToolbox's normalisers do) would not agree
    per_block = np.concatenate([stain_transfer(b, stain_stats("macenko", b), target) for b in (image[:, :16], image[:, 16:])], axis=1)
    assert not np.array_equal(per_block, whole)
    assert stain_mapper(slide, None, 0.5) is None


def test_training_stores_the_target_and_segment_and_evaluate_use_it(tmp_path, monkeypatch):
    """A run with stain_norm maps its images, stores the reference's stats in best.pt; `gmrpath segment`
    and evaluation then map each image onto them (the output changes; evaluation measures each image's
    stains once, for all its angles), and --stain-norm none turns it off."""
    import tifffile
    import torch

    from pipeline.config import load_config
    from pipeline.models import load_model
    from pipeline.segment import segment_slide, segment_stain_target
    from training.config import load_train_config
    from training.evaluate import evaluate
    from training.loop import train

    root = tmp_path / "set"
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        crop = restain(he_crop(128), 1.0 + 0.3 * i, 1.0 - 0.2 * i)
        Image.fromarray(crop).save(root / "images" / f"img{i}.png")
        tifffile.imwrite(root / "labels" / f"img{i}.tif", (rng.random((128, 128)) > 0.8).astype(np.uint16))
    reference = tmp_path / "reference.png"
    Image.fromarray(he_crop(128)).save(reference)
    cfg = {"task": "segment", "model": "gmr_unet", "model_kwargs": {"base_channels": 4, "kernel_sizes": [3, 3]},
           "tile_px": 32, "mpp": 0.5, "epochs": 1, "batch_size": 2, "samples_per_epoch": 2, "num_workers": 0,
           "out": str(tmp_path / "run"), "select": "last", "postprocess": "fixed",
           "stain_norm": {"method": "macenko", "reference": str(reference)},
           "data": {"kind": "nuclei", "root": str(root), "mpp": 0.5, "val_fraction": 0.34, "seed": 0}}
    (tmp_path / "train.yaml").write_text(yaml.safe_dump(cfg))
    lines: list[str] = []
    train(load_train_config(tmp_path / "train.yaml"), log=lines.append)
    assert any("stain normalisation: 2 training images mapped onto reference.png" in line for line in lines)
    ckpt = tmp_path / "run" / "best.pt"
    stored = torch.load(ckpt, weights_only=True)["meta"]["stain_norm"]
    assert stored == fit_stain_target("macenko", str(reference))

    from pipeline.config import ModelSpec

    loaded = load_model(ModelSpec(task="segment", model=str(ckpt), classes=["nucleus"], tile_px=32, mpp=0.5))
    assert segment_stain_target(loaded.spec, loaded) == stored
    import dataclasses

    assert segment_stain_target(dataclasses.replace(loaded.spec, stain_norm="none"), loaded) is None

    slide = root / "images" / "img2.png"
    base = {"slides": str(root / "images"), "out": str(tmp_path / "out"), "mpp": 0.5, "classify": None,
            "segment": {"task": "segment", "model": str(ckpt), "classes": ["nucleus"], "tile_px": 32, "mpp": 0.5, "overlap_px": 8},
            "run": {"viewer": False}}
    (tmp_path / "seg.yaml").write_text(yaml.safe_dump(base))
    probs = {}
    for name, override in (("stored", None), ("none", "none")):
        seg_cfg = load_config(tmp_path / "seg.yaml")
        seg_cfg = dataclasses.replace(seg_cfg, segment=dataclasses.replace(seg_cfg.segment, stain_norm=override))
        summary = segment_slide(slide, seg_cfg, tmp_path / f"out_{name}", block_px=64)
        assert summary["stain_norm"] == (None if override else "macenko onto reference.png")
        import zarr

        probs[name] = np.asarray(zarr.open_group(str(tmp_path / f"out_{name}" / "img2" / "img2.nuclei.ome.zarr"), mode="r")["0"])
    assert not np.array_equal(probs["stored"], probs["none"])  # the mapping reached the network

    from training.config import DataConfig

    import pipeline.stain as stain

    data = DataConfig(kind="nuclei", root=str(root), mpp=0.5, val_fraction=0.0)
    measured, real = [], stain.slide_stain_stats
    monkeypatch.setattr(stain, "slide_stain_stats", lambda *a: (measured.append(a[0]), real(*a))[1])
    with_map = evaluate([str(ckpt)], data, tmp_path / "e1", angles=[0, 90, 45], log=lambda s: None, task="semantic")
    assert len(measured) == with_map["n"] == 3  # once per image, not once per angle
    monkeypatch.undo()
    without = evaluate([str(ckpt)], data, tmp_path / "e2", angles=[0], log=lambda s: None, task="semantic", stain_norm={})
    assert with_map["models"][str(ckpt)]["auc_upright"] != without["models"][str(ckpt)]["auc_upright"]


@pytest.mark.parametrize("bad", [{"method": "magic", "reference": "x.png"}, {"method": "macenko"},
                                 {"method": "macenko", "reference": "missing.png"}, "macenko"])
def test_training_config_rejects_a_bad_stain_norm(tmp_path, bad):
    from training.config import TrainConfigError, load_train_config

    (tmp_path / "t.yaml").write_text(yaml.safe_dump({"stain_norm": bad, "data": {"kind": "nuclei", "root": ".", "mpp": 0.5}}))
    with pytest.raises(TrainConfigError, match="stain_norm"):
        load_train_config(tmp_path / "t.yaml")


def test_pipeline_config_rejects_a_bad_stain_norm(tmp_path):
    from pipeline.config import ConfigError, load_config

    for bad in ("magic:ref.png", "macenko", "macenko:missing.png"):
        (tmp_path / "c.yaml").write_text(yaml.safe_dump({"slides": str(tmp_path), "classify": None,
                                                         "segment": {"task": "segment", "model": "gmr_unet", "classes": ["nucleus"],
                                                                     "tile_px": 128, "mpp": 0.5, "stain_norm": bad}}))
        with pytest.raises(ConfigError, match="stain_norm"):
            load_config(tmp_path / "c.yaml", need_slides=False)
    assert set(STAIN_METHODS) == {"macenko", "vahadane", "reinhard"}


def test_auto_reference_is_the_most_typical_image():
    """reference: auto picks the image whose stats sit nearest the set's median: the middle staining of five."""
    from pipeline.stain import typical_stats

    base = he_crop(128)
    images = {f"h{k}": restain(base, h, 1.0) for k, h in enumerate((0.5, 0.75, 1.0, 1.25, 1.5))}
    chosen = typical_stats({name: stain_stats("reinhard", image) for name, image in images.items()})
    assert chosen["reference"] == "h2"
    assert chosen == {**stain_stats("reinhard", images["h2"]), "reference": "h2"}
    with pytest.raises(ValueError, match="no images"):
        typical_stats({})


def test_cli_stain_norm_errors_are_one_line(tmp_path):
    from typer.testing import CliRunner

    from gmrpath.cli import app

    crop = tmp_path / "crop.png"
    Image.fromarray(he_crop(128)).save(crop)
    runner = CliRunner()
    result = runner.invoke(app, ["segment", str(crop), "--mpp", "0.5", "--out", str(tmp_path / "o"), "--stain-norm",
                                 f"magic:{crop}", "--no-viewer", "--device", "cpu"])
    assert result.exit_code == 1 and "stain normalisation method must be one of" in result.output
    result = runner.invoke(app, ["segment", str(crop), "--mpp", "0.5", "--out", str(tmp_path / "o"), "--stain-norm",
                                 f"macenko:{tmp_path / 'missing.png'}", "--no-viewer", "--device", "cpu"])
    assert result.exit_code == 1 and "missing.png: cannot read the stain reference image" in result.output
    result = runner.invoke(app, ["evaluate", "classical", "--data", str(tmp_path), "--mpp", "0.5", "--stain-norm", "macenko"])
    assert result.exit_code == 2 and "METHOD:REFERENCE_IMAGE" in result.output
    result = runner.invoke(app, ["segment", str(crop), "--mpp", "0.5", "--out", str(tmp_path / "o"), "--stain-norm",
                                 f"macenko:{crop}", "--no-viewer", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "o" / "crop" / "crop.nuclei.summary.json").read_text())
    assert summary["stain_norm"] == "macenko onto crop.png"


def test_rotated_copies_are_mapped_with_the_upright_stains(monkeypatch):
    """Evaluation maps every rotated copy of an image with the upright image's stain stats (a 45-degree
    copy, with its reflected corners, measures other stats of its own)."""
    import torch

    import pipeline.stain as stain
    from pipeline.read import slide_from_array
    from training.datasets import Sample
    from training.protocol import nuclei_block_maps, rotate_image

    image = restain(he_crop(128), 0.6, 1.4)
    target = stain_stats("macenko", he_crop(128))
    upright = slide_stain_stats(slide_from_array(image, 0.5), "macenko", 0.5)
    seen, real = [], stain.stain_transfer
    monkeypatch.setattr(stain, "stain_transfer", lambda window, source, tgt: (seen.append(source), real(window, source, tgt))[1])
    sample = Sample(name="x", image=image, group="x", native_image=image, native_mpp=0.5)
    module = torch.nn.Conv2d(3, 2, 1)

    def same(a, b) -> bool:
        return all(np.allclose(a[k], b[k], rtol=0, atol=1e-12) for k in ("stain_matrix", "max_concentration"))

    for angle in (0.0, 90.0, 45.0):
        seen.clear()
        nuclei_block_maps(module, sample, 0.5, torch.device("cpu"), angle, amp=False, stain_target=target)
        assert seen and all(same(s, upright) for s in seen), angle
    own = slide_stain_stats(slide_from_array(rotate_image(image, 45.0), 0.5), "macenko", 0.5)
    assert not same(own, upright)
