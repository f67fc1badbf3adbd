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
from pipeline.stages import slide_outputs
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
        "segment": {"preset": "nuclei", "model": "gmr_unet", "model_kwargs": TINY_UNET, "tile_px": 128, "overlap_px": 16},
        "tissue": {"min_object_um2": 500},
        "run": {"batch_size": 4},
    })


def _threshold_for_untrained(cfg, slide) -> float:
    """An untrained U-Net's probabilities sit in a narrow band: threshold at their 90th percentile
    so that the plumbing below sees a realistic number of objects."""
    import torch

    from pipeline.infer import prepare_model, segment_maps
    from pipeline.models import load_model
    from pipeline.read import open_slide, read_region

    loaded = prepare_model(load_model(cfg.segment), torch.device("cpu"))
    region = torch.from_numpy(read_region(open_slide(slide), (0, 0), (256, 256), 0.5))
    return float(np.quantile(segment_maps(loaded.module, region, loaded.mean, loaded.std, torch.device("cpu"))[0], 0.9))


def _with_threshold(cfg, threshold: float):
    """``cfg`` with its segmenter's foreground threshold set (the config's ``segment.postprocess``)."""
    import dataclasses

    return dataclasses.replace(cfg, segment=dataclasses.replace(cfg.segment, postprocess={"fg_threshold": threshold}))


def test_postprocess_overrides_reach_the_segmentation_and_its_record(small_slide, tmp_path):
    """The config's segment.postprocess replaces the shipped checkpoint's: recorded, and a higher marker merges."""
    import torch

    from pipeline.instances import PostProcess

    shipped = torch.load(REPO / "models" / "nuclei_gmr_unet.pt", weights_only=True)["meta"]["postprocess"]
    counts = {}
    for h in (0.05, 0.5):
        cfg = config_from_dict({"slides": str(small_slide), "out": str(tmp_path / f"h{h}"), "classify": None,
                                "segment": {"preset": "nuclei", "postprocess": {"marker_h": h}}, "run": {"device": "cpu"}})
        summary = segment_slide(small_slide, cfg, cfg.out, block_px=768)
        assert summary["postprocess"] == PostProcess(**{**shipped, "marker_h": h}).to_dict()  # the rest: the checkpoint's
        counts[h] = summary["nuclei_count"]
    assert counts[0.05] > counts[0.5] > 0


