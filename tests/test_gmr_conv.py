"""The GMRConv test battery, for every spatial_dims: smoke, bad arguments, shapes, the
kernel against the paper's formula, the ring path against the full-kernel path, gradcheck,
torch.compile/torch.export, exact grid-symmetry equivariance, and the pitfalls measured in
the authors' reference package."""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
import torch.nn.functional as F

from conftest import assert_close_rel, max_rel_err
from gmr_models import GMRConv, GMRConv1d, GMRConv2d, GMRConv3d
from gmr_models.layers.gmr_conv import ring_geometry
from gmr_models.symmetry import apply_symmetry, grid_symmetries

DIMS = (1, 2, 3)
SIZE = {1: 17, 2: 12, 3: 7}
CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def _x(d, n=2, c=4, size=None, dtype=torch.float32):
    return torch.randn(n, c, *([size or SIZE[d]] * d), dtype=dtype)


# ---------------------------------------------------------------- smoke and shapes
@pytest.mark.parametrize("d", DIMS)
@pytest.mark.parametrize("impl", ["dense", "rings", "auto"])
def test_smoke_and_same_shape(d, impl):
    conv = GMRConv(d, 4, 6, kernel_size=5, impl=impl)
    y = conv(_x(d))
    assert y.shape == (2, 6, *([SIZE[d]] * d))
    y.sum().backward()
    assert conv.weight.grad is not None and conv.log_sigma.grad is not None


@pytest.mark.parametrize("d", DIMS)
@pytest.mark.parametrize(
    "kwargs, size, expected",
    [
        (dict(padding="valid"), 11, 7),
        (dict(padding=1), 11, 9),
        (dict(stride=2), 11, 6),
        (dict(stride=2, padding="valid"), 11, 4),
        (dict(dilation=2), 11, 11),
        (dict(dilation=2, padding="valid"), 11, 3),
    ],
)
def test_output_shapes_match_torch(d, kwargs, size, expected):
    conv = GMRConv(d, 2, 3, kernel_size=5, **kwargs)
    y = conv(torch.randn(1, 2, *([size] * d)))
    assert y.shape == (1, 3, *([expected] * d))


def test_per_dimension_aliases():
    assert GMRConv1d(2, 3, 3).spatial_dims == 1
    assert GMRConv2d(2, 3, 3).spatial_dims == 2
    assert GMRConv3d(2, 3, 3).spatial_dims == 3


# ---------------------------------------------------------------- bad arguments
@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(spatial_dims=4), "spatial_dims"),
        (dict(spatial_dims=0), "spatial_dims"),
        (dict(kernel_size=4), "kernel_size must be odd"),
        (dict(kernel_size=0), "kernel_size must be odd"),
        (dict(kernel_size=(3, 5)), "isotropic"),
        (dict(num_rings=6), "num_rings"),
        (dict(num_rings=0), "num_rings"),
        (dict(groups=3), "groups"),
        (dict(in_channels=0), "in_channels"),
        (dict(out_channels=-1), "out_channels"),
        (dict(padding="full"), "padding"),
        (dict(padding=-1), "padding"),
        (dict(stride=0), "stride"),
        (dict(padding_mode="mirror"), "padding_mode"),
        (dict(sigma="ring"), "sigma"),
        (dict(profile="disk"), "profile"),
        (dict(impl="fft"), "impl"),
    ],
)
def test_bad_arguments_raise_value_error(kwargs, match):
    args = dict(spatial_dims=2, in_channels=4, out_channels=4, kernel_size=5)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        GMRConv(**args)


@pytest.mark.parametrize("d", DIMS)
def test_wrong_input_shape_is_a_value_error(d):
    conv = GMRConv(d, 4, 4, 3)
    with pytest.raises(ValueError, match="expects input"):
        conv(torch.randn(2, 3, *([8] * d)))
    with pytest.raises(ValueError, match="expects input"):
        conv(torch.randn(2, 4, *([8] * (d + 1))))


# ---------------------------------------------------------------- the kernel itself
def test_ring_geometry_follows_the_paper():
    radius, index, mu, delta = ring_geometry(9, 2, 5)
    assert delta == pytest.approx(9 / 8)
    assert mu.tolist() == pytest.approx([0, 1.125, 2.25, 3.375, 4.5])
    assert radius.shape == (1, 81)
    assert int((index < 0).sum()) == 81 - int((radius[0] <= 4.5).sum())


