"""Hardening: one-line errors, config sources, locks, full disks, safe ids and paths, fingerprints,
reports that survive failures, overlays a pathologist can read."""

from __future__ import annotations

import dataclasses
import errno
import json
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from conftest import DEMO_SLIDE, REPO
from gmrpath.cli import app
from pipeline.config import ConfigError, config_from_dict, load_config, scan_slides
from pipeline.outputs import OutputError, atomic_path, lock_name, slide_lock
from pipeline.predict import classify_slide
from pipeline.stages import run_fingerprint, slide_outputs, tissue_stage
from pipeline.read import open_slide, slide_id
from pipeline.report import record_failure, write_cohort

DEMO = DEMO_SLIDE


def _one_line_error(result) -> str:
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 1, result.output
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    return lines[0]


# ---------------------------------------------------------------- CLI messages and config sources
@pytest.mark.parametrize("mpp", ["0", "-1"])
def test_bad_mpp_on_the_command_line_is_blamed_on_the_option(mpp):
    line = _one_line_error(CliRunner().invoke(app, ["tissue", str(DEMO), "--mpp", mpp]))
    assert "--mpp" in line and "default.yaml" not in line


def test_a_long_error_is_one_unwrapped_line_without_a_progress_bar(tmp_path):
    missing = tmp_path / ("a_very_long_folder_name_" * 8) / "slide.svs"
    line = _one_line_error(CliRunner().invoke(app, ["predict", str(missing), "--out", str(tmp_path / "o"), "--device", "cpu"]))
    assert str(missing) in line and "0/?" not in line


def test_per_slide_commands_use_the_config_out_and_do_not_need_its_slides(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("run: {device: cpu}\nout: myout\n")  # slides defaults to <cfgdir>/data/demo, which does not exist
    result = CliRunner().invoke(app, ["tissue", str(DEMO), "--config", str(cfg)])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "myout" / slide_id(DEMO) / f"{slide_id(DEMO)}.tissue.png").is_file()
    with pytest.raises(ConfigError, match="slides path"):
        load_config(cfg)  # the workflow, which runs every slide, still needs it


def test_cohort_of_a_file_and_config_write_under_a_file_are_one_line(tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("x")
    assert "not a folder" in _one_line_error(CliRunner().invoke(app, ["cohort", str(afile)]))
    line = _one_line_error(CliRunner().invoke(app, ["config", "--write", str(afile / "x.yaml")]))
    assert "is a file" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]


def test_yaml_alias_bomb_is_refused_quickly(tmp_path):
    lines = ["classify:", "  preset: nct_crc", "  model_kwargs:", '    a0: &a0 ["x", "x", "x", "x", "x", "x", "x", "x", "x"]']
    lines += [f"    a{i}: &a{i} [*a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}]"
              for i in range(1, 9)]
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text("\n".join(lines) + "\n")
    start = time.perf_counter()
    with pytest.raises(ConfigError, match="aliases"):
        load_config(bomb)
    from training.config import TrainConfigError, load_train_config

    with pytest.raises(TrainConfigError, match="aliases"):
        load_train_config(bomb)
    assert time.perf_counter() - start < 30  # an unbounded expansion (9**9 values) would not finish


def test_tiatoolbox_log_lines_do_not_leak_and_warnings_stay_python_warnings(tmp_path):
    tif = tmp_path / "plain.tif"
    code = f"""
import warnings, numpy as np, tifffile
tifffile.imwrite({str(tif)!r}, np.full((300, 400, 3), 200, np.uint8))
from pipeline.read import open_slide, read_region
s = open_slide({str(tif)!r}, mpp=0.5)
read_region(s, (0, 0), (64, 64), 1.0)
warnings.warn("ours")
print(s.backend)
"""
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "tiatoolbox"  # the path that goes through TIAToolbox
    assert "[WARNING]" not in proc.stdout + proc.stderr
    assert "UserWarning: ours" in proc.stderr


# ---------------------------------------------------------------- locks, full disks
def _hold(folder, stage, seconds=120):
    holder = subprocess.Popen(
        [sys.executable, "-c", f"import time; from pipeline.outputs import slide_lock\n"
                               f"with slide_lock({str(folder)!r}, {stage!r}):\n print('held', flush=True); time.sleep({seconds})"],
        cwd=REPO, stdout=subprocess.PIPE, text=True,
    )
    assert holder.stdout.readline().strip() == "held"
    return holder