def test_segment_writes_labels_detections_and_resumes_identically(small_slide, tmp_path):
    ref_cfg = _seg_cfg(small_slide, tmp_path / "ref")
    thr = _threshold_for_untrained(ref_cfg, small_slide)
    ref = segment_slide(small_slide, _with_threshold(ref_cfg, thr), ref_cfg.out, block_px=256)
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
        segment_slide(small_slide, _with_threshold(cfg, thr), cfg.out, block_px=256, stop_after_blocks=1)
    again = segment_slide(small_slide, _with_threshold(cfg, thr), cfg.out, block_px=256)
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
    (slides / "gone.svs").symlink_to(tmp_path / "moved-away.svs")  # dangling
    (slides / "folder.svs").mkdir()
    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump({
        "slides": str(slides), "out": str(tmp_path / "out"),
        "classify": {"preset": "nct_crc", "model_kwargs": {"base_channels": 4, "kernel_sizes": [5, 5, 3, 3]}},
        "segment": None, "run": {"num_workers": 0},
    }))
    cmd = [sys.executable, "-m", "snakemake", "--cores", "2", "--configfile", str(cfg), "--directory", str(REPO),
           "--snakefile", str(REPO / "Snakefile")]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0  # the broken slide fails ...
    out = tmp_path / "out"
    assert (out / "good" / "good.summary.json").is_file()  # ... and the good one still finishes
    assert (out / "good" / "good.classify.ome.zarr" / "zarr.json").is_file()
    assert not list((out / "good" / "good.classify.ome.zarr").rglob(".snakemake_timestamp"))
    log = (out / "logs" / "broken.tissue.log").read_text()
    assert "broken.svs" in log and "not a readable slide" in log
    assert len(log.strip().splitlines()) == 1  # one line, however long
    assert "gone.svs" in proc.stderr and "folder.svs" in proc.stderr  # reported and skipped
    # the workflow still wrote the cohort table and report, failed slides listed with their error
    page, table = (out / "report.html").read_text(), (out / "cohort.csv").read_text()
    assert "good.overlay.png" in page and "good" in table
    for name in ("broken", "gone", "folder"):
        assert name in page and name in table
    assert "not a readable slide" in page and "dangling" in page
    # a second run would redo only the broken slide's jobs
    proc2 = subprocess.run(cmd + ["--dry-run"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert "slide=broken" in proc2.stdout and "slide=good" not in proc2.stdout
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


def test_snakemake_train_rule_gives_the_run_its_threads():
    """The training rule passes Snakemake's thread count to `gmrpath train --threads`, so runs that
    Snakemake schedules side by side do not oversubscribe the cores."""
    proc = subprocess.run([sys.executable, "-m", "snakemake", "--cores", "1", "-n", "-p", "-F", "results/train/kather_gmr/summary.json"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "train configs/train_kather_gmr.yaml --threads 1 " in proc.stdout + proc.stderr


def _ring_area_centroid(ring):
    a = cx = cy = 0.0
    for (x0, y0), (x1, y1) in zip(ring[:-1], ring[1:]):
        cross = x0 * y1 - x1 * y0
        a += cross
        cx += (x0 + x1) * cross
        cy += (y0 + y1) * cross
    return a / 2, cx / (3 * a), cy / (3 * a)


def ndimage_erode(mask, px):
    from scipy import ndimage

    return ndimage.binary_erosion(mask, iterations=px, border_value=1)


def test_segment_is_independent_of_blocks_and_outlines_match_the_mask(small_slide, tmp_path):
    """Blocks of 128 px and one block of 768 px give the same probability and the same nucleus ids
    (the margin covers the receptive field; ids come from centroids), each nucleus on a block edge
    is one detection, and every detection's polygon has the mask's area and centroid."""
    cfg = _seg_cfg(small_slide, tmp_path / "one")
    thr = _threshold_for_untrained(cfg, small_slide)
    segment_slide(small_slide, _with_threshold(cfg, thr), cfg.out, block_px=768)
    cfg_small = _seg_cfg(small_slide, tmp_path / "many")
    many = segment_slide(small_slide, _with_threshold(cfg_small, thr), cfg_small.out, block_px=128)
    one_store = zarr.open_group(str(slide_outputs(cfg.out, "crop")["nuclei_zarr"]), mode="r")
    many_store = zarr.open_group(str(slide_outputs(cfg_small.out, "crop")["nuclei_zarr"]), mode="r")
    p1, p2 = np.asarray(one_store["0"][0]).astype(int), np.asarray(many_store["0"][0]).astype(int)
    done = np.kron(p2.reshape(6, 128, 6, 128).any(axis=(1, 3)), np.ones((128, 128), bool))  # blocks on tissue
    assert 0.3 < done.mean() < 1
    assert np.abs(p1 - p2)[done].max() <= 1 and (p1 != p2)[done].mean() < 1e-3  # no seams: float rounding only
    l1, l2 = np.asarray(one_store["labels/nuclei/0"][0]), np.asarray(many_store["labels/nuclei/0"][0])
    inner = ndimage_erode(done, 40)  # away from skipped blocks, whose nuclei the 768 px block also has
    # objects smaller than the margin (nuclei) come out the same whatever the blocks: same pixels, same id
    margin = many["margin_px"]
    from scipy import ndimage

    values = np.unique(l1[l1 > 0])
    compact = np.searchsorted(values, l1) + 1
    compact[l1 == 0] = 0
    small = np.zeros(values.size + 1, bool)
    for k, sl in enumerate(ndimage.find_objects(compact), start=1):
        small[k] = sl is not None and max(sl[0].stop - sl[0].start, sl[1].stop - sl[1].start) < margin
    region = inner & small[compact]
    assert region.sum() > 1000 and (l1 != l2)[region].mean() < 1e-4
    edge = np.zeros(l2.shape, bool)
    edge[:, 127::128] = edge[:, 128::128] = True
    crossing = np.unique(l2[edge & (l2 > 0) & (np.roll(l2, -1, axis=1) == l2)])
    assert len(crossing) >= 3  # nuclei that straddle block edges exist, and each has one id on both sides
    fc = json.loads(slide_outputs(cfg_small.out, "crop")["nuclei_geojson"].read_text())
    assert len(fc["features"]) == many["nuclei_count"] == len(np.unique(l2[l2 > 0]))
    from scipy import ndimage

    ids = np.unique(l2[l2 > 0])
    areas = ndimage.sum(np.ones_like(l2), l2, ids)
    cents = ndimage.center_of_mass(np.ones_like(l2), l2, ids)
    from pipeline.write_geojson import _NAMESPACE

    by_id = {f["id"]: f for f in fc["features"]}
    checked = 0
    for value, area, (cy, cx) in zip(ids, areas, cents):
        f = by_id[str(uuid.uuid5(_NAMESPACE, f"crop:nucleus:{int(value)}"))]
        assert f["properties"]["measurements"]["area px"] == area
        if ndimage.label(l2 == value)[1] != 1:
            continue  # pieces touching only diagonally: the polygon keeps the largest
        rings = f["geometry"]["coordinates"]
        a, px, py = _ring_area_centroid(rings[0])
        holes = [_ring_area_centroid(h) for h in rings[1:]]
        total = a + sum(h[0] for h in holes)
        assert total == pytest.approx(area)  # pixel edges: the polygon has the mask's area...
        mx = (a * px + sum(h[0] * h[1] for h in holes)) / total
        my = (a * py + sum(h[0] * h[2] for h in holes)) / total
        assert mx == pytest.approx(cx + 0.5) and my == pytest.approx(cy + 0.5)  # ...and its centroid (QuPath: pixel = unit square)
        checked += 1
    assert checked >= 10


def test_every_pyramid_level_is_registered_with_level_0(small_slide, tmp_path):
    cfg = _seg_cfg(small_slide, tmp_path / "p")
    segment_slide(small_slide, _with_threshold(cfg, _threshold_for_untrained(cfg, small_slide)), cfg.out, block_px=256)
    store = zarr.open_group(str(slide_outputs(cfg.out, "crop")["nuclei_zarr"]), mode="r")
    for node in (store, store["labels/nuclei"]):
        datasets = node.attrs["ome"]["multiscales"][0]["datasets"]
        (s0, t0) = (datasets[0]["coordinateTransformations"][i][k] for i, k in ((0, "scale"), (1, "translation")))
        base = np.asarray(node["0"][0])
        assert len(datasets) >= 2
        for d in datasets[1:]:
            s, t = (d["coordinateTransformations"][i][k] for i, k in ((0, "scale"), (1, "translation")))
            level = np.asarray(node[d["path"]][0])
            ys, xs = np.mgrid[: level.shape[0], : level.shape[1]]
            # where each coarse pixel centre lies, in level-0 pixels: an integer, and the same value there
            y0 = (t[1] + ys * s[1] - t0[1]) / s0[1]
            x0 = (t[2] + xs * s[2] - t0[2]) / s0[2]
            assert np.allclose(y0, np.round(y0)) and np.allclose(x0, np.round(x0))
            assert np.array_equal(level, base[np.round(y0).astype(int), np.round(x0).astype(int)])