@pytest.mark.parametrize("k", [3, 5, 9, 11])
def test_default_rings_and_sigma_init(k):
    conv = GMRConv(2, 1, 1, k)
    n = k // 2 + 1
    assert conv.num_rings == n
    delta = k / (2 * (n - 1))
    fwhm = 2 * math.sqrt(2 * math.log(2)) * conv.sigmas()
    assert torch.allclose(fwhm, torch.full((n,), delta), rtol=1e-6)
    assert conv.log_sigma.shape == (n,) and conv.log_sigma.requires_grad


def test_kernel_matches_the_paper_equation_pixel_by_pixel():
    conv = GMRConv(2, 2, 3, kernel_size=7).double()
    with torch.no_grad():
        conv.log_sigma.copy_(torch.tensor([0.1, -0.3, 0.2, 0.5], dtype=torch.float64))
    with torch.no_grad():
        kernel = conv.kernel()
        sig = conv.log_sigma.exp()
    for o in range(3):
        for c in range(2):
            for u in range(7):
                for v in range(7):
                    r = math.hypot(u - 3, v - 3)
                    want = 0.0
                    if r <= 3.5:
                        want = sum(
                            float(conv.weight[o, c, i]) * math.exp(-((r - i * conv.delta) ** 2) / (2 * float(sig[i]) ** 2))
                            for i in range(4)
                        )
                    assert float(kernel[o, c, u, v]) == pytest.approx(want, abs=1e-12)


def test_sigma_is_clipped_and_stored_as_log():
    conv = GMRConv(2, 1, 1, 5)
    with torch.no_grad():
        conv.log_sigma.copy_(torch.tensor([-20.0, 0.0, 20.0]))
    assert conv.sigmas().tolist() == pytest.approx([1e-2, 1.0, 6.0])


def test_hard_rings_baseline_is_piecewise_constant_and_circular():
    conv = GMRConv(2, 1, 1, 9, sigma="none")
    basis = conv.ring_basis()
    assert set(basis.unique().tolist()) <= {0.0, 1.0}
    assert basis.sum(0)[0, 0] == 0  # corner outside the inscribed circle
    assert torch.all(basis.sum(0)[4] == 1)  # the central row lies inside: every pixel in one ring
    assert "log_sigma" in conv.state_dict() and not conv.log_sigma.requires_grad


def test_non_circular_keeps_corners():
    basis = GMRConv(2, 1, 1, 9, circular=False).ring_basis()
    assert basis[:, 0, 0].sum() > 0


def test_index_profile_matches_the_reference_formula():
    conv = GMRConv(2, 1, 1, 9, profile="index").double()
    _, index, _, _ = ring_geometry(9, 2, 5)
    with torch.no_grad():
        sig = conv.sigmas()
        basis = conv.ring_basis().reshape(5, -1)
    for i in range(5):
        for p in range(81):
            h = int(index[p])
            want = 0.0 if h < 0 else math.exp(-0.5 * ((h - i) / float(sig[i])) ** 2) / (float(sig[i]) * math.sqrt(2 * math.pi))
            assert float(basis[i, p]) == pytest.approx(want, abs=1e-12)


def test_index_profile_agrees_with_the_authors_package():
    """The README says this is tested, so it runs: `make setup` installs gmr-conv (the bench extra); no skip."""
    import GMR_Conv
    ref = GMR_Conv.GMR_Conv2d(3, 4, 9, padding="same")
    ours = GMRConv(2, 3, 4, 9, profile="index")
    with torch.no_grad():
        ours.weight.copy_(ref.weight)
        ours.log_sigma.copy_(ref.log_sigmas)
    assert torch.allclose(ours.kernel(), ref._make_weight_matrix(ref.weight), atol=1e-6)


@pytest.mark.parametrize("sigma", ["layer", "channel"])
def test_init_variance_matches_torch_conv(sigma):
    """Kaiming bound from the kernel's true fan: output variance ~ torch's default conv."""
    torch.manual_seed(1)
    x = torch.randn(4, 64, 24, 24)
    gmr_var = torch.stack([GMRConv(2, 64, 64, 9, sigma=sigma, bias=False)(x).var() for _ in range(4)]).mean()
    ref_var = torch.stack([torch.nn.Conv2d(64, 64, 9, padding=4, bias=False)(x).var() for _ in range(4)]).mean()
    assert 0.5 < float(gmr_var / ref_var) < 2.0


