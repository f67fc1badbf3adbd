"""Nuclei segmentation end to end (generated slide from the real tissue), its resume, the cohort
report, and the Snakemake workflow over a folder with one good and one corrupt slide."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import uuid

import numpy as np
import pytest
import yaml
import zarr

from benchmarks.synthetic import read_demo_tissue, write_pyramidal_tiff
from conftest import DEMO_SLIDE, REPO
from pipeline.config import config_from_dict
from pipeline.predict import slide_outputs
from pipeline.report import write_cohort
from pipeline.segment import segment_slide

DEMO = DEMO_SLIDE
TINY_UNET = {"base_channels": 4, "kernel_sizes": [3, 3, 3]}


@pytest.fixture(scope="module")
def small_slide(tmp_path_factory):
    rgb = read_demo_tissue(DEMO)[1000:1768, 600:1368]  # 768 x 768 px of real tissue
    return write_pyramidal_tiff(tmp_path_factory.mktemp("seg") / "crop.tif", rgb, mpp=0.5, levels=2)


def _seg_cfg(slide, out):
    return config_from_dict({
        "slides": str(slide), "out": str(out), "classify": None,
        "segment": {"preset": "nuclei", "model_kwargs": TINY_UNET, "tile_px": 128, "overlap_px": 16},
        "tissue": {"min_object_um2": 500},
        "run": {"batch_size": 4},
    })


def _threshold_for_untrained(cfg, slide) -> float:
    """An untrained U-Net's probabilities sit in a narrow band: threshold at their 90th percentile
    so that the plumbing below sees a realistic number of objects."""
    import torch

    from pipeline.infer import prepare_model, segment_logits
    from pipeline.models import load_model
    from pipeline.read import open_slide, read_region

    loaded = prepare_model(load_model(cfg.segment), torch.device("cpu"))
    region = torch.from_numpy(read_region(open_slide(slide), (0, 0), (256, 256), 0.5))
    return float(np.quantile(segment_logits(loaded, region, torch.device("cpu"), 128, 16, 4).numpy(), 0.9))


def test_segment_writes_labels_detections_and_resumes_identically(small_slide, tmp_path):
    ref_cfg = _seg_cfg(small_slide, tmp_path / "ref")
    thr = _threshold_for_untrained(ref_cfg, small_slide)
    ref = segment_slide(small_slide, ref_cfg, ref_cfg.out, block_px=256, threshold=thr)
    paths = slide_outputs(ref_cfg.out, "crop")
    store = zarr.open_group(str(paths["nuclei_zarr"]), mode="r")
    assert store.attrs["ome"]["version"] == "0.5"
    assert store["0"].shape == (1, 768, 768)
    labels = np.asarray(store["labels/nuclei/0"][0])
    n_labels = len(np.unique(labels[labels > 0]))
    assert ref["nuclei_count"] == n_labels > 0
    assert "1" in store["labels/nuclei"]  # a pyramid level below the full resolution
    fc = json.loads(paths["nuclei_geojson"].read_text())
    assert len(fc["features"]) == n_labels
    for f in fc["features"][:20]:
        uuid.UUID(f["id"])
        assert f["properties"]["objectType"] == "detection"
        ring = f["geometry"]["coordinates"][0]
        assert ring[0] == ring[-1] and len(ring) >= 4
    # interrupted after one block, then resumed: the same store
    cfg = _seg_cfg(small_slide, tmp_path / "resumed")
    with pytest.raises(KeyboardInterrupt):
        segment_slide(small_slide, cfg, cfg.out, block_px=256, threshold=thr, stop_after_blocks=1)
    again = segment_slide(small_slide, cfg, cfg.out, block_px=256, threshold=thr)
    other = zarr.open_group(str(slide_outputs(cfg.out, "crop")["nuclei_zarr"]), mode="r")
    assert np.array_equal(np.asarray(other["0"][:]), np.asarray(store["0"][:]))
    assert np.array_equal(np.asarray(other["labels/nuclei/0"][:]), np.asarray(store["labels/nuclei/0"][:]))
    assert again["nuclei_count"] == ref["nuclei_count"]
    from ome_zarr_models.v05.image import Image
    from ome_zarr_models.v05.image_label import ImageLabel

    Image.from_zarr(store)
    ImageLabel.from_zarr(store["labels/nuclei"])


def test_snakemake_runs_every_good_slide_and_reports_the_bad_one(tmp_path):
    slides = tmp_path / "slides"
    slides.mkdir()
    shutil.copy(DEMO, slides / "good.svs")
    (slides / "broken.svs").write_bytes(b"not a slide at all")
    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump({
        "slides": str(slides), "out": str(tmp_path / "out"),
        "classify": {"preset": "nct_crc", "model_kwargs": {"base_channels": 4, "kernel_sizes": [5, 5, 3, 3]}},
        "run": {"num_workers": 0},
    }))
    cmd = [sys.executable, "-m", "snakemake", "--cores", "2", "--configfile", str(cfg), "--directory", str(REPO),
           "--snakefile", str(REPO / "Snakefile")]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0  # the broken slide fails ...
    out = tmp_path / "out"
    assert (out / "good" / "good.summary.json").is_file()  # ... and the good one still finishes
    assert (out / "good" / "good.classify.ome.zarr" / "zarr.json").is_file()
    log = (out / "logs" / "broken.tissue.log").read_text()
    assert "broken.svs" in log and "not a readable slide" in log
    # a second run would redo only the broken slide's jobs
    proc2 = subprocess.run(cmd + ["--dry-run"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert "slide=broken" in proc2.stdout and "slide=good" not in proc2.stdout
    # the cohort step over what finished
    csv_path, html_path = write_cohort(out)
    assert "good" in csv_path.read_text() and "good.overlay.png" in html_path.read_text()


def test_snakemake_rejects_a_bad_config_before_any_work(tmp_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(yaml.safe_dump({"slides": str(DEMO), "out": str(tmp_path / "o"), "run": {"batchsize": 3}}))
    proc = subprocess.run([sys.executable, "-m", "snakemake", "--cores", "1", "--configfile", str(cfg), "-n"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "batchsize" in proc.stdout + proc.stderr
    assert not (tmp_path / "o").exists()
