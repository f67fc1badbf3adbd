"""The slide pipeline on the real demo slide (shipped in data/demo, also in ../shared/data) and on
generated pyramidal TIFFs: reading and mpp, tissue, grid, end-to-end outputs (OME-Zarr NGFF
0.5, QuPath GeoJSON, overlay, summary), resume after an interruption, TTA, and one clear error
per bad input."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from typer.testing import CliRunner

from benchmarks.synthetic import read_demo_tissue, write_pyramidal_tiff
from conftest import DEMO_SLIDE, REPO
from gmrpath.cli import app
from pipeline.config import ConfigError, ModelSpec, config_from_dict, load_config
from pipeline.models import ModelError, load_model, save_checkpoint
from pipeline.outputs import OutputError
from pipeline.predict import classify_slide
from pipeline.stages import slide_outputs
from pipeline.read import SlideError, open_slide, read_mpp_csv, read_region
from pipeline.tiles import make_grid
from pipeline.tissue import NoTissueError, detect_tissue

DEMO = DEMO_SLIDE
TINY = {"base_channels": 4, "kernel_sizes": [5, 5, 3, 3]}


@pytest.fixture(scope="module")
def tissue_rgb():
    return read_demo_tissue(DEMO)


def _cfg(tmp_path, slides=DEMO, **over):
    data = {
        "slides": str(slides), "out": str(tmp_path / "out"),
        "classify": {"preset": "nct_crc", "model_kwargs": TINY},
        "run": {"num_workers": 0, "batch_size": 8, "chunk_tiles": 4},
    }
    data.update(over)
    return config_from_dict(data)


# ---------------------------------------------------------------- config
def test_default_config_loads_and_resolves_paths():
    cfg = load_config(REPO / "configs" / "default.yaml")
    assert Path(cfg.slides) == REPO / "data" / "demo"
    assert cfg.classify.tile_px == 224 and cfg.classify.mpp == 0.5 and len(cfg.classify.classes) == 9


@pytest.mark.parametrize(
    "data, match",
    [
        ({"slide": "x"}, r"unknown key\(s\) \['slide'\]"),
        ({"run": {"batchsize": 4}}, r"unknown key\(s\) \['batchsize'\] in run"),
        ({"run": {"tta": "d8"}}, "run.tta"),
        ({"classify": {"preset": "camelyon"}}, "classify.preset"),
        ({"classify": {"mpp": -1}}, "classify.mpp"),
        ({"slides": "/no/such/folder"}, "does not exist"),
        ({"classify": None, "segment": None}, "nothing to do"),
        ({"segment": {"preset": "nuclei", "postprocess": {"marker_h": 1.5}}}, r"segment.postprocess: marker_h must be"),
        ({"segment": {"preset": "nuclei", "postprocess": {"h": 0.2}}}, r"segment.postprocess: unknown field\(s\) \['h'\]"),
        ({"segment": {"preset": "nuclei", "postprocess": 0.2}}, r"segment.postprocess: must be a mapping"),
        ({"classify": {"preset": "nct_crc", "postprocess": {"marker_h": 0.2}}}, r"classify.postprocess .*nuclei only"),
    ],
)
def test_bad_config_is_one_clear_error(tmp_path, data, match):
    path = tmp_path / "bad.yaml"
    base = {"slides": str(DEMO)}
    base.update(data)
    import yaml

    path.write_text(yaml.safe_dump(base))
    with pytest.raises(ConfigError, match=match) as info:
        load_config(path)
    assert str(path) in str(info.value)


# ---------------------------------------------------------------- read
def test_demo_slide_mpp_and_bundled_copy_agree():
    slide = open_slide(DEMO)
    assert slide.mpp == pytest.approx(0.499) and slide.mpp_source == "openslide.mpp-x/y"
    bundled = REPO / "data" / "demo" / "CMU-1-Small-Region.svs"
    assert bundled.read_bytes() == DEMO.read_bytes()  # the demo that ships is the real slide


def test_pyramid_is_read_from_the_nearest_finer_level(tmp_path, tissue_rgb):
    path = write_pyramidal_tiff(tmp_path / "p.tif", tissue_rgb[:1024, :1024], mpp=0.25, compression=None)
    slide = open_slide(path)
    assert slide.mpp == pytest.approx(0.25) and len(slide.level_dimensions) == 3
    from pipeline.read import best_level

    assert best_level(slide, 1.0) == 2 and best_level(slide, 0.6) == 1 and best_level(slide, 0.25) == 0
    coarse = read_region(slide, (256, 256), (128, 128), target_mpp=1.0)
    from_level0 = read_region(slide, (256, 256), (512, 512), target_mpp=0.25)
    import cv2

    want = cv2.resize(from_level0, (128, 128), interpolation=cv2.INTER_AREA)
    assert coarse.shape == (128, 128, 3)
    assert np.abs(coarse.astype(float) - want).mean() < 3.0


def test_missing_mpp_is_an_error_unless_given(tmp_path, tissue_rgb):
    path = write_pyramidal_tiff(tmp_path / "nompp.tif", tissue_rgb[:512, :512], mpp=None)
    with pytest.raises(SlideError, match=r"nompp.tif: the file records no resolution.*--mpp"):
        open_slide(path)
    assert open_slide(path, mpp=0.5).mpp_source == "default (--mpp)"
    csv_path = tmp_path / "mpp.csv"
    csv_path.write_text("slide,mpp\nnompp,0.25\n")
    slide = open_slide(path, mpp=0.5, mpp_csv=read_mpp_csv(csv_path))
    assert slide.mpp == 0.25 and slide.mpp_source == "mpp_csv"


@pytest.mark.parametrize("content", [b"this is not a slide\n" * 10, None])
def test_non_slide_and_corrupt_files_name_the_file(tmp_path, content):
    path = tmp_path / "broken.svs"
    path.write_bytes(content if content is not None else DEMO.read_bytes()[:4096])
    with pytest.raises(SlideError, match="broken.svs"):
        slide = open_slide(path)
        read_region(slide, (0, 0), (224, 224), 0.5)


def test_missing_slide_file():
    with pytest.raises(SlideError, match="no such file"):
        open_slide("/no/such/slide.svs")


# ---------------------------------------------------------------- tissue and tiles
def test_tissue_and_grid_on_the_demo_slide():
    slide = open_slide(DEMO)
    mask = detect_tissue(slide, 8.0)
    assert 0.2 < mask.mean() < 0.6
    grid = make_grid(slide, mask, 8.0, tile_px=224, mpp=0.5, min_tissue_fraction=0.25, chunk=4)
    assert grid.tile_l0 == pytest.approx(224 * 0.5 / 0.499)
    assert (grid.n_rows, grid.n_cols) == (13, 9)
    assert np.all(grid.tissue_fraction >= 0.25) and 20 < len(grid.rows) < grid.n_rows * grid.n_cols
    chunks = grid.chunk_of(4)
    assert np.all(np.diff(chunks) >= 0)  # sorted by chunk: chunks complete one after another


def test_blank_slide_has_no_tissue(tmp_path):
    path = write_pyramidal_tiff(tmp_path / "blank.tif", np.full((1024, 1024, 3), 242, np.uint8), mpp=0.5)
    with pytest.raises(NoTissueError, match="blank.tif: no tissue"):
        detect_tissue(open_slide(path), 8.0)


# ---------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("e2e")
    cfg = _cfg(tmp, run={"num_workers": 2, "batch_size": 8, "chunk_tiles": 4})
    summary = classify_slide(DEMO, cfg, cfg.out)
    return cfg, summary, slide_outputs(cfg.out, "CMU-1-Small-Region")


def test_end_to_end_heatmap_matches_the_grid(demo_run):
    cfg, summary, paths = demo_run
    store = zarr.open_group(str(paths["classify_zarr"]), mode="r")
    ome = store.attrs["ome"]
    assert ome["version"] == "0.5"
    ms = ome["multiscales"][0]
    assert [a["name"] for a in ms["axes"]] == ["c", "y", "x"] and ms["axes"][1]["unit"] == "micrometer"
    heat = store["0"]
    assert heat.shape == (9, 13, 9) and summary["grid"] == [13, 9]
    scale = ms["datasets"][0]["coordinateTransformations"][0]["scale"]
    assert scale[1] == pytest.approx(224 * 0.5)  # one heatmap pixel per tile: stride x mpp
    assert [c["label"] for c in ome["omero"]["channels"]] == cfg.classify.classes
    probs = np.asarray(heat[:])
    on = probs.sum(0) > 0
    assert on.sum() == summary["tiles"] and np.allclose(probs.sum(0)[on], 1, atol=1e-5)
    labels = np.asarray(store["labels/classes/0"][0])
    assert np.array_equal(labels, np.where(on, probs.argmax(0) + 1, 0))
    assert set(store["labels"].attrs["ome"]["labels"]) == {"classes", "tissue"}
    colors = store["labels/classes"].attrs["ome"]["image-label"]["colors"]
    assert [c["label-value"] for c in colors] == list(range(1, 10))
    assert not (paths["classify_zarr"].parent / (paths["classify_zarr"].name + ".partial")).exists()


def test_end_to_end_geojson_is_qupath_shaped(demo_run):
    _, summary, paths = demo_run
    fc = json.loads(paths["tiles_geojson"].read_text())
    assert fc["type"] == "FeatureCollection" and len(fc["features"]) == summary["tiles"]
    for f in fc["features"]:
        uuid.UUID(f["id"])
        ring = f["geometry"]["coordinates"][0]
        assert f["geometry"]["type"] == "Polygon" and ring[0] == ring[-1] and len(ring) == 5
        props = f["properties"]
        assert props["objectType"] == "tile"
        assert set(props["classification"]) == {"name", "color"}
        assert isinstance(props["measurements"], dict) and "prob TUM" in props["measurements"]
        xs = [p[0] for p in ring]
        assert max(xs) - min(xs) == pytest.approx(224 * 0.5 / 0.499, abs=0.02)  # level-0 pixels


def test_end_to_end_summary_and_overlay(demo_run):
    _, summary, paths = demo_run
    on_disk = json.loads(paths["summary_json"].read_text())
    assert on_disk["tiles"] == summary["tiles"] and on_disk["mpp"] == pytest.approx(0.499)
    assert sum(on_disk["class_fraction"].values()) == pytest.approx(1.0, abs=1e-3)
    assert on_disk["trained"] is False and len(on_disk["model_checksum"]) == 16
    assert on_disk["tiles_per_s"] > 0
    from PIL import Image

    assert Image.open(paths["overlay_png"]).size[0] > 300
    assert paths["summary_json"].with_suffix(".csv").is_file()


def test_resume_after_interruption_gives_identical_output(tmp_path, demo_run):
    _, _, ref_paths = demo_run
    cfg = _cfg(tmp_path)
    with pytest.raises(KeyboardInterrupt):
        classify_slide(DEMO, cfg, cfg.out, stop_after_chunks=2)
    paths = slide_outputs(cfg.out, "CMU-1-Small-Region")
    partial = paths["classify_zarr"].with_name(paths["classify_zarr"].name + ".partial")
    assert partial.is_dir() and not paths["classify_zarr"].exists()  # nothing looks complete
    assert len(json.loads((partial / "progress.json").read_text())["done_chunks"]) == 2
    done = []
    classify_slide(DEMO, cfg, cfg.out, progress=lambda d, t: done.append(t))
    assert done and done[-1] < 53  # only the unfinished chunks were redone
    a = zarr.open_group(str(paths["classify_zarr"]), mode="r")
    b = zarr.open_group(str(ref_paths["classify_zarr"]), mode="r")
    assert np.array_equal(np.asarray(a["0"][:]), np.asarray(b["0"][:]))
    assert paths["tiles_geojson"].read_bytes() == ref_paths["tiles_geojson"].read_bytes()


def test_complete_store_is_not_recomputed(demo_run):
    cfg, _, paths = demo_run
    calls = []
    classify_slide(DEMO, cfg, cfg.out, progress=lambda d, t: calls.append(d))
    assert calls == []


@pytest.mark.parametrize("model, changes", [("gmr_resnet18", False), ("resnet18", True)])
def test_tta_d4_changes_nothing_for_gmr_models(model, changes):
    loaded = load_model(ModelSpec(model=model, model_kwargs=TINY))
    from pipeline.infer import predict_batch, prepare_model

    prepare_model(loaded, torch.device("cpu"))
    tiles = torch.from_numpy(read_demo_tissue(DEMO)[:64 * 4, :64 * 2].reshape(4, 64, 2, 64, 3).transpose(0, 2, 1, 3, 4).reshape(8, 64, 64, 3).copy())
    plain = predict_batch(loaded, tiles, torch.device("cpu"), "none")
    tta = predict_batch(loaded, tiles, torch.device("cpu"), "d4")
    err = float((plain - tta).abs().max())
    # measured: GMR 1.2e-7 (float rounding), the dense baseline 6e-5 (random tiny weights: near-uniform output)
    assert (err > 1e-5) if changes else (err < 1e-6)


# ---------------------------------------------------------------- models and bad inputs
def test_checkpoint_round_trip_and_missing_file(tmp_path):
    loaded = load_model(ModelSpec(model="gmr_resnet18", model_kwargs=TINY))
    path = save_checkpoint(loaded.module, tmp_path / "m.pt", "gmr_resnet18", {**TINY, "num_classes": 9},
                           loaded.spec.classes, 224, 0.5)
    again = load_model(ModelSpec(model=str(path)))
    assert again.trained and again.spec.classes == loaded.spec.classes
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(again.module(x), loaded.module(x))
    with pytest.raises(ModelError, match="missing.pt: model checkpoint not found"):
        load_model(ModelSpec(model=str(tmp_path / "missing.pt")))


class _Evil:
    def __reduce__(self):
        return (print, ("code ran",))


def test_checkpoint_with_code_is_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"format": "gmrpath-checkpoint-v1", "payload": _Evil()}, path)
    with pytest.raises(ModelError, match="evil.pt: refused: the file carries Python code"):
        load_model(ModelSpec(model=str(path)))


def test_unwritable_output_is_one_clear_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    cfg = _cfg(tmp_path)
    with pytest.raises(OutputError, match="cannot create the output folder"):
        classify_slide(DEMO, cfg, blocker / "out")


def test_cli_reports_bad_input_with_exit_code(tmp_path):
    bad = tmp_path / "notes.svs"
    bad.write_text("hello")
    result = CliRunner().invoke(app, ["predict", str(bad), "--out", str(tmp_path / "o"), "--device", "cpu"])
    assert result.exit_code == 1
    assert "notes.svs" in result.output and "not a readable slide" in result.output
    assert not (tmp_path / "o" / "notes").exists() or not any((tmp_path / "o" / "notes").iterdir())


def test_cli_help_lists_the_commands():
    result = CliRunner().invoke(app, ["--help"])
    for cmd in ("predict", "segment", "tissue", "cohort", "benchmark", "models"):
        assert cmd in result.output


def test_reads_beyond_the_slide_are_white_and_inside_unchanged():
    slide = open_slide(DEMO)
    w0, h0 = slide.dimensions
    edge = read_region(slide, (w0 - 100, 0), (200, 200), slide.mpp)
    assert np.all(edge[:, 110:] == 255)  # past the right edge: white, not black
    inside = read_region(slide, (w0 - 300, 500), (200, 200), slide.mpp)
    import openslide

    ref = np.asarray(openslide.OpenSlide(str(DEMO)).read_region((w0 - 300, 500), 0, (200, 200)))[..., :3]
    assert np.array_equal(inside, ref)


def test_batches_never_span_chunks():
    from pipeline.infer import chunk_batches

    batches = chunk_batches(np.array([0, 0, 0, 1, 1, 2, 2, 2, 2, 2]), 2)
    assert batches == [[0, 1], [2], [3, 4], [5, 6], [7, 8], [9]]


def test_store_validates_as_ngff_05_and_opens_with_the_napari_reader(demo_run):
    """ome-zarr-models checks the NGFF 0.5 schema; ome-zarr-py is what napari-ome-zarr reads with."""
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Reader
    from ome_zarr_models.v05.image import Image
    from ome_zarr_models.v05.image_label import ImageLabel

    _, _, paths = demo_run
    group = zarr.open_group(str(paths["classify_zarr"]), mode="r")
    Image.from_zarr(group)
    for name in ("classes", "tissue"):
        ImageLabel.from_zarr(group[f"labels/{name}"])
    nodes = list(Reader(parse_url(str(paths["classify_zarr"])))())
    assert nodes[0].metadata["channel_names"][-1] == "TUM"
    assert {n.metadata.get("name") for n in nodes} >= {"class_probabilities", "classes", "tissue"}


def test_tissue_mask_is_reused_only_for_the_same_settings(tmp_path):
    from pipeline.stages import open_configured_slide, tissue_stage
    from pipeline.tissue import mask_png_meta

    cfg = _cfg(tmp_path)
    slide = open_configured_slide(DEMO, cfg)
    mask, _ = tissue_stage(slide, cfg, cfg.out)
    png = slide_outputs(cfg.out, "CMU-1-Small-Region")["tissue_png"]
    assert mask_png_meta(png)["min_object_um2"] == cfg.tissue.min_object_um2
    stamp = png.stat().st_mtime_ns
    tissue_stage(slide, cfg, cfg.out)
    assert png.stat().st_mtime_ns == stamp  # reused
    import dataclasses

    bigger = dataclasses.replace(cfg, tissue=dataclasses.replace(cfg.tissue, min_object_um2=50000.0))
    mask2, _ = tissue_stage(slide, bigger, cfg.out)
    assert png.stat().st_mtime_ns != stamp and mask2.sum() <= mask.sum()


def test_predict_takes_classes_tile_and_mpp_from_a_fresh_checkpoint(tmp_path, tissue_rgb):
    """train -> predict in one step: the preset's settings give way to the checkpoint's; a config that sets
    them explicitly still has to agree."""
    from gmr_models import create_model

    slide = write_pyramidal_tiff(tmp_path / "s.tif", tissue_rgb[1000:1768, 600:1368], mpp=0.5, levels=1)
    classes = ["a", "b", "c"]
    net = create_model("gmr_resnet18", num_classes=3, base_channels=4)
    ckpt = save_checkpoint(net, tmp_path / "run" / "best.pt", "gmr_resnet18", {"num_classes": 3, "base_channels": 4},
                           classes, 96, 1.0)
    result = CliRunner().invoke(app, ["predict", str(slide), "--model", str(ckpt), "--out", str(tmp_path / "out"),
                                      "--device", "cpu", "--num-workers", "0"])
    assert result.exit_code == 0, result.output
    assert "took classes ['a', 'b', 'c']; tile_px 96; mpp 1.0 from the checkpoint" in result.output
    summary = json.loads((tmp_path / "out" / "s" / "s.summary.json").read_text())
    assert list(summary["class_fraction"]) == classes and summary["tile_px"] == 96 and summary["tile_mpp"] == 1.0
    assert summary["trained"] is True and '"trained": true' in result.output  # the printed summary says it too
    explicit = tmp_path / "explicit.yaml"
    explicit.write_text(f"slides: {slide}\nclassify: {{preset: nct_crc, model: {ckpt}, tile_px: 224}}\n")
    result = CliRunner().invoke(app, ["predict", str(slide), "--config", str(explicit), "--out", str(tmp_path / "o2")])
    assert result.exit_code == 1 and "tile_px 96 (config: 224)" in result.output


def test_every_class_colour_stays_visible_on_white_and_on_h_and_e():
    from skimage.color import deltaE_cie76, rgb2lab

    from pipeline.write_overlay import class_colors

    backgrounds = {"white": (255, 255, 255), "eosin pink": (235, 160, 200), "haematoxylin purple": (110, 70, 160)}
    lab = lambda c: rgb2lab(np.array([[c]], np.float64) / 255.0)[0, 0]  # noqa: E731
    colours = class_colors([f"class{i}" for i in range(8)] + ["TUM"])
    assert len(set(colours)) == 9
    for c in colours:
        for name, bg in backgrounds.items():
            assert deltaE_cie76(lab(c), lab(bg)) >= 20, (c, name)


def test_progress_rates_count_from_the_start_of_the_work():
    """A one-block crop must not report hundreds of thousands of blocks/s: the clock starts with the work."""
    import time

    from gmrpath.common import LazyBar

    with LazyBar("nuclei x", "blocks") as bar:
        time.sleep(0.2)
        bar(1, 1)
        rate = float(bar.bar.tasks[0].fields["rate"].split()[0])
    assert 0 < rate <= 1 / 0.2 + 0.5