# ---------------------------------------------------------------- rings path == full-kernel path
@pytest.mark.parametrize("d", DIMS)
@pytest.mark.parametrize(
    "kwargs",
    [
        dict(),
        dict(in_channels=8, out_channels=3),  # mix-first branch
        dict(groups=2),
        dict(in_channels=8, out_channels=4, groups=4),
        dict(sigma="channel"),
        dict(sigma="channel", groups=2),
        dict(sigma="none"),
        dict(profile="index"),
        dict(profile="area"),
        dict(stride=2),
        dict(dilation=2),
        dict(padding="valid", bias=False),
        dict(padding_mode="reflect"),
        dict(padding_mode="circular", stride=2),
        dict(circular=False, num_rings=2),
        dict(basis_norm="unit"),
        dict(basis_norm="unit", sigma="channel"),
    ],
)
def test_rings_path_equals_dense_path_forward_and_gradients(d, kwargs):
    args = dict(in_channels=4, out_channels=6, kernel_size=5)
    args.update(kwargs)
    dense = GMRConv(d, impl="dense", **args)
    rings = copy.deepcopy(dense)
    rings.impl = "rings"
    x = _x(d, c=args["in_channels"]).requires_grad_()
    x2 = x.detach().clone().requires_grad_()
    yd, yr = dense(x), rings(x2)
    assert_close_rel(yr, yd, 1e-5)
    g = torch.randn_like(yd)
    yd.backward(g)
    yr.backward(g)
    assert_close_rel(x2.grad, x.grad, 1e-5)
    for (name, pd), pr in zip(dense.named_parameters(), rings.parameters()):
        if pd.grad is not None or pr.grad is not None:
            assert_close_rel(pr.grad, pd.grad, 1e-4 if name == "log_sigma" else 1e-5)


@pytest.mark.parametrize("d", DIMS)
def test_dense_path_equals_explicit_padding_and_torch_conv(d):
    """The pitfall of the reference fast path: padding_mode must be honoured."""
    conv = GMRConv(d, 3, 2, 5, padding_mode="replicate", impl="dense")
    x = _x(d, c=3)
    want = CONV[d](F.pad(x, [2, 2] * d, mode="replicate"), conv.kernel(), conv.bias)
    assert_close_rel(conv(x), want, 1e-6)


@pytest.mark.parametrize("d", DIMS)
@pytest.mark.parametrize("impl", ["dense", "rings"])
@pytest.mark.parametrize("sigma", ["layer", "channel"])
@pytest.mark.parametrize("basis_norm", ["none", "unit"])
def test_gradcheck_float64(d, impl, sigma, basis_norm):
    conv = GMRConv(d, 2, 3, 3, impl=impl, sigma=sigma, groups=1, basis_norm=basis_norm, dtype=torch.float64)
    x = torch.randn(1, 2, *([5] * d), dtype=torch.float64, requires_grad=True)
    params = (conv.weight, conv.log_sigma, conv.bias)

    def fn(inp, w, ls, b):
        with torch.nn.utils.stateless._reparametrize_module(conv, {"weight": w, "log_sigma": ls, "bias": b}):
            return conv(inp)

    assert torch.autograd.gradcheck(fn, (x, *params), eps=1e-6, atol=1e-5)


@pytest.mark.parametrize("d", DIMS)
@pytest.mark.parametrize("sigma", ["layer", "channel"])
def test_unit_basis_conditions_the_rings_and_spans_the_same_kernels(d, sigma):
    plain = GMRConv(d, 3, 4, 9, sigma=sigma, dtype=torch.float64)
    unit = GMRConv(d, 3, 4, 9, sigma=sigma, basis_norm="unit", dtype=torch.float64)
    energy = lambda conv: conv.ring_basis().flatten(-d).square().sum(-1)  # noqa: E731
    assert float(energy(plain).max() / energy(plain).min()) > 2.5  # the paper's rings: unevenly scaled
    assert torch.allclose(energy(unit), torch.ones_like(energy(unit)))
    with torch.no_grad():  # same function class: rescaled weights give the plain layer's kernel exactly
        norms = energy(plain).sqrt()
        unit.weight.copy_(plain.weight * (norms if sigma == "layer" else norms[None]))
        unit.bias.copy_(plain.bias)
    assert_close_rel(unit.kernel(), plain.kernel(), 1e-12)
    with pytest.raises(ValueError, match="basis_norm"):
        GMRConv(d, 3, 4, 5, basis_norm="l1")


# ---------------------------------------------------------------- compile and export
@pytest.mark.parametrize("d", DIMS)
def test_torch_compile_fullgraph_agrees(d):
    conv = GMRConv(d, 3, 4, 5)
    compiled = torch.compile(conv, backend="aot_eager", fullgraph=True)
    x = _x(d, c=3)
    assert_close_rel(compiled(x), conv(x), 1e-6)
    compiled(x).sum().backward()
    assert conv.weight.grad is not None


