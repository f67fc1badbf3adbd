"""One nuclei inference path: evaluation scores exactly what ``gmrpath segment`` writes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import zarr

from benchmarks.synthetic import read_demo_tissue, write_pyramidal_tiff
from conftest import DEMO_SLIDE, REPO
from pipeline.config import config_from_dict
from pipeline.infer import prepare_model
from pipeline.instances import PostProcess
from pipeline.models import load_model
from pipeline.nuclei import labels_to_native, read_block, segment_image
from pipeline.read import slide_from_array
from pipeline.segment import segment_slide
from pipeline.stages import slide_outputs
from training.datasets import Sample
from training.protocol import evaluate_nuclei_image

NUCLEI_MODEL = REPO / "models" / "nuclei_gmr_unet.pt"


def _same_partition(a: np.ndarray, b: np.ndarray) -> bool:
    """True when two label images split the pixels into the same objects (ids may differ)."""
    if not np.array_equal(a > 0, b > 0):
        return False
    pairs = np.unique(np.stack([a[a > 0], b[b > 0]]), axis=1)
    return len(np.unique(pairs[0])) == len(np.unique(pairs[1])) == pairs.shape[1]


@pytest.fixture(scope="module")
def crop_40x(tmp_path_factory):
    """A 40x crop of real tissue (0.25 um/px, losslessly stored: the file holds exactly the array)."""
    rgb = np.ascontiguousarray(read_demo_tissue(DEMO_SLIDE)[1100:1620, 700:1300])  # 520 x 600 px
    path = write_pyramidal_tiff(tmp_path_factory.mktemp("crop") / "crop40x.tif", rgb, mpp=0.25, levels=1, compression=None)
    return path, rgb


def test_evaluation_scores_what_segment_writes(crop_40x, tmp_path):
    path, rgb = crop_40x
    cfg = config_from_dict({"slides": str(path), "out": str(tmp_path), "classify": None,
                            "segment": {"preset": "nuclei", "model": str(NUCLEI_MODEL)}, "tissue": {"min_object_um2": 500}})
    summary = segment_slide(path, cfg, tmp_path, block_px=256)  # several blocks, each with its margin
    written = np.asarray(zarr.open_group(str(slide_outputs(tmp_path, "crop40x")["nuclei_zarr"]), mode="r")["labels/nuclei/0"][0])
    assert summary["nuclei_count"] > 20 and summary["blocks"] > 1

    loaded = prepare_model(load_model(cfg.segment), torch.device("cpu"))
    post = PostProcess(**loaded.meta["postprocess"])
    ids = segment_image(loaded.module, loaded.mean, loaded.std, rgb, 0.25, loaded.spec.mpp, post, block_px=256)
    assert ids.shape == written.shape == (260, 300)
    assert np.array_equal(ids, written)  # same blocks, margins, maps, post-processing and ids, bit for bit

    sample = Sample("crop40x", rgb, "g", native_image=rgb, native_labels=np.zeros(rgb.shape[:2], np.int32), native_mpp=0.25)
    # evaluate with the shipped block size (1024 px: one block here); the result is the same objects on the native grid
    ref = segment_image(loaded.module, loaded.mean, loaded.std, rgb, 0.25, loaded.spec.mpp, post)
    native, valid = evaluate_nuclei_image(loaded.module, sample, loaded.spec.mpp, torch.device("cpu"), post,
                                          mean=loaded.mean, std=loaded.std)
    assert native.shape == rgb.shape[:2] and valid.shape == rgb.shape[:2]
    assert _same_partition(native, labels_to_native(ref, rgb.shape[:2], 2.0))
    # a quarter turn of a non-square image: the same objects, turned back onto the upright grid
    turned, _ = evaluate_nuclei_image(loaded.module, sample, loaded.spec.mpp, torch.device("cpu"), post, angle=90,
                                      mean=loaded.mean, std=loaded.std)
    assert turned.shape == rgb.shape[:2] and _same_partition(turned, native)  # exact: the GMR U-Net is equivariant


def test_blocks_beyond_the_image_edge_are_reflected_not_white():
    img = np.random.default_rng(0).integers(0, 255, (30, 40, 3), dtype=np.uint8)
    slide = slide_from_array(img, 0.5)
    window = read_block(slide, (0, 0), (40, 30), 5, 0.5)
    assert window.shape == (40, 50, 3)
    assert np.array_equal(window[5:35, 5:45], img)
    assert np.array_equal(window[5:35, :5], img[:, 5:0:-1])  # reflected about the first column
    assert (window[:5] != 255).any()


def test_slide_from_array_rejects_bad_input():
    with pytest.raises(ValueError, match="uint8"):
        slide_from_array(np.zeros((4, 4), np.uint8), 0.5)
    with pytest.raises(ValueError, match="mpp"):
        slide_from_array(np.zeros((4, 4, 3), np.uint8), float("nan"))
