"""The benchmark commands run end to end on tiny settings and write what they promise (the numbers
themselves are reports, never asserted as timings)."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from gmrpath.cli import app


def test_benchmark_conv_writes_ratios_for_every_candidate(tmp_path):
    out = tmp_path / "conv.json"
    result = CliRunner().invoke(app, ["benchmark", "conv", "--kernel-sizes", "3,5", "--shape", "1,4,16,16", "--out-channels", "4",
                                      "--repeats", "1", "--device", "cpu", "--out", str(out)])
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    assert [r["k"] for r in data["rows"]] == [3, 5]
    for row in data["rows"]:
        assert {"conv", "gmr_dense", "gmr_rings", "gmr_auto"} <= set(row["forward_ms"])
        assert row["auto_choice_forward"] in ("dense", "rings") and row["train_peak_mb"]["conv"] > 0
    assert "auto / best GMR path" in result.output


def test_benchmark_equivariance_writes_json_and_png(tmp_path):
    result = CliRunner().invoke(app, ["benchmark", "equivariance", "--kernel-sizes", "5", "--step", "45", "--seeds", "1",
                                      "--out-dir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    data = json.loads((tmp_path / "benchmark_equivariance.json").read_text())
    assert data["angles"] == [0, 45, 90]
    curves = data["curves"]
    assert curves["gmr_radius"]["5"][2] < 1e-6 < curves["dense"]["5"][2]  # 90 degrees: exact for GMR only
    assert (tmp_path / "benchmark_equivariance.png").stat().st_size > 1000


def run_json(args: list[str], out) -> dict:
    """Run ``gmrpath ARGS --out OUT`` on the CPU, once, and read the JSON it wrote."""
    result = CliRunner().invoke(app, [*args, "--repeats", "1", "--device", "cpu", "--out", str(out)])
    assert result.exit_code == 0, result.output
    return json.loads(out.read_text())


def test_benchmark_network_times_every_impl_and_lists_auto_choices(tmp_path):
    data = run_json(["benchmark", "network", "--shape", "2,3,32,32", "--base-channels", "4"], tmp_path / "net.json")
    assert set(data["ms"]) == {"auto", "rings", "dense"}
    assert "3->4 k9" in data["auto_choices"] and set(data["auto_choices"].values()) <= {"rings", "dense"}


def test_benchmark_network_takes_model_kwargs_and_refuses_bad_ones(tmp_path):
    data = run_json(["benchmark", "network", "--model", "gmr_unet", "--shape", "1,3,32,32", "--base-channels", "4",
                     "--model-kwargs", "{kernel_sizes: [5, 5, 3, 3], num_rings: [5, 5, 3, 3]}"], tmp_path / "unet.json")
    assert data["model_kwargs"]["num_rings"] == [5, 5, 3, 3]
    for bad in ("[1, 2]", "{base_channels: 8}", "{kernel_sizes: [4, 4, 4, 4]}", "{: ["):
        result = CliRunner().invoke(app, ["benchmark", "network", "--model", "gmr_unet", "--shape", "1,3,32,32",
                                          "--model-kwargs", bad, "--out", str(tmp_path / "x.json")])
        assert result.exit_code != 0 and "Traceback" not in result.output, (bad, result.output)
        assert not (tmp_path / "x.json").exists()


def test_segment_benchmark_labels_checkpoints_apart():
    from benchmarks.segment import _label

    models = ["models/a.pt", "runs/x/best.pt", "runs/y/best.pt", "gmr_unet"]
    assert [_label(m, models) for m in models] == ["a.pt", "x/best.pt", "y/best.pt", "gmr_unet"]


def test_benchmark_impl_times_both_paths_for_every_shape(tmp_path):
    data = run_json(["benchmark", "impl", "--channels", "4", "--sides", "16,24"], tmp_path / "impl.json")
    assert data["n"] == 8 and len(data["rows"]) == 8  # 4->4 (8 is not among the widths) x 4 kernels x 2 sides
    for row in data["rows"]:
        assert row["auto"] in ("dense", "rings") and row["auto_vs_best"] >= 1.0
    assert 0 <= data["within_5pct"] <= data["n"]


def test_benchmark_fit_reports_a_ratio_per_variant(tmp_path):
    import numpy as np
    import tifffile
    from PIL import Image

    from test_training import blobs

    rng = np.random.default_rng(0)
    for sub in ("images", "labels"):
        (tmp_path / "nuclei" / sub).mkdir(parents=True)
    for i in range(2):
        img, lab = blobs(rng, size=160)
        Image.fromarray(img).save(tmp_path / "nuclei" / "images" / f"b{i}.png")
        tifffile.imwrite(tmp_path / "nuclei" / "labels" / f"b{i}.tif", lab.astype(np.uint16))
    result = CliRunner().invoke(app, ["benchmark", "fit", "--data", str(tmp_path / "nuclei"), "--steps", "12", "--variants",
                                      "dense,gmr_unit", "--device", "cpu", "--out", str(tmp_path / "fit.json")])
    assert result.exit_code == 0, result.output
    data = json.loads((tmp_path / "fit.json").read_text())
    assert set(data["final_loss"]) == {"dense", "gmr_unit"} and data["ratio_to_dense"]["dense"] == 1.0
    assert all(len(c) == 12 and np.isfinite(c).all() for c in data["curves"].values())
    bad = CliRunner().invoke(app, ["benchmark", "fit", "--data", str(tmp_path / "nuclei"), "--variants", "nope",
                                   "--device", "cpu", "--out", str(tmp_path / "x.json")])
    assert bad.exit_code == 1 and "unknown variant" in bad.output and not (tmp_path / "x.json").exists()


def test_benchmark_fit_on_tiles_compares_resnet_twins(tmp_path):
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for k, cls in enumerate(("A", "B")):
        (tmp_path / "tiles" / cls).mkdir(parents=True)
        for i in range(3):
            tile = np.clip(rng.normal(80 + 100 * k, 30, (64, 64, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(tile).save(tmp_path / "tiles" / cls / f"{i}.png")
    result = CliRunner().invoke(app, ["benchmark", "fit", "--task", "tiles", "--data", str(tmp_path / "tiles"), "--steps", "10",
                                      "--variants", "dense,gmr", "--device", "cpu", "--out", str(tmp_path / "fit.json")])
    assert result.exit_code == 0, result.output
    data = json.loads((tmp_path / "fit.json").read_text())
    assert data["task"] == "tiles" and data["batch"][0] == 16 and set(data["ratio_to_dense"]) == {"dense", "gmr"}


def test_benchmark_data_measures_each_size_in_a_fresh_process(tmp_path):
    out = tmp_path / "data.json"
    result = CliRunner().invoke(app, ["benchmark", "data", "--root", str(tmp_path / "sets"), "--nct-sizes", "30,90",
                                      "--pcam-sizes", "64", "--workers", "0", "--batches", "1", "--no-step", "--out", str(out)])
    assert result.exit_code == 0, result.output
    r = json.loads(out.read_text())
    nct = r["layouts"]["nct_crc"]
    assert set(nct["sizes"]) == {"30", "90"} and nct["sizes"]["90"]["tiles"] == 90
    assert all(v["startup_s"] > 0 and v["items_per_s"] > 0 and v["peak_rss_mib"] > 100 for v in nct["sizes"].values())
    assert r["layouts"]["pcam"]["sizes"]["64"]["tiles"] == 64 and "memory_growth" in nct
    # the sets are written once: a second run reuses them
    stamp = (tmp_path / "sets" / "nct_crc_30").stat().st_mtime_ns
    assert CliRunner().invoke(app, ["benchmark", "data", "--root", str(tmp_path / "sets"), "--nct-sizes", "30", "--pcam-sizes", "",
                                    "--workers", "0", "--batches", "1", "--no-step", "--out", str(out)]).exit_code == 0
    assert (tmp_path / "sets" / "nct_crc_30").stat().st_mtime_ns == stamp


def test_benchmark_train_options_time_each_setting_and_refuse_unknown_ones(tmp_path):
    from benchmarks.training import run_options_benchmark

    r = run_options_benchmark("cpu", 1, ["default", "contiguous+dense_path", "ring_path"], size=(4, 32, 2))
    assert set(r["options"]) == {"default", "contiguous+dense_path", "ring_path"} and r["base_channels"] == 4
    assert r["options"]["default"]["speed_vs_default"] == 1.0
    result = CliRunner().invoke(app, ["benchmark", "train", "--options", "default,turbo", "--out", str(tmp_path / "t.json")])
    assert result.exit_code != 0 and "turbo" in result.output


def test_benchmark_viewer_reports_time_and_disk_per_megapixel(tmp_path):
    import yaml

    from conftest import DEMO_SLIDE

    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(yaml.safe_dump({"slides": str(DEMO_SLIDE), "out": str(tmp_path / "o"),
                                   "classify": {"preset": "nct_crc", "model_kwargs": {"base_channels": 4, "kernel_sizes": [5, 5, 3, 3]}}}))
    out = tmp_path / "viewer.json"
    result = CliRunner().invoke(app, ["benchmark", "viewer", str(DEMO_SLIDE), "--config", str(cfg), "--sizes", "1",
                                      "--root", str(tmp_path / "scratch"), "--out", str(out)])
    assert result.exit_code == 0, result.output
    (row,) = json.loads(out.read_text())["rows"]
    assert row["megapixels"] == round(2220 * 2967 / 1e6, 2) and row["disk_mib_per_mpx"] > 0 and row["viewer_vs_classify"] > 0
    assert row["viewer_again_s"] < row["viewer_s"]  # written once: the second call reuses the tiles


def test_benchmark_segment_times_post_processing_under_the_checkpoints_rule_and_one_height(tmp_path):
    """A crowded real crop (MoNuSeg kidney, 0.25 um/px PNG: the file has no mpp, so --mpp) where the
    shipped checkpoint's density rule splits more than one height: both rules are timed on the same
    maps, the ratio is the one of their times, and the counts are the rules' own instances."""
    import numpy as np
    from PIL import Image

    from conftest import SHARED_DATA

    source = SHARED_DATA / "nuclei" / "monuseg2018" / "images" / "TCGA-HE-7130-01Z-00-DX1.png"
    if not source.is_file():  # not there outside CI: a crop of the demo slide's tissue stands in
        from conftest import DEMO_SLIDE
        from pipeline.read import open_slide, read_region

        slide = open_slide(DEMO_SLIDE)
        crop = read_region(slide, (900, 1200), (400, 400), slide.mpp)
    else:
        crop = np.asarray(Image.open(source).convert("RGB"))[:400, :400]
    png = tmp_path / "crop.png"
    Image.fromarray(crop).save(png)
    data = run_json(["benchmark", "segment", str(png), "--mpp", "0.25", "--no-end-to-end", "--block-px", "128",
                     "--postprocess-blocks", "2"], tmp_path / "seg.json")
    post = data["postprocess"]
    assert post["model"] == "nuclei_gmr_unet.pt" and post["blocks"] == 2 and post["block_px"] == 128
    own, one = post["rules"]["checkpoint's rule"], post["rules"]["one height"]
    assert own["rule"]["marker_h_dense"] is not None and one["rule"]["marker_h_dense"] is None
    assert {k: v for k, v in own["rule"].items() if k != "marker_h_dense"} == \
        {k: v for k, v in one["rule"].items() if k != "marker_h_dense"}
    assert own["nuclei"] >= one["nuclei"] > 0  # a lower height where nuclei crowd never finds fewer markers
    assert abs(post["ratio"] - own["ms"] / one["ms"]) < 0.02  # both times rounded to 0.1 ms, the ratio to 0.01


def test_postprocess_timing_refuses_no_blocks():
    import pytest

    from benchmarks.segment import postprocess_timing

    with pytest.raises(ValueError, match="max_blocks"):
        postprocess_timing(None, None, None, max_blocks=0)