@pytest.mark.parametrize("d", DIMS)
def test_torch_export_agrees_with_eager_eval(d):
    conv = GMRConv(d, 3, 4, 5).eval()
    x = _x(d, c=3)
    exported = torch.export.export(conv, (x,))
    with torch.no_grad():
        assert_close_rel(exported.module()(x), conv(x), 1e-6)


# ---------------------------------------------------------------- exact equivariance
@pytest.mark.parametrize("d", DIMS)
@pytest.mark.parametrize("impl", ["dense", "rings"])
@pytest.mark.parametrize("variant", [dict(), dict(profile="index"), dict(profile="area"), dict(sigma="none"), dict(sigma="channel"),
                                     dict(basis_norm="unit", sigma="channel")])
def test_exact_equivariance_to_every_grid_symmetry(d, impl, variant):
    conv = GMRConv(d, 3, 4, 5, impl=impl, **variant).eval()
    x = _x(d, c=3, size=8)
    with torch.no_grad():
        y = conv(x)
        for g in grid_symmetries(d):
            assert_close_rel(conv(apply_symmetry(x, g)), apply_symmetry(y, g), 1e-5)


def test_random_dense_kernel_is_not_equivariant():
    """The same check fails for an ordinary convolution: the test can fail."""
    conv = torch.nn.Conv2d(3, 4, 5, padding=2)
    x = _x(2, c=3, size=8)
    with torch.no_grad():
        errs = [max_rel_err(conv(apply_symmetry(x, g)), apply_symmetry(conv(x), g)) for g in grid_symmetries(2)[1:]]
    assert min(errs) > 1e-2


def test_arbitrary_angle_equivariance_on_the_central_disc():
    """45 degrees: approximately equivariant inside the central disc, far better than dense."""
    from benchmarks.equivariance import rotation_error, smooth_image

    x = smooth_image(1, 3, 65)
    gmr = GMRConv(2, 3, 4, 9, bias=False).double()
    dense = torch.nn.Conv2d(3, 4, 9, padding=4, bias=False).double()
    err_gmr = rotation_error(gmr, x, 45.0)
    err_dense = rotation_error(dense, x, 45.0)
    assert err_gmr < 0.05
    assert err_dense > 3 * err_gmr


# ---------------------------------------------------------------- state, caching, devices
def test_cache_never_enters_state_dict_and_load_invalidates_it():
    conv = GMRConv(2, 3, 4, 5).eval().freeze()
    x = _x(2, c=3)
    with torch.no_grad():
        y0 = conv(x)
    assert conv._cache and set(conv.state_dict()) == {"weight", "bias", "log_sigma"}
    other = GMRConv(2, 3, 4, 5)
    conv.load_state_dict(other.state_dict())
    with torch.no_grad():
        y1 = conv(x)
        want = other.eval()(x)
    assert not torch.allclose(y0, y1)
    assert_close_rel(y1, want, 1e-6)


def test_train_eval_and_grad_modes_agree():
    conv = GMRConv(2, 3, 4, 7)
    x = _x(2, c=3)
    y_train = conv(x)
    conv.eval().freeze()
    with torch.no_grad():
        y_eval = conv(x)
        y_eval_again = conv(x)  # served from the cache
    assert_close_rel(y_eval, y_train.detach(), 1e-6)
    assert torch.equal(y_eval, y_eval_again)
    conv.train()
    assert not conv.frozen  # train() leaves frozen mode
    with torch.no_grad():
        conv.weight.mul_(2)  # an optimiser step bumps the version counter
    with torch.no_grad():
        assert_close_rel(conv.eval()(x), 2 * (y_eval - conv.bias.view(1, -1, 1, 1)) + conv.bias.view(1, -1, 1, 1), 1e-5)


