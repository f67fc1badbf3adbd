"""The same code on CUDA: the layer's paths against the CPU, exact grid invariance on the GPU, a training
epoch under bf16 autocast, and nuclei probability maps against the CPU's. Run where a GPU is
(``benchmarks/device_check.sh`` runs them on a lent one); elsewhere each test is skipped with the
reason printed by ``-ra``."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import yaml

from gmr_models import create_model
from gmr_models.layers import GMRConv

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
CUDA = torch.device("cuda")


@pytest.fixture(autouse=True)
def _exact_math():
    """TF32 off: the comparisons are of the algorithms, not of reduced-precision matmuls."""
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


@pytest.mark.parametrize("spatial_dims,impl", [(2, "dense"), (2, "rings"), (3, "dense"), (3, "rings"), (1, "dense")])
def test_gmr_conv_on_cuda_matches_the_cpu(spatial_dims, impl):
    torch.manual_seed(0)
    conv = GMRConv(spatial_dims, 6, 8, 7, impl=impl, dtype=torch.float64)
    x = torch.randn(2, 6, *([12] * spatial_dims), dtype=torch.float64, requires_grad=True)
    y_cpu = conv(x)
    y_cpu.square().sum().backward()
    g_cpu, gw_cpu = x.grad.clone(), [p.grad.clone() for p in conv.parameters()]
    conv_gpu = conv.to(CUDA)
    conv_gpu.zero_grad()
    xg = x.detach().to(CUDA).requires_grad_(True)
    y_gpu = conv_gpu(xg)
    y_gpu.square().sum().backward()
    assert torch.allclose(y_gpu.cpu(), y_cpu, rtol=1e-10, atol=1e-10)
    assert torch.allclose(xg.grad.cpu(), g_cpu, rtol=1e-9, atol=1e-9)
    for p, g in zip(conv_gpu.parameters(), gw_cpu):
        assert torch.allclose(p.grad.cpu(), g, rtol=1e-9, atol=1e-9)


def test_rings_path_equals_dense_path_on_cuda():
    torch.manual_seed(0)
    dense = GMRConv(2, 16, 16, 9, impl="dense").to(CUDA)
    rings = GMRConv(2, 16, 16, 9, impl="rings").to(CUDA)
    rings.load_state_dict(dense.state_dict())
    x = torch.randn(2, 16, 40, 40, device=CUDA)
    with torch.no_grad():
        ref = dense(x)
        assert torch.allclose(rings(x), ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()))


def test_gmr_resnet_is_exactly_invariant_on_cuda():
    torch.manual_seed(0)
    net = create_model("gmr_resnet18", num_classes=5, base_channels=8).to(CUDA).eval()
    x = torch.randn(2, 3, 96, 96, device=CUDA)
    with torch.no_grad():
        ref = net(x)
        for view in (x.rot90(1, (2, 3)), x.rot90(2, (2, 3)), x.flip(3), x.flip(2).rot90(1, (2, 3))):
            assert torch.allclose(net(view), ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()))
        assert torch.allclose(net.cpu()(x.cpu()), ref.cpu(), rtol=1e-3, atol=1e-3 * float(ref.abs().max()))


def test_training_epoch_under_bf16_autocast_on_cuda(tmp_path):
    from benchmarks.synthetic import demo_slide_path, read_demo_tissue, tissue_tiles, write_tile_folder
    from pipeline.config import ModelSpec
    from pipeline.models import load_model
    from training.config import load_train_config
    from training.loop import train

    tiles = tissue_tiles(read_demo_tissue(demo_slide_path()), 8, 96)
    root = write_tile_folder(tmp_path / "tiles", tiles, 32, classes=("A", "B"))
    cfg = {"task": "classify", "model": "gmr_resnet18", "model_kwargs": {"base_channels": 8}, "tile_px": 96, "mpp": 0.5,
           "epochs": 2, "batch_size": 8, "num_workers": 2, "out": str(tmp_path / "run"), "amp": True, "device": "cuda",
           "select": "val_accuracy", "data": {"kind": "folder", "root": str(root), "mpp": 0.5, "val_fraction": 0.25}}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    summary = train(load_train_config(tmp_path / "c.yaml"), log=lambda s: None)
    rows = (tmp_path / "run" / "metrics.csv").read_text().splitlines()
    assert len(rows) == 3 and summary["best_epoch"] >= 1
    loaded = load_model(ModelSpec(task="classify", model=summary["best"], classes=["x"]), check=False)
    assert all(torch.isfinite(p).all() for p in loaded.module.state_dict().values() if p.is_floating_point())


def test_nuclei_probability_on_cuda_matches_the_cpu():
    """The shipped nuclei model's maps on the GPU (fp32, autocast off) against the CPU's, and the nuclei they give."""
    from pipeline.config import PRESETS, ModelSpec
    from pipeline.instances import PostProcess
    from pipeline.models import load_model
    from pipeline.nuclei import image_block_maps, labels_from_block_maps, margin_px, probability_from_block_maps

    spec = ModelSpec(**PRESETS["nuclei"])
    loaded = load_model(spec)
    rgb = np.ascontiguousarray(read_tissue_crop())
    margin = margin_px(loaded.module)
    out = {}
    for dev in (torch.device("cpu"), CUDA):
        loaded.module.to(dev)
        blocks = list(image_block_maps(loaded.module, loaded.mean, loaded.std, rgb, 0.5, spec.mpp, dev, amp=False,
                                       block_px=256, margin=margin))
        out[dev.type] = probability_from_block_maps(blocks, margin), labels_from_block_maps(blocks, PostProcess(), margin)
    prob_cpu, labels_cpu = out["cpu"]
    prob_gpu, labels_gpu = out["cuda"]
    assert np.abs(prob_gpu.astype(int) - prob_cpu.astype(int)).max() <= 1  # one x255 level
    n_cpu, n_gpu = len(np.unique(labels_cpu)) - 1, len(np.unique(labels_gpu)) - 1
    assert n_cpu > 20 and abs(n_gpu - n_cpu) <= max(2, n_cpu // 50)


def read_tissue_crop() -> np.ndarray:
    from benchmarks.synthetic import demo_slide_path, read_demo_tissue

    return read_demo_tissue(demo_slide_path())[1000:1512, 600:1112]
