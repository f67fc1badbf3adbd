"""InvariantFeatures: the module battery (smoke, bad arguments, shapes, numerics, float64 gradcheck,
torch.compile, every spatial_dims) and exact invariance to the grid symmetries."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import assert_close_rel
from gmr_models import create_model
from gmr_models.layers.invariant import InvariantFeatures
from gmr_models.symmetry import apply_symmetry, grid_symmetries

DIMS = (1, 2, 3)
SIZE = {1: 40, 2: 24, 3: 12}


@pytest.mark.parametrize("d", DIMS)
def test_shapes_and_channels(d):
    f = InvariantFeatures(d, 2, scales=(1.0, 1.5))
    y = f(torch.randn(3, 2, *([SIZE[d]] * d)))
    assert y.shape == (3, 2 * 7, *([SIZE[d]] * d)) and f.out_channels == 14
    assert not list(f.parameters()) and not f.state_dict()  # nothing to learn, nothing stored


@pytest.mark.parametrize("bad", [dict(spatial_dims=4), dict(in_channels=0), dict(in_channels=True), dict(scales=()),
                                 dict(scales=(0.1,)), dict(scales="2"), dict(scales=(float("nan"),))])
def test_bad_arguments_raise_value_error(bad):
    args = dict(spatial_dims=2, in_channels=3, scales=(1.0,))
    args.update(bad)
    with pytest.raises(ValueError):
        InvariantFeatures(**args)
    with pytest.raises(ValueError, match="expected"):
        InvariantFeatures(2, 3)(torch.randn(1, 2, 8, 8))


def test_numerics_on_known_images():
    """A ramp has gradient magnitude = its slope x scale and no curvature; a constant has neither."""
    f = InvariantFeatures(2, 1, scales=(2.0,)).double()
    yy, xx = torch.meshgrid(torch.arange(41.0), torch.arange(41.0), indexing="ij")
    ramp = (0.3 * xx + 0.4 * yy).double()[None, None]
    out = f(ramp)[0, :, 15:26, 15:26]  # away from the zero padding
    assert torch.allclose(out[1], torch.full_like(out[1], 0.5 * 2.0), atol=1e-6)  # |(0.3, 0.4)| * s
    assert out[2].abs().max() < 1e-6 and out[3].max() < 1e-5
    const = f(torch.full((1, 1, 41, 41), 7.0, dtype=torch.float64))[0, 1:, 15:26, 15:26]
    assert const.abs().max() < 1e-5  # sqrt(0 + 1e-12): the guard that keeps gradients finite


@pytest.mark.parametrize("d", DIMS)
def test_exactly_invariant_to_every_grid_symmetry(d):
    f = InvariantFeatures(d, 2, scales=(1.0, 2.0))
    x = torch.randn(1, 2, *([SIZE[d]] * d))
    y = f(x)
    for g in grid_symmetries(d):
        assert_close_rel(f(apply_symmetry(x, g)), apply_symmetry(y, g), 1e-5)


def test_a_direction_sensitive_feature_would_fail_the_check():
    """The same check catches a feature that sees orientation (the test can fail)."""
    f = InvariantFeatures(2, 1, scales=(1.0,))
    x = torch.randn(1, 1, 24, 24)
    dx = lambda t: torch.nn.functional.conv2d(t, f.bank0[:1], padding=3)  # noqa: E731  (d/dx alone)
    g = next(s for s in grid_symmetries(2) if s.perm != (0, 1))  # a quarter turn or a transpose
    assert not torch.allclose(dx(apply_symmetry(x, g)), apply_symmetry(dx(x), g), atol=1e-3)


@pytest.mark.parametrize("d", DIMS)
def test_gradcheck_float64(d):
    f = InvariantFeatures(d, 1, scales=(1.0,)).double()
    x = torch.randn(1, 1, *([7] * d), dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(f, (x,), eps=1e-6, atol=1e-5)


def test_torch_compile_agrees():
    f = InvariantFeatures(2, 3)
    x = torch.randn(1, 3, 16, 16)
    assert_close_rel(torch.compile(f, backend="aot_eager", fullgraph=True)(x), f(x), 1e-6)


def test_unet_with_the_stem_stays_exactly_equivariant_and_widens_its_margin():
    plain = create_model("gmr_unet", base_channels=4, kernel_sizes=(5, 3), out_channels=2)
    net = create_model("gmr_unet", base_channels=4, kernel_sizes=(5, 3), out_channels=2, invariant_scales=[1.0, 2.0]).eval()
    assert net.receptive_radius_px == plain.receptive_radius_px + math.ceil(3 * 2.0)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        y = net(x)
        for g in grid_symmetries(2):
            assert_close_rel(net(apply_symmetry(x, g)), apply_symmetry(y, g), 1e-5)


@pytest.mark.parametrize("d", DIMS)
def test_separable_path_equals_the_full_kernel_path(d):
    """The 1D-per-axis convolutions (what forward runs) against the full (2r + 1)^d kernels."""
    f = InvariantFeatures(d, 2, scales=(1.0, 2.5)).double()
    x = torch.randn(2, 2, *([SIZE[d]] * d), dtype=torch.float64)
    for i in range(2):
        assert_close_rel(f.responses(x, i), f.responses(x, i, separable=False), 1e-6)
