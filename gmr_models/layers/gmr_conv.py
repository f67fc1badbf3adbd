"""GMR-Conv: convolution with a radially symmetric kernel built from Gaussian rings.

The kernel of output channel ``o`` and input channel ``c`` is a learned mix of ``n`` fixed
radial profiles ("ring images") ``B_i``::

    K[o, c, u] = sum_i W[o, c, i] * B_i(u)
    B_i(u)     = exp(-(|u| - mu_i)^2 / (2 sigma_i^2))          (profile="radius", the paper's eq.)
    mu_i       = i * Delta,  Delta = k / (2 (n - 1)),  i = 0 .. n-1
    sigma_i    = Delta / 2.355 at init (full width at half maximum = Delta)

with ``|u|`` the Euclidean distance of kernel position ``u`` from the centre and positions
outside the inscribed circle/sphere (``|u| > k/2``) zeroed. Because ``B_i`` depends on
``|u|`` only, the layer commutes exactly with 90-degree rotations and flips of the input
(any permutation and sign change of the spatial axes) and approximately with other angles.

Two computations give the same result (Du et al., 2025, Sec. 3.3):

* ``impl="dense"`` builds ``K`` and calls ``conv{1,2,3}d``.
* ``impl="rings"`` convolves every input channel with the ``n`` ring images (a depthwise
  convolution, stride inside it) and mixes the ``C_in * n`` responses with a 1x1
  convolution; when ``out_channels < in_channels`` it mixes first and ring-convolves after.
* ``impl="auto"`` picks between them on the CPU from a cost model calibrated with
  ``gmrpath benchmark conv``/``impl``; on CUDA it takes the dense path, which measured faster
  there for whole networks (6x per training step of the paper's GMR-ResNet-18 on an H200).

Example:
    >>> import torch
    >>> from gmr_models import GMRConv
    >>> conv = GMRConv(2, in_channels=3, out_channels=8, kernel_size=9)
    >>> conv(torch.randn(1, 3, 32, 32)).shape
    torch.Size([1, 8, 32, 32])
"""

from __future__ import annotations

import math
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch.nn.utils import parametrize
from torch import Tensor, nn

from .factories import CONV_FUNCTIONS, check_spatial_dims, single_int
from .rings import AREA_SUPERSAMPLE, BASIS_NORMS, FWHM_PER_SIGMA, IMPLS, PADDING_MODES, PROFILES, RING_COST, SIGMA_MODES, ring_geometry


__all__ = ["GMRConv", "GMRConv1d", "GMRConv2d", "GMRConv3d", "ring_geometry"]