def test_a_second_run_on_the_same_slide_stops_naming_the_holder_and_a_killed_holder_releases(tmp_path):
    cfg = config_from_dict({"slides": str(DEMO), "out": str(tmp_path), "run": {"device": "cpu"}, "segment": None})
    folder = slide_outputs(tmp_path, slide_id(DEMO))["dir"]
    folder.mkdir(parents=True)
    holder = _hold(folder, "classify")
    try:
        with pytest.raises(OutputError, match=f"in use by pid {holder.pid}"):
            classify_slide(DEMO, cfg, tmp_path, device="cpu")
        assert not (folder / f"{slide_id(DEMO)}.tissue.png").exists()  # stopped before any work
        mask, _ = tissue_stage(open_slide(DEMO), cfg, tmp_path)  # another stage of the same slide runs meanwhile
        assert mask.any()
    finally:
        holder.kill()
        holder.wait()
    with slide_lock(folder, "classify"):  # the kernel dropped the dead holder's lock
        assert (folder / lock_name("classify")).is_file()


def test_classify_and_segment_of_one_slide_run_at_once_and_wait_for_the_tissue_stage(tmp_path):
    cfg = config_from_dict({"slides": str(DEMO), "out": str(tmp_path), "run": {"device": "cpu"}})
    folder = slide_outputs(tmp_path, slide_id(DEMO))["dir"]
    folder.mkdir(parents=True)
    holder = _hold(folder, "tissue", seconds=2)  # a short stage: a second run waits for it, then reuses its mask
    try:
        with slide_lock(folder, "segment"), slide_lock(folder, "classify"):
            mask, _ = tissue_stage(open_slide(DEMO), cfg, tmp_path)
        assert mask.any() and holder.wait(timeout=60) is not None
    finally:
        holder.kill()
        holder.wait()
    with pytest.raises(ValueError, match="stage must be one of"):
        lock_name("overlay")


def test_lock_is_reentrant_within_one_process(tmp_path):
    with slide_lock(tmp_path, "segment"), slide_lock(tmp_path, "segment"):
        pass
    with slide_lock(tmp_path, "segment"):
        pass


def test_disk_full_is_one_line_and_leaves_no_temporary_file(tmp_path):
    target = tmp_path / "a.json"
    target.write_text("old")

    with pytest.raises(OutputError, match="No space left") as info:
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise OSError(errno.ENOSPC, "No space left on device")
    assert "\n" not in str(info.value) and str(target) in str(info.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json"] and target.read_text() == "old"


def test_disk_full_while_writing_the_progress_file_or_a_png(tmp_path, monkeypatch):
    from PIL import Image

    from pipeline.tissue import save_mask_png
    from pipeline.write_zarr import mark_chunk_done, open_partial_store

    group, _ = open_partial_store(tmp_path / "s.ome.zarr", {"k": 1})
    real_write = type(tmp_path).write_text

    def full(self, *a, **k):
        real_write(self, "partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(type(tmp_path), "write_text", full)
    with pytest.raises(OutputError):
        mark_chunk_done(group, 3)
    monkeypatch.undo()
    assert not [p for p in (tmp_path / "s.ome.zarr.partial").iterdir() if ".tmp" in p.name]

    def full_save(self, fp, *a, **k):
        open(fp, "wb").close()  # a 0-byte file, as a full disk leaves
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Image.Image, "save", full_save)
    with pytest.raises(OutputError):
        save_mask_png(np.ones((4, 4), bool), tmp_path / "m.png")
    assert not [p for p in tmp_path.iterdir() if p.suffix == ".png"]


# ---------------------------------------------------------------- ids, paths, fingerprints
def test_slide_ids_are_safe_folder_names_and_outputs_stay_inside_out(tmp_path):
    for name in ("...svs", "..svs", ".hidden.svs", "a b (HE).svs"):
        sid = slide_id(tmp_path / name)
        assert sid and not sid.startswith(".") and "/" not in sid and " " not in sid
        d = slide_outputs(tmp_path / "out", sid)["dir"]
        assert d.resolve().parent == (tmp_path / "out").resolve()
    for bad in ("..", ".", "a/../../b", ""):
        with pytest.raises(OutputError, match="outside the output folder"):
            slide_outputs(tmp_path / "out", bad)
    (tmp_path / "slides").mkdir()
    (tmp_path / "slides" / "...svs").write_bytes(b"x")
    found, _ = scan_slides(tmp_path / "slides")
    assert list(found) == [slide_id("...svs")] and list(found) != [".."]


def test_scan_slides_reports_dangling_links_and_folders(tmp_path):
    (tmp_path / "good.svs").write_bytes(b"x")
    (tmp_path / "dir.svs").mkdir()
    (tmp_path / "gone.svs").symlink_to(tmp_path / "nowhere.svs")
    found, skipped = scan_slides(tmp_path)
    assert list(found) == ["good"]
    reasons = {p.name: why for p, why in skipped}
    assert set(reasons) == {"dir.svs", "gone.svs"} and "dangling" in reasons["gone.svs"]


def test_the_resume_fingerprint_holds_everything_that_changes_the_numbers(tmp_path):
    from pipeline.config import ModelSpec, PRESETS

    cfg = config_from_dict({"slides": str(DEMO), "out": str(tmp_path)})
    slide, spec = open_slide(DEMO), ModelSpec(**PRESETS["nct_crc"])
    base = run_fingerprint(slide, spec, "abc", cfg, torch.device("cpu"))
    assert base["code"] and base["dtype"] == "float32"
    changed = [
        run_fingerprint(slide, spec, "abc", cfg, torch.device("cuda")),
        run_fingerprint(slide, spec, "abc", dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, batch_size=7)), torch.device("cpu")),
    ]
    amp_cfg = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, amp=not cfg.run.amp))
    assert run_fingerprint(slide, spec, "abc", amp_cfg, torch.device("cuda")) != changed[0]  # autocast matters on CUDA
    assert all(c != base for c in changed)


