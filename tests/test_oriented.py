"""OrientedRings / OrientedGMRConv: the module battery (smoke, bad arguments, shapes, numerics, float64
gradcheck, torch.compile, every spatial_dims), exact invariance to the grid symmetries, near-invariance
at other angles on the central disc, and the grouped path against a literal per-channel loop."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import assert_close_rel
from gmr_models import create_model
from gmr_models.layers.oriented import OrientedGMRConv, OrientedRings, angular_factors
from gmr_models.symmetry import apply_symmetry, grid_symmetries

DIMS = (1, 2, 3)
SIZE = {1: 40, 2: 24, 3: 12}
ORDERS = {1: (1,), 2: (1, 2), 3: (1, 2)}


@pytest.mark.parametrize("d", DIMS)
@pytest.mark.parametrize("reduction", [1, 2])
def test_shapes_and_parameters(d, reduction):
    layer = OrientedRings(d, 4, 6, 5, orders=ORDERS[d], multiplier=2, reduction=reduction)
    y = layer(torch.randn(2, 4, *([SIZE[d]] * d)))
    assert y.shape == (2, 6, *([SIZE[d]] * d))
    channels = 4 // reduction
    assert layer.weight.shape == (len(ORDERS[d]), channels * 2, 3)
    assert layer.energies(torch.randn(1, 4, *([SIZE[d]] * d))).shape[1] == channels * 2 * len(ORDERS[d])
    conv = OrientedGMRConv(d, 4, 6, 5, orders=ORDERS[d])
    assert conv(torch.randn(1, 4, *([SIZE[d]] * d))).shape == (1, 6, *([SIZE[d]] * d))


@pytest.mark.parametrize("bad", [dict(spatial_dims=4), dict(in_channels=0), dict(out_channels=True), dict(kernel_size=1),
                                 dict(kernel_size=4), dict(orders=()), dict(orders=(3,)), dict(orders=(1, 1)),
                                 dict(orders="1"), dict(num_rings=0), dict(multiplier=0), dict(reduction=0),
                                 dict(spatial_dims=1, orders=(1, 2))])
def test_bad_arguments_raise_value_error(bad):
    args = dict(spatial_dims=2, in_channels=3, out_channels=4, kernel_size=5, orders=(1, 2))
    args.update(bad)
    with pytest.raises(ValueError):
        OrientedRings(**args)


def test_wrong_input_and_unsupported_padding_raise_value_error():
    with pytest.raises(ValueError, match="expects input"):
        OrientedRings(2, 3, 4, 5)(torch.randn(1, 2, 8, 8))
    with pytest.raises(ValueError, match="stride 1"):
        OrientedGMRConv(2, 3, 4, 5, stride=2)


def test_numerics_on_known_images():
    """Order 1 on a ramp is |slope| x a constant whatever the direction; order 2 sees no curvature in it;
    a constant image has no oriented energy."""
    layer = OrientedRings(2, 1, 1, 7, orders=(1, 2)).double()
    with torch.no_grad():
        layer.weight.fill_(1.0)
    yy, xx = torch.meshgrid(torch.arange(41.0), torch.arange(41.0), indexing="ij")
    e_a = layer.energies((0.3 * xx + 0.4 * yy).double()[None, None])[0, :, 12:29, 12:29]
    e_b = layer.energies((0.5 * xx).double()[None, None])[0, :, 12:29, 12:29]
    # the expected constant: sum over the kernel of the radial profile times u_x^2 / |u|
    radial = layer._basis0.sum(0)  # (components, P): the profile times u_j / |u|
    factors, _ = angular_factors(2, 7, 1)
    r = torch.stack(torch.meshgrid(torch.arange(-3.0, 4.0), torch.arange(-3.0, 4.0), indexing="ij"), -1).reshape(-1, 2)
    c = float((radial[0] * r[:, 0].double()).sum())
    assert torch.allclose(e_a[0], torch.full_like(e_a[0], 0.5 * abs(c)), atol=1e-6)
    assert torch.allclose(e_a[0], e_b[0], atol=1e-6)  # the same slope in another direction
    assert e_a[1].max() < 1e-3 and e_b[1].max() < 1e-3  # order 2: sqrt(0 + 1e-8) = 1e-4 on a ramp
    const = layer.energies(torch.full((1, 1, 41, 41), 3.0, dtype=torch.float64))[0, :, 12:29, 12:29]
    assert const.max() < 1e-3
    assert factors.shape == (2, 49)


@pytest.mark.parametrize("d", DIMS)
def test_exactly_invariant_to_every_grid_symmetry(d):
    layer = OrientedGMRConv(d, 3, 4, 5, orders=ORDERS[d], reduction=1).eval()
    x = torch.randn(1, 3, *([SIZE[d]] * d))
    with torch.no_grad():
        y = layer(x)
        for g in grid_symmetries(d):
            assert_close_rel(layer(apply_symmetry(x, g)), apply_symmetry(y, g), 1e-5)


def test_an_oriented_response_itself_would_fail_the_check():
    """Before the norm, one component sees direction: the same check catches it (the test can fail)."""
    layer = OrientedRings(2, 1, 1, 5, orders=(1,))
    x = torch.randn(1, 1, 24, 24)
    comp = lambda t: F.conv2d(t, layer.kernels()[0][:1], padding=2)  # noqa: E731 (the u_x / |u| component alone)
    g = next(s for s in grid_symmetries(2) if s.perm != (0, 1))
    with torch.no_grad():
        assert not torch.allclose(comp(apply_symmetry(x, g)), apply_symmetry(comp(x), g), atol=1e-3)


def test_nearly_invariant_at_other_angles_on_the_central_disc():
    """At 30 and 45 degrees the energies follow the turned image inside the disc, loosely (interpolation)."""
    import numpy as np

    from training.protocol import central_disc, rotate_image

    torch.manual_seed(0)
    layer = OrientedRings(2, 1, 1, 7, orders=(1, 2)).double()
    yy, xx = np.mgrid[:65, :65].astype(np.float64)
    image = np.exp(-((xx - 32) ** 2 / 200 + (yy - 26) ** 2 / 40)) + 0.5 * np.exp(-((xx - 40) ** 2 + (yy - 40) ** 2) / 30)
    disc = torch.from_numpy(central_disc((65, 65)) & (np.hypot(xx - 32, yy - 32) < 24))
    with torch.no_grad():
        e = lambda im: layer.energies(torch.from_numpy(np.ascontiguousarray(im))[None, None])[0]  # noqa: E731
        base = e(image)
        for angle in (30.0, 45.0):
            turned = e(rotate_image(image, angle))
            back = torch.from_numpy(np.stack([rotate_image(t.numpy(), -angle) for t in turned]))
            err = (back - base)[:, disc].abs().max() / base[:, disc].abs().max()
            assert err < 0.15, (angle, float(err))


@pytest.mark.parametrize("d", (1, 2))
def test_grouped_path_equals_a_literal_loop_over_channels(d):
    """The grouped depthwise convolution and its reshape against one convolution per channel, filter and component."""
    layer = OrientedRings(d, 3, 2, 5, orders=ORDERS[d], multiplier=2).double()
    x = torch.randn(2, 3, *([SIZE[d]] * d), dtype=torch.float64)
    conv = {1: F.conv1d, 2: F.conv2d}[d]
    layer.weight.requires_grad_(False)
    expected = []
    for i, m in enumerate(ORDERS[d]):
        factors, weights = angular_factors(d, 5, m)
        basis = getattr(layer, f"_basis{i}")
        for c in range(3):
            for f in range(2):
                total = 0.0
                for comp in range(factors.shape[0]):
                    kernel = (layer.weight[i, c * 2 + f][:, None] * basis[:, comp]).sum(0).reshape(*([5] * d))
                    total = total + weights[comp] * conv(x[:, c: c + 1], kernel[None, None], padding=2).square()
                expected.append((total + 1e-8).sqrt()[:, 0])
    with torch.no_grad():
        assert_close_rel(layer.energies(x), torch.stack(expected, 1), 1e-10)


@pytest.mark.parametrize("d", DIMS)
def test_gradcheck_float64(d):
    layer = OrientedRings(d, 2, 2, 3, orders=ORDERS[d], reduction=2).double()
    x = torch.randn(1, 2, *([6] * d), dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(layer, (x,), eps=1e-6, atol=1e-5)


def test_torch_compile_agrees():
    layer = OrientedGMRConv(2, 3, 4, 5).eval()
    x = torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        assert_close_rel(torch.compile(layer, backend="aot_eager", fullgraph=True)(x), layer(x), 1e-6)


def test_unet_with_oriented_layers_stays_exactly_equivariant_with_the_same_margin():
    kwargs = dict(base_channels=4, kernel_sizes=(5, 3), out_channels=2, invariant_scales=[1.0, 2.0])
    plain = create_model("gmr_unet", **kwargs)
    net = create_model("gmr_unet", gmr_kwargs={"orders": [1, 2], "reduction": 2}, **kwargs).eval()
    assert net.receptive_radius_px == plain.receptive_radius_px
    assert any(isinstance(m, OrientedGMRConv) for m in net.modules())
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        y = net(x)
        for g in grid_symmetries(2):
            assert_close_rel(net(apply_symmetry(x, g)), apply_symmetry(y, g), 1e-5)