class GMRConv(nn.Module):
    """Gaussian Mixture Ring convolution for 1D, 2D and 3D inputs.

    Args:
        spatial_dims: number of spatial dimensions (1, 2 or 3).
        in_channels: channels of the input.
        out_channels: channels of the output.
        kernel_size: odd kernel size ``k`` (the same along every axis: the kernel is isotropic).
        num_rings: number of rings ``n`` (1 <= n <= k); default ``k // 2 + 1``.
        stride: stride (> 1 breaks exact equivariance; the GMR networks never use it).
        padding: ``"same"`` (default), ``"valid"`` or an int applied to every side.
        dilation: spacing between kernel taps.
        groups: blocked connections, as in ``torch.nn.Conv2d``.
        bias: add a learnable bias.
        padding_mode: ``"zeros"``, ``"reflect"``, ``"replicate"`` or ``"circular"``.
        sigma: ring width: ``"layer"`` (learnable, one per ring), ``"channel"`` (learnable,
            one per input channel and ring), ``"fixed"`` (kept at its initial value) or
            ``"none"`` (unsmoothed hard rings of earlier radial kernels, a baseline).
        profile: ``"radius"`` evaluates each Gaussian at the pixel's distance from the centre
            (the paper's equation); ``"index"`` assigns each pixel a hard ring and smooths over
            ring indices with a normalised Gaussian (the authors' reference code); ``"area"``
            averages the radius profile over 4 samples per pixel and axis.
        circular: zero kernel positions outside the inscribed circle/sphere.
        basis_norm: ``"none"`` (the paper's ring images) or ``"unit"``: each ring image divided
            by its own L2 norm (per input channel with ``sigma="channel"``). The same kernels
            are reachable (a reparameterisation), but every ring weight then moves its ring's
            pattern equally fast, so the small inner rings that carry fine detail are not
            starved of gradient (at k=9 with 9 rings their energy is up to 70x below the outer rings').
        impl: ``"dense"``, ``"rings"`` or ``"auto"`` (see the module docstring).
        device: device of the parameters.
        dtype: dtype of the parameters.

    Shape:
        - Input: ``(N, in_channels, *spatial)`` with ``len(spatial) == spatial_dims``.
        - Output: ``(N, out_channels, *spatial_out)``; with ``padding="same"`` and stride 1,
          ``spatial_out == spatial``.

    Attributes:
        weight: ring weights ``W`` of shape ``(out_channels, in_channels // groups, n)``.
        log_sigma: log ring widths, ``(n,)`` or ``(in_channels, n)``.
        bias: ``(out_channels,)`` or None.

    Example:
        >>> import torch
        >>> conv = GMRConv(3, 2, 4, kernel_size=5).eval()
        >>> x = torch.randn(1, 2, 8, 8, 8)
        >>> y = conv(x)
        >>> torch.allclose(conv(x.flip(2).transpose(3, 4)), y.flip(2).transpose(3, 4), atol=1e-5)
        True
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        num_rings: Optional[int] = None,
        stride: int = 1,
        padding: Union[str, int] = "same",
        dilation: int = 1,
        groups: int = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        sigma: str = "layer",
        profile: str = "radius",
        circular: bool = True,
        impl: str = "auto",
        basis_norm: str = "none",
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.spatial_dims = check_spatial_dims(spatial_dims)
        for name, value in (("in_channels", in_channels), ("out_channels", out_channels)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        kernel_size = single_int("kernel_size", kernel_size)
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd and positive (the kernel needs a centre pixel), got {kernel_size}")
        num_rings = kernel_size // 2 + 1 if num_rings is None else num_rings
        if not isinstance(num_rings, int) or not 1 <= num_rings <= kernel_size:
            raise ValueError(f"num_rings must be an int in [1, kernel_size={kernel_size}], got {num_rings!r}")
        stride = single_int("stride", stride)
        dilation = single_int("dilation", dilation)
        if stride < 1 or dilation < 1:
            raise ValueError(f"stride and dilation must be >= 1, got stride={stride}, dilation={dilation}")
        if not isinstance(groups, int) or groups < 1 or in_channels % groups or out_channels % groups:
            raise ValueError(
                f"groups={groups!r} must be a positive int dividing in_channels={in_channels} and out_channels={out_channels}"
            )
        if isinstance(padding, str):
            if padding not in ("same", "valid"):
                raise ValueError(f"padding must be 'same', 'valid' or an int, got {padding!r}")
            pad = dilation * (kernel_size // 2) if padding == "same" else 0
        else:
            pad = single_int("padding", padding)
            if pad < 0:
                raise ValueError(f"padding must be >= 0, got {pad}")
        for name, value, allowed in (
            ("padding_mode", padding_mode, PADDING_MODES),
            ("sigma", sigma, SIGMA_MODES),
            ("profile", profile, PROFILES),
            ("impl", impl, IMPLS),
            ("basis_norm", basis_norm, BASIS_NORMS),
        ):
            if value not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {value!r}")

        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.num_rings = kernel_size, num_rings
        self.stride, self.padding, self.dilation, self.groups = stride, padding, dilation, groups
        self.padding_mode, self.sigma, self.profile = padding_mode, sigma, profile
        self.circular, self.impl, self.basis_norm = circular, impl, basis_norm
        self._pad = pad

        supersample = AREA_SUPERSAMPLE if profile == "area" else 1
        radius, index, mu, delta = ring_geometry(kernel_size, self.spatial_dims, num_rings, supersample)
        inside = radius <= kernel_size / 2.0 if circular else torch.ones_like(radius, dtype=torch.bool)
        if not circular:  # without the circular cut the outer ring reaches the corners
            index[index < 0] = num_rings - 1
        self.delta = delta
        # geometry is derived from the arguments: non-persistent buffers (never in state_dict),
        # re-cast from these float64 masters whenever the module changes dtype or device
        self._geometry = {"_radius": radius, "_inside": inside.to(torch.float64), "_mu": mu}
        buffer_dtype = dtype if dtype is not None else torch.get_default_dtype()
        for name, value in self._geometry.items():
            self.register_buffer(name, value.to(device=device, dtype=buffer_dtype), persistent=False)
        self.register_buffer("_index", index.to(device=device), persistent=False)

        self.weight = nn.Parameter(torch.empty(out_channels, in_channels // groups, num_rings, **factory))
        self.bias = nn.Parameter(torch.empty(out_channels, **factory)) if bias else None
        sigma_shape = (in_channels, num_rings) if sigma == "channel" else (num_rings,)
        log_sigma = torch.empty(sigma_shape, **factory)
        if sigma in ("layer", "channel"):
            self.log_sigma = nn.Parameter(log_sigma)
        else:  # a fixed width is still state: a trained model may have been saved with another
            self.register_buffer("log_sigma", log_sigma)
        self._cache: dict = {}
        self._frozen = False
        self.reset_parameters()

    # ------------------------------------------------------------------ parameters
    def reset_parameters(self) -> None:
        """Initialise sigma (FWHM = Delta) and draw Kaiming-uniform ring weights.

        The bound uses the kernel's true fan-in, ``in_channels/groups * sum_i sum_u B_i(u)^2``,
        so the built kernel has the variance torch's default gives a dense convolution of
        the same size (counting only the ``n`` ring weights would overstate it k^d/n-fold).
        """
        if self.weight.is_meta:  # built on the meta device to size a network: nothing to draw
            return
        with torch.no_grad():
            self.log_sigma.fill_(math.log(self.delta / FWHM_PER_SIGMA))
            energy = float(self.ring_basis().square().sum())
            if self.sigma == "channel":
                energy /= self.in_channels
            fan_in = self.in_channels // self.groups * max(energy, 1e-12)
            bound = 1.0 / math.sqrt(fan_in)  # kaiming_uniform_(a=sqrt(5)), torch's conv default
            nn.init.uniform_(self.weight, -bound, bound)
            if self.bias is not None:
                nn.init.uniform_(self.bias, -bound, bound)
        self._cache.clear()

    def sigmas(self) -> Tensor:
        """Ring widths ``exp(log_sigma)`` clipped to ``[1e-2, 2n]``."""
        return self.log_sigma.exp().clamp(1e-2, 2.0 * self.num_rings)

    def ring_basis(self) -> Tensor:
        """The ring images ``B_i``.

        Shape:
            ``(n, k, ..., k)``, or ``(in_channels, n, k, ..., k)`` when ``sigma="channel"``.
        """
        n, d, k = self.num_rings, self.spatial_dims, self.kernel_size
        if self.sigma == "none":
            basis = (self._index[None] == torch.arange(n, device=self._index.device)[:, None]).to(self._radius.dtype)
        elif self.profile == "index":
            sig = self.sigmas()[..., None]  # (..., n, 1)
            valid = (self._index >= 0).to(sig.dtype)
            ring = torch.arange(n, device=sig.device, dtype=sig.dtype)
            diff = self._index.clamp(min=0).to(sig.dtype) - ring[:, None]
            basis = torch.exp(-0.5 * (diff / sig).square()) / (sig * math.sqrt(2.0 * math.pi)) * valid
        else:
            sig = self.sigmas()[..., None, None]  # (..., n, 1, 1)
            diff = self._radius.to(sig.dtype)[None] - self._mu.to(sig.dtype)[:, None, None]  # (n, S, P)
            basis = (torch.exp(-0.5 * (diff / sig).square()) * self._inside.to(sig.dtype)).mean(-2)
        if self.basis_norm == "unit":  # (..., n, P): every ring image of unit energy
            basis = basis / basis.square().sum(-1, keepdim=True).sqrt().clamp_min(1e-12)
        return basis.reshape(*basis.shape[:-1], *([k] * d))

    def kernel(self) -> Tensor:
        """The full kernel ``K`` (the weight a dense convolution would use).

        Shape:
            ``(out_channels, in_channels // groups, k, ..., k)``.
        """
        basis = self.ring_basis()
        if basis.dim() == self.spatial_dims + 1:
            return torch.einsum("ocn,n...->oc...", self.weight, basis)
        # per-input-channel rings: input channel of (o, c) is (o // (out/groups)) * cg + c
        cg, og = self.in_channels // self.groups, self.out_channels // self.groups
        per_out = basis.reshape(self.groups, cg, *basis.shape[1:]).repeat_interleave(og, dim=0)
        return torch.einsum("ocn,ocn...->oc...", self.weight, per_out)

    # ------------------------------------------------------------------ forward
    def choose_impl(self, x: Tensor) -> str:
        """``"dense"`` or ``"rings"``: the one the cost model expects to be faster for ``x``."""
        if self.impl != "auto":
            return self.impl
        taps = self.kernel_size**self.spatial_dims
        cg, n = self.in_channels // self.groups, self.num_rings
        dense = cg * self.out_channels * taps
        costs = RING_COST.get(x.device.type)
        if costs is None:  # CUDA and other accelerators: their dense convolutions win (see RING_COST)
            return "dense"
        mode = "training" if (torch.is_grad_enabled() and self.weight.requires_grad) else "inference"
        depthwise, mix, memory = costs[mode]
        ring_channels = (self.out_channels if self._mix_first() else self.in_channels) * n
        rings = depthwise * ring_channels * taps + mix * cg * n * self.out_channels + memory * ring_channels
        return "rings" if rings < dense else "dense"

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != self.spatial_dims + 2 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"GMRConv(spatial_dims={self.spatial_dims}, in_channels={self.in_channels}) expects input "
                f"(N, {self.in_channels}, {', '.join('*' * self.spatial_dims)}), got {tuple(x.shape)}"
            )
        pad = self._pad
        if self.padding_mode != "zeros" and pad > 0:
            x = F.pad(x, [pad, pad] * self.spatial_dims, mode=self.padding_mode)
            pad = 0
        impl = self.choose_impl(x)
        conv = CONV_FUNCTIONS[self.spatial_dims]
        if impl == "dense":
            (kernel,) = self._cached(x, "dense")
            return conv(x, kernel, self.bias, self.stride, pad, self.dilation, self.groups)
        if x.device.type == "cpu" and self.spatial_dims > 1:  # oneDNN's depthwise kernels are fastest channels-last
            x = x.contiguous(memory_format=torch.channels_last if self.spatial_dims == 2 else torch.channels_last_3d)
        if self._mix_first():
            mix, spatial = self._cached(x, "mix_first")
            z = conv(x, mix, None, 1, 0, 1, self.groups)
            return conv(z, spatial, self.bias, self.stride, pad, self.dilation, self.out_channels)
        depthwise, mix = self._cached(x, "rings")
        y = conv(x, depthwise, None, self.stride, pad, self.dilation, self.in_channels)
        return conv(y, mix, self.bias, 1, 0, 1, self.groups)

    def _mix_first(self) -> bool:
        """Mix channels before the ring convolution when that leaves fewer ring channels."""
        return self.sigma != "channel" and self.out_channels < self.in_channels

    def conv_weights(self, impl: str) -> tuple[Tensor, ...]:
        """The convolution weights of one computation path.

        Returns:
            ``"dense"``: ``(K,)``. ``"rings"``: ``(depthwise (C_in*n, 1, k..), mix (C_out, C_in/g*n, 1..))``.
            ``"mix_first"``: ``(mix (C_out*n, C_in/g, 1..), spatial (C_out, n, k..))``.
        """
        d, n, k = self.spatial_dims, self.num_rings, self.kernel_size
        ones = [1] * d
        if impl == "dense":
            return (self.kernel(),)
        basis = self.ring_basis()
        cg = self.in_channels // self.groups
        if impl == "mix_first":  # 1x1 to out*n channels, then each output sums its n ring responses
            mix = self.weight.transpose(1, 2).reshape(self.out_channels * n, cg, *ones)
            return mix, basis.unsqueeze(0).expand(self.out_channels, n, *([k] * d))
        if basis.dim() == d + 1:
            depthwise = basis.unsqueeze(1).repeat(self.in_channels, *([1] * (d + 1)))
        else:
            depthwise = basis.reshape(self.in_channels * n, 1, *([k] * d))
        return depthwise, self.weight.reshape(self.out_channels, cg * n, *ones)

    # ------------------------------------------------------------------ kernel cache
    def freeze(self) -> "GMRConv":
        """Build the kernel once and reuse it for inference (``"frozen"`` mode), like timm's
        ``reparameterize``: a snapshot of the parameters as they are now.

        Until this is called every forward builds its kernel from the current parameters, so
        no edit (optimiser steps, ``param.data``, ``parametrize``, ``DataParallel`` replicas)
        can ever meet a stale kernel. Frozen, the kernel is reused while no gradient is
        recorded; it is rebuilt when the parameters' storage or version changes (optimiser
        steps, ``load_state_dict``), and dropped by :meth:`unfreeze`, ``train()`` and device or
        dtype moves. Edits that bypass version counters (``param.data``) need
        ``unfreeze()`` first. Parametrized layers are never cached. The cache is a plain
        attribute: it never enters ``state_dict``.

        Returns:
            ``self``.
        """
        self._frozen = True
        self._cache.clear()
        return self

    def unfreeze(self) -> "GMRConv":
        """Leave frozen mode: every forward builds its kernel again. Returns ``self``."""
        self._frozen = False
        self._cache.clear()
        return self

    @property
    def frozen(self) -> bool:
        """Whether built kernels are reused (see :meth:`freeze`)."""
        return self._frozen

    def train(self, mode: bool = True) -> "GMRConv":
        if mode:
            self.unfreeze()
        return super().train(mode)

    def _replicate_for_data_parallel(self):
        replica = super()._replicate_for_data_parallel()
        replica._cache = {}  # replicas get their own parameters, so never the original's kernels
        return replica

    def _cached(self, x: Tensor, impl: str) -> tuple[Tensor, ...]:
        """:meth:`conv_weights`, reused only in frozen mode (see :meth:`freeze`)."""
        if (
            not self._frozen
            or torch.is_grad_enabled()
            or torch.compiler.is_compiling()
            or torch.jit.is_scripting()
            or parametrize.is_parametrized(self)
        ):
            return self.conv_weights(impl)
        key = (x.device, x.dtype) + tuple((p.data_ptr(), p._version) for p in (self.weight, self.log_sigma))
        hit = self._cache.get(impl)
        if hit is None or hit[0] != key:
            hit = (key, self.conv_weights(impl))
            self._cache[impl] = hit
        return hit[1]

    def _apply(self, fn, recurse=True):
        self._cache.clear()
        super()._apply(fn, recurse)
        ref = self.log_sigma
        for name, master in self._geometry.items():  # exact geometry at the new precision
            setattr(self, name, master.to(device=ref.device, dtype=ref.dtype if ref.is_floating_point() else master.dtype))
        return self

    def extra_repr(self) -> str:
        s = (
            f"spatial_dims={self.spatial_dims}, {self.in_channels}, {self.out_channels}, "
            f"kernel_size={self.kernel_size}, num_rings={self.num_rings}, sigma={self.sigma!r}, "
            f"profile={self.profile!r}, impl={self.impl!r}"
        )
        defaults = {"stride": 1, "padding": "same", "dilation": 1, "groups": 1, "padding_mode": "zeros", "circular": True,
                    "basis_norm": "none"}
        s += "".join(f", {k}={getattr(self, k)!r}" for k, v in defaults.items() if getattr(self, k) != v)
        return s + (", bias=False" if self.bias is None else "")


class GMRConv1d(GMRConv):
    """:class:`GMRConv` with ``spatial_dims=1``."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, **kwargs) -> None:
        super().__init__(1, in_channels, out_channels, kernel_size, **kwargs)


class GMRConv2d(GMRConv):
    """:class:`GMRConv` with ``spatial_dims=2``."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, **kwargs) -> None:
        super().__init__(2, in_channels, out_channels, kernel_size, **kwargs)


class GMRConv3d(GMRConv):
    """:class:`GMRConv` with ``spatial_dims=3``."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, **kwargs) -> None:
        super().__init__(3, in_channels, out_channels, kernel_size, **kwargs)


def freeze_kernels(module: nn.Module, frozen: bool = True) -> nn.Module:
    """Switch every :class:`GMRConv` in ``module`` into (or out of) frozen mode
    (:meth:`GMRConv.freeze`): the slide pipeline freezes its model for inference.

    Example:
        >>> from gmr_models import create_model, freeze_kernels
        >>> net = freeze_kernels(create_model("gmr_unet", base_channels=4, kernel_sizes=(3, 3)).eval())
        >>> all(m.frozen for m in net.modules() if isinstance(m, GMRConv))
        True
    """
    for m in module.modules():
        if isinstance(m, GMRConv):
            m.freeze() if frozen else m.unfreeze()
    return module