# ---------------------------------------------------------------- report and overlay
def test_report_lists_failed_slides_links_overlays_and_keeps_speeds_in_the_csv(tmp_path):
    good = tmp_path / "good"
    good.mkdir()
    (good / "good.summary.json").write_text(json.dumps({"slide": "good", "tiles": 3, "tiles_per_s": 12.5}))
    (good / "good.overlay.png").write_bytes(b"png")
    record_failure(tmp_path, tmp_path / "bad.svs", "tissue", "bad.svs: not a readable\nslide")
    csv_path, html_path = write_cohort(tmp_path)
    page, table = html_path.read_text(), csv_path.read_text()
    assert '<a href="good/good.overlay.png"><img' in page
    assert "bad.svs: not a readable slide" in page and "1 failed" in page
    assert "tiles/s" not in page and "tiles_per_s" in table and "error.tissue" in table
    only_failures = tmp_path / "f"
    record_failure(only_failures, "x.svs", "classify", "boom")
    assert "boom" in write_cohort(only_failures)[1].read_text()


def test_overlay_palette_is_colour_blind_safe_and_visible_on_eosin(tmp_path):
    import colorsys

    from pipeline.write_overlay import _scale_bar_um, class_colors, write_overlay

    colors = class_colors(["ADI", "BACK", "DEB", "LYM", "MUC", "MUS", "NORM", "STR", "TUM"])
    assert len(set(colors)) == 9 and colors[-1] == (240, 228, 66)
    for r, g, b in colors:  # no red, pink or magenta hue (eosin's)
        h, _, s = colorsys.rgb_to_hls(r / 255, g / 255, b / 255)
        assert s < 0.2 or not (h > 0.8 or h < 0.05), (r, g, b)
    assert _scale_bar_um(1000 * 8.0) == 1000 and _scale_bar_um(300 * 0.5) == 20
    thumb = np.full((300, 200, 3), 230, np.uint8)
    tissue = np.zeros((300, 200), bool)
    tissue[50:250, 40:160] = True
    path = write_overlay(thumb, tissue.astype(np.int64)[::10, ::10], ["TUM"], [colors[-1]], tmp_path / "o.png",
                         title="t", um_per_px=8.0, tissue=tissue)
    from PIL import Image

    assert Image.open(path).size[0] >= 1000


# ---------------------------------------------------------------- checkpoints and tile sizes
@pytest.fixture()
def checkpoint(tmp_path):
    from gmr_models import create_model
    from pipeline.config import PRESETS
    from pipeline.models import save_checkpoint

    classes = PRESETS["nct_crc"]["classes"]
    net = create_model("gmr_resnet18", num_classes=9, base_channels=4)
    path = save_checkpoint(net, tmp_path / "a.pt", "gmr_resnet18", {"num_classes": 9, "base_channels": 4}, classes, 224, 0.5)
    return path, torch.load(path, weights_only=True)


def _load(path, tile_px=224):
    from pipeline.config import PRESETS, ModelSpec
    from pipeline.models import load_model

    return load_model(ModelSpec(**{**PRESETS["nct_crc"], "model": str(path), "tile_px": tile_px}))


@pytest.mark.parametrize("field,value,match", [
    ("tile_px", 0, "tile_px must be a positive int"), ("mpp", float("nan"), "mpp must be a positive number"),
    ("std", [0.2, 0.0, 0.2], "std must be three positive"), ("classes", "TUM", "classes must be a list"),
    ("tile_px", 100, "not a multiple of 16"),
])
def test_checkpoint_metadata_is_validated_like_a_config(checkpoint, tmp_path, field, value, match):
    from pipeline.models import ModelError

    path, ckpt = checkpoint
    torch.save({**ckpt, field: value}, tmp_path / "b.pt")
    with pytest.raises(ModelError, match=match) as info:
        _load(tmp_path / "b.pt", value if field == "tile_px" and value else 224)
    assert str(tmp_path / "b.pt") in str(info.value) and "\n" not in str(info.value)


