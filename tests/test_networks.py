"""Networks: registry, shapes, bad arguments, and exact invariance/equivariance of every GMR
network to all grid symmetries (8 in 2D, 48 in 3D) in eval mode with random weights; the
ordinary-convolution baselines are shown not to have it."""

from __future__ import annotations

import pytest
import torch

from conftest import assert_close_rel, max_rel_err
from gmr_models import create_model, list_models
from gmr_models.symmetry import apply_symmetry, grid_symmetries

CLASSIFIERS = ["gmr_resnet18", "gmr_resnet50"]
SMALL = dict(base_channels=4)
KERNELS = {2: (9, 9, 5, 5), 3: (5, 5, 3, 3)}
SIZE = {2: 32, 3: 16}


def test_registry_lists_the_required_models():
    assert {"gmr_resnet18", "gmr_resnet50", "gmr_unet", "resnet18", "resnet50", "unet"} <= set(list_models())
    assert list_models("gmr_*") == ["gmr_resnet18", "gmr_resnet50", "gmr_unet"]


def test_unknown_model_is_a_value_error_listing_names():
    with pytest.raises(ValueError, match="gmr_resnet18"):
        create_model("gmr_resnet19")


@pytest.mark.parametrize(
    "name, kwargs, match",
    [
        ("gmr_resnet18", dict(spatial_dims=4), "spatial_dims"),
        ("gmr_resnet18", dict(kernel_sizes=(9, 9, 5)), "kernel_sizes"),
        ("gmr_resnet18", dict(kernel_sizes=(9, 8, 5, 5)), "kernel_sizes"),
        ("gmr_resnet18", dict(num_classes=0), "num_classes"),
        ("gmr_resnet18", dict(dropout=1.5), "dropout"),
        ("gmr_resnet18", dict(norm="group"), "norm"),
        ("gmr_unet", dict(kernel_sizes=()), "kernel_sizes"),
        ("gmr_unet", dict(out_channels=0), "out_channels"),
        ("gmr_unet", dict(kernel_sizes=(5, 3), num_rings=(5,)), "num_rings"),
        ("gmr_unet", dict(kernel_sizes=(5, 3), num_rings=(6, 3)), "num_rings"),
        ("gmr_unet", dict(kernel_sizes=(5, 3), gmr_kwargs={"num_rings": 3}), "num_rings"),
        ("gmr_unet", dict(kernel_sizes=(5, 3), gmr_kwargs={"sigma": "wide"}), "sigma"),
        ("gmr_unet", dict(kernel_sizes=(5, 3), gmr_kwargs=["sigma"]), "gmr_kwargs"),
    ],
)
def test_bad_network_arguments(name, kwargs, match):
    with pytest.raises(ValueError, match=match):
        create_model(name, **kwargs)


def test_unet_rejects_indivisible_input():
    net = create_model("gmr_unet", **SMALL, kernel_sizes=(3, 3, 3))
    with pytest.raises(ValueError, match="divisible by 4"):
        net(torch.randn(1, 3, 30, 30))


@pytest.mark.parametrize("d", [1, 2, 3])
@pytest.mark.parametrize("name", ["gmr_resnet18", "resnet18", "gmr_resnet50"])
def test_classifier_shapes_and_backward(d, name):
    net = create_model(name, spatial_dims=d, in_channels=2, num_classes=5, kernel_sizes=(3, 3, 3, 3), **SMALL)
    y = net(torch.randn(2, 2, *([16] * d)))
    assert y.shape == (2, 5)
    y.sum().backward()


@pytest.mark.parametrize("d", [1, 2, 3])
@pytest.mark.parametrize("name", ["gmr_unet", "unet"])
def test_unet_shapes(d, name):
    net = create_model(name, spatial_dims=d, in_channels=1, out_channels=2, kernel_sizes=(3, 3, 3), **SMALL)
    assert net(torch.randn(2, 1, *([8] * d))).shape == (2, 2, *([8] * d))


def _all_transforms(x, d):
    return torch.cat([apply_symmetry(x, g) for g in grid_symmetries(d)])


@pytest.mark.parametrize("d", [2, 3])
@pytest.mark.parametrize("name", CLASSIFIERS)
def test_gmr_classifiers_are_exactly_invariant(d, name):
    net = create_model(name, spatial_dims=d, num_classes=4, kernel_sizes=KERNELS[d], **SMALL).eval()
    x = torch.randn(1, 3, *([SIZE[d]] * d))
    with torch.no_grad():
        logits = net(_all_transforms(x, d))
        other = net(torch.randn_like(x))
    assert logits.shape[0] == len(grid_symmetries(d))
    assert max_rel_err(other, logits[:1]) > 1e-3  # the logits do depend on the input
    assert_close_rel(logits, logits[:1].expand_as(logits), 1e-5)


@pytest.mark.parametrize("d", [2, 3])
@pytest.mark.parametrize("rings", [False, True])
def test_gmr_unet_is_exactly_equivariant(d, rings):
    extra = dict(num_rings=KERNELS[d], gmr_kwargs={"sigma": "channel"}) if rings else {}  # a ring per radius
    net = create_model("gmr_unet", spatial_dims=d, out_channels=2, kernel_sizes=KERNELS[d], **SMALL, **extra).eval()
    if rings:
        convs = [m for m in net.modules() if type(m).__name__ == "GMRConv"]
        assert convs and all(m.num_rings == m.kernel_size and m.sigma == "channel" for m in convs)
    x = torch.randn(1, 3, *([SIZE[d]] * d))
    with torch.no_grad():
        y = net(x)
        for g, yg in zip(grid_symmetries(d), net(_all_transforms(x, d))):
            assert_close_rel(yg[None], apply_symmetry(y, g), 1e-5)


@pytest.mark.parametrize("d", [2, 3])
@pytest.mark.parametrize("name", ["resnet18", "unet"])
def test_dense_baselines_are_not_equivariant(d, name):
    net = create_model(name, spatial_dims=d, kernel_sizes=KERNELS[d], **SMALL).eval()
    x = torch.randn(1, 3, *([SIZE[d]] * d))
    with torch.no_grad():
        y = net(x)
        outs = net(_all_transforms(x, d))
    gs = grid_symmetries(d)
    if name == "unet":
        errs = [max_rel_err(outs[i : i + 1], apply_symmetry(y, gs[i])) for i in range(1, len(gs))]
    else:
        errs = [max_rel_err(outs[i : i + 1], y) for i in range(1, len(gs))]
    assert max(errs) > 1e-3


def test_gmr_resnet18_default_is_the_paper_configuration():
    net = create_model("gmr_resnet18", num_classes=9)
    from gmr_models import GMRConv

    ks = sorted({m.kernel_size for m in net.modules() if isinstance(m, GMRConv)})
    assert ks == [5, 9]
    assert net.head[-1].out_features == 9
    assert not any(getattr(m, "stride", 1) not in (1, (1, 1)) for m in net.modules() if isinstance(m, torch.nn.Conv2d))