def _fresh(conv: GMRConv, x: torch.Tensor) -> torch.Tensor:
    """The output computed from the parameters as they are now, bypassing every cache."""
    return F.conv2d(x, conv.kernel(), conv.bias, padding=conv.kernel_size // 2)


@pytest.mark.parametrize("edit", ["weight", "log_sigma"])
def test_no_stale_kernel_after_param_data_edits(edit):
    """``param.data`` edits bypass version counters: an unfrozen layer must still see them."""
    conv = GMRConv(2, 3, 4, 5, impl="dense").eval()
    x = _x(2, c=3)
    with torch.no_grad():
        conv(x)
        getattr(conv, edit).data.mul_(1.5)
        assert_close_rel(conv(x), _fresh(conv, x), 1e-6)
    assert not conv._cache  # nothing is cached unless frozen


def test_no_stale_kernel_under_parametrize():
    """A parametrized weight is recomputed at every access and may reuse a freed address."""
    from torch.nn.utils import parametrize

    class Scale(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.factor = 1.0

        def forward(self, w):
            return w * self.factor

    for frozen in (False, True):
        conv = GMRConv(2, 3, 4, 5, impl="dense").eval()
        scale = Scale()
        parametrize.register_parametrization(conv, "weight", scale)
        if frozen:
            conv.freeze()
        x = _x(2, c=3)
        with torch.no_grad():
            for step in range(30):
                scale.factor = 1.0 + step / 10
                assert_close_rel(conv(x), _fresh(conv, x), 1e-6)


def test_data_parallel_replicas_get_their_own_cache():
    conv = GMRConv(2, 3, 4, 5).eval().freeze()
    with torch.no_grad():
        conv(_x(2, c=3))
    replica = conv._replicate_for_data_parallel()
    assert conv._cache and replica._cache == {} and replica._cache is not conv._cache


def test_frozen_mode_builds_the_kernel_once_and_freeze_kernels_reaches_every_layer(monkeypatch):
    from gmr_models import create_model, freeze_kernels

    net = create_model("gmr_unet", base_channels=4, kernel_sizes=(5, 3)).eval()
    convs = [m for m in net.modules() if isinstance(m, GMRConv)]
    calls = []
    for m in convs:
        build = m.conv_weights
        monkeypatch.setattr(m, "conv_weights", lambda impl, build=build: calls.append(impl) or build(impl))
    x = _x(2, c=3, size=8)
    with torch.no_grad():
        y0 = net(x)
        net(x)
        assert len(calls) == 2 * len(convs)  # unfrozen: built at every forward
        freeze_kernels(net)
        calls.clear()
        y1, y2 = net(x), net(x)
    assert len(calls) == len(convs) and all(m.frozen for m in convs)
    assert torch.equal(y1, y2) and torch.allclose(y0, y1, atol=1e-6)
    freeze_kernels(net, False)
    assert not any(m.frozen for m in convs)


def test_float64_construction_and_to_dtype():
    conv = GMRConv(2, 2, 2, 5, dtype=torch.float64)
    assert conv.weight.dtype == torch.float64 and conv.ring_basis().dtype == torch.float64
    conv = conv.float()
    assert conv(_x(2, c=2)).dtype == torch.float32


def test_save_and_load_with_weights_only():
    conv = GMRConv(3, 2, 3, 5, sigma="channel")
    buf = io.BytesIO()
    torch.save(conv.state_dict(), buf)
    buf.seek(0)
    fresh = GMRConv(3, 2, 3, 5, sigma="channel")
    fresh.load_state_dict(torch.load(buf, weights_only=True))
    x = _x(3, c=2)
    assert torch.equal(fresh(x), conv(x))


def test_auto_picks_rings_for_large_kernels_on_cpu():
    conv = GMRConv(2, 128, 128, 9)
    assert conv.choose_impl(torch.empty(1, 128, 8, 8)) == "rings"
    with torch.no_grad():
        assert conv.choose_impl(torch.empty(1, 128, 8, 8)) == "rings"


def test_auto_takes_the_dense_path_off_the_cpu():
    """On CUDA (measured: 6x per training step of the paper's GMR-ResNet-18 on an H200) and any device without
    a CPU-calibrated cost model, the layer that goes to rings on the CPU goes dense."""
    conv = GMRConv(2, 128, 128, 9)
    assert conv.choose_impl(torch.empty(1, 128, 8, 8, device="meta")) == "dense"
    if torch.cuda.is_available():
        assert conv.to("cuda").choose_impl(torch.empty(1, 128, 8, 8, device="cuda")) == "dense"


def test_auto_sends_narrow_many_ring_layers_to_dense_for_cpu_inference():
    # the nuclei U-Net's first levels: moving C_in * n ring responses costs more than the dense MACs saved
    conv = GMRConv(2, 32, 32, 5, num_rings=5, sigma="channel")
    x = torch.empty(1, 32, 8, 8)
    with torch.no_grad():
        assert conv.choose_impl(x) == "dense"
        assert GMRConv(2, 32, 32, 9, num_rings=5, sigma="channel").choose_impl(x) == "rings"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("impl", ["dense", "rings", "auto"])
def test_cuda_matches_cpu(impl):
    conv = GMRConv(2, 3, 4, 9, impl=impl)
    x = _x(2, c=3)
    want = conv(x)
    got = conv.cuda()(x.cuda()).cpu()
    assert_close_rel(got, want, 1e-4)