def test_weight_mismatch_is_one_line_and_a_pickle_is_refused_for_carrying_code(checkpoint, tmp_path):
    import os

    from pipeline.models import ModelError

    path, ckpt = checkpoint
    torch.save({**ckpt, "model_kwargs": {"num_classes": 9, "base_channels": 8}}, tmp_path / "wide.pt")
    with pytest.raises(ModelError, match=r"\d+ tensor\(s\) of another shape \(first: ") as info:
        _load(tmp_path / "wide.pt")
    assert "\n" not in str(info.value) and len(str(info.value)) < 400

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    torch.save({"x": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(ModelError, match="carries Python code") as info:
        _load(tmp_path / "evil.pt")
    assert "weights_only=False" not in str(info.value) and "weights_only" not in str(info.value)


def test_nan_weights_huge_networks_and_text_files_are_refused_in_one_line(checkpoint, tmp_path):
    from pipeline.models import ModelError

    path, ckpt = checkpoint
    state = dict(ckpt["state_dict"])
    key = next(k for k, t in state.items() if t.is_floating_point())
    state[key] = state[key].clone().fill_(float("nan"))
    torch.save({**ckpt, "state_dict": state}, tmp_path / "nan.pt")
    with pytest.raises(ModelError, match=f"NaN or infinite values \\(first: {key}\\)"):
        _load(tmp_path / "nan.pt")
    torch.save({**ckpt, "model_kwargs": {"num_classes": 9, "base_channels": 1_000_000}}, tmp_path / "huge.pt")
    with pytest.raises(ModelError, match="parameters \\(limit") as info:
        _load(tmp_path / "huge.pt")  # refused before a byte is allocated (built on the meta device)
    assert "\n" not in str(info.value)
    for text in ("these are my notes, not weights\n", "hello\n", "{}"):
        (tmp_path / "notes.pt").write_text(text)
        with pytest.raises(ModelError, match="not a checkpoint") as info:
            _load(tmp_path / "notes.pt")
        assert "Python code" not in str(info.value), text


@pytest.mark.parametrize("tile_px", [100, 72, 50])
def test_tile_sizes_that_break_exact_invariance_are_refused_at_load(tile_px):
    with pytest.raises(ConfigError, match="multiple of 16"):
        config_from_dict({"slides": str(DEMO), "classify": {"preset": "nct_crc", "tile_px": tile_px}})
    for ok in (224, 96, 64):
        config_from_dict({"slides": str(DEMO), "classify": {"preset": "nct_crc", "tile_px": ok}})


def test_the_pipeline_freezes_its_model_and_training_unfreezes_it():
    from gmr_models import GMRConv
    from pipeline.config import PRESETS, ModelSpec
    from pipeline.infer import prepare_model
    from pipeline.models import load_model

    spec = ModelSpec(**{**PRESETS["nuclei"], "model": "gmr_unet", "model_kwargs": {"base_channels": 4, "kernel_sizes": [3, 3]}})
    loaded = prepare_model(load_model(spec, check=False), torch.device("cpu"))
    convs = [m for m in loaded.module.modules() if isinstance(m, GMRConv)]
    assert convs and all(m.frozen for m in convs)
    loaded.module.train()
    assert not any(m.frozen for m in convs)


def test_exported_strip_tiffs_give_their_resolution_from_the_tags(tmp_path):
    """QuPath/Fiji crops: plain (strip) TIFFs OpenSlide refuses; their tags carry the resolution."""
    import numpy as np
    import tifffile

    from pipeline.read import SlideError, open_slide, read_region

    rgb = np.random.default_rng(0).integers(0, 255, (120, 160, 3), dtype=np.uint8)
    tifffile.imwrite(tmp_path / "qupath.tif", rgb, photometric="rgb", resolution=(1 / 0.25e-4, 1 / 0.25e-4),
                     resolutionunit="CENTIMETER")
    slide = open_slide(tmp_path / "qupath.tif")
    assert slide.mpp == pytest.approx(0.25) and "XResolution" in slide.mpp_source
    assert np.array_equal(read_region(slide, (0, 0), (160, 120), 0.25), rgb)
    tifffile.imwrite(tmp_path / "fiji.tif", rgb[..., 0], imagej=True, resolution=(2.0, 2.0), metadata={"unit": "micron"})
    assert open_slide(tmp_path / "fiji.tif").mpp == pytest.approx(0.5)
    tifffile.imwrite(tmp_path / "bare.tif", rgb, photometric="rgb")
    with pytest.raises(SlideError, match="bare.tif: the file records no resolution"):
        open_slide(tmp_path / "bare.tif")
    assert open_slide(tmp_path / "bare.tif", mpp=0.3).mpp_source == "default (--mpp)"
