"""Oriented ring energies: what a radial kernel cannot see, kept exactly equivariant.

A GMR kernel depends on ``|u|`` only, so it answers an edge or a ridge the same whatever its
direction, and it cannot tell a line from a blob of the same profile (the paper's "information
loss"). :class:`OrientedRings` gives a layer that information back without giving up symmetry, in
the spirit of Harmonic Networks (Worrall et al. 2017) and orientation pooling (Bekkers et al.
2018, Lafarge et al. 2021). Every input channel is convolved with learned Gaussian-ring profiles
times the angular factors of order ``m``:

* ``m = 1``: ``u_j / |u|`` for each axis ``j`` (a vector field: in 2D ``cos``/``sin`` of the angle);
* ``m = 2``: ``u_i u_j / |u|^2 - delta_ij / d`` for ``i <= j`` (a traceless symmetric tensor: in
  2D ``cos 2θ``/``sin 2θ``),

and the components of each order are reduced to their norm (the modulus of a circular harmonic's
response). A rotation or flip of the grid permutes the components and changes their signs, so the
norms are exactly invariant to the grid symmetries: 90-degree rotations and flips in 2D, the 48
symmetries of the cube in 3D, the flip in 1D (order 1 only). At other angles they are nearly so.
The energies are mixed into ``out_channels`` by a 1x1 convolution, the per-channel ring convolution
+ 1x1 mix of the paper's efficient path. :class:`OrientedGMRConv` adds them to a radial
:class:`~gmr_models.layers.GMRConv` of the same size; ``gmr_kwargs={"orders": [1, 2]}`` selects it
in the networks.

Example:
    >>> import torch
    >>> layer = OrientedRings(2, in_channels=4, out_channels=8, kernel_size=5)
    >>> x = torch.randn(1, 4, 16, 16)
    >>> torch.allclose(layer(x.rot90(1, (2, 3))), layer(x).rot90(1, (2, 3)), atol=1e-5)
    True
"""

from __future__ import annotations

import itertools
import math
from typing import Optional, Sequence

import torch
from torch import Tensor, nn

from .factories import CONV_FUNCTIONS, check_spatial_dims, layer_type, single_int
from .gmr_conv import GMRConv
from .rings import FWHM_PER_SIGMA, ring_geometry

__all__ = ["OrientedRings", "OrientedGMRConv", "ORDERS"]

ORDERS = (1, 2)


def kernel_offsets(spatial_dims: int, kernel_size: int) -> Tensor:
    """Every kernel pixel's offset ``u`` from the centre, float64, ``(k**d, d)`` in row-major order."""
    half = kernel_size // 2
    axis = torch.arange(-half, half + 1, dtype=torch.float64, device="cpu")  # host geometry, even under a meta device
    return torch.stack(torch.meshgrid(*([axis] * spatial_dims), indexing="ij"), dim=-1).reshape(-1, spatial_dims)


def angular_factors(spatial_dims: int, kernel_size: int, order: int) -> tuple[Tensor, Tensor]:
    """Angular factors of one order at every kernel pixel, and each component's weight in the norm.

    Returns:
        ``(factors, weights)``: ``factors`` (components, k**d) float64, zero at the centre;
        ``weights`` (components,) so that ``sum_c weights[c] * r_c**2`` is the squared Frobenius
        norm of the order's tensor (off-diagonal components of order 2 count twice).
    """
    u = kernel_offsets(spatial_dims, kernel_size)
    r2 = u.square().sum(-1)
    centre = r2 == 0
    r2 = torch.where(centre, torch.ones_like(r2), r2)
    if order == 1:
        factors = (u / r2.sqrt()[:, None]).T
        weights = torch.ones(spatial_dims, dtype=torch.float64, device="cpu")
    else:
        pairs = list(itertools.combinations_with_replacement(range(spatial_dims), 2))
        factors = torch.stack([u[:, i] * u[:, j] / r2 - (1.0 / spatial_dims if i == j else 0.0) for i, j in pairs])
        weights = torch.tensor([1.0 if i == j else 2.0 for i, j in pairs], dtype=torch.float64, device="cpu")
    factors[:, centre] = 0.0
    return factors, weights


class OrientedRings(nn.Module):
    """Grid-invariant energies of oriented ring responses, mixed to ``out_channels``.

    Args:
        spatial_dims: 1, 2 or 3.
        in_channels: input channels.
        out_channels: output channels of the 1x1 mix.
        kernel_size: odd kernel size ``k`` (at least 3: order ``m`` needs a neighbourhood).
        orders: angular orders, a non-empty subset of ``(1, 2)`` (order 2 needs ``spatial_dims >= 2``).
        num_rings: Gaussian rings of the radial profile (default ``k // 2 + 1``, as GMRConv).
        multiplier: oriented filters per input channel and order.
        reduction: the oriented filters see ``ceil(in_channels / reduction)`` channels, a 1x1
            projection of the input (1: the input itself). The depthwise oriented responses
            have ``components`` channels each, so this is what their cost scales with.
        bias: bias of the 1x1 mix.
        device: device of the parameters.
        dtype: dtype of the parameters.

    Shape:
        ``(N, in_channels, *S) -> (N, out_channels, *S)`` ("same" zero padding, stride 1).

    Attributes:
        weight: ring weights, ``(len(orders), channels * multiplier, num_rings)`` where
            ``channels = ceil(in_channels / reduction)``.
        project: the 1x1 projection to ``channels`` (None when ``reduction`` is 1).
        mix: the 1x1 convolution from ``channels * multiplier * len(orders)`` energies.

    Example:
        >>> import torch
        >>> OrientedRings(3, 2, 4, kernel_size=3)(torch.randn(1, 2, 6, 6, 6)).shape
        torch.Size([1, 4, 6, 6, 6])
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        orders: Sequence[int] = ORDERS,
        num_rings: Optional[int] = None,
        multiplier: int = 1,
        reduction: int = 1,
        bias: bool = False,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.spatial_dims = d = check_spatial_dims(spatial_dims)
        for name, value in (("in_channels", in_channels), ("out_channels", out_channels), ("multiplier", multiplier),
                            ("reduction", reduction)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        k = single_int("kernel_size", kernel_size)
        if k < 3 or k % 2 == 0:
            raise ValueError(f"kernel_size must be odd and at least 3 (an orientation needs neighbours), got {k}")
        orders = tuple(orders) if isinstance(orders, (list, tuple)) else ()
        if not orders or len(set(orders)) != len(orders) or any(m not in ORDERS for m in orders):
            raise ValueError(f"orders must be a non-empty subset of {ORDERS} without repeats, got {orders!r}")
        if 2 in orders and d == 1:
            raise ValueError("order 2 needs spatial_dims >= 2 (a 1D traceless tensor is zero); use orders=[1]")
        n = k // 2 + 1 if num_rings is None else num_rings
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= k:
            raise ValueError(f"num_rings must be an int in [1, kernel_size={k}], got {num_rings!r}")
        self.in_channels, self.out_channels, self.kernel_size = in_channels, out_channels, k
        self.orders, self.num_rings, self.multiplier, self.reduction = orders, n, multiplier, reduction
        self.channels = c = -(-in_channels // reduction)
        conv1x1 = layer_type("conv", d)
        self.project = None if c == in_channels else conv1x1(in_channels, c, 1, bias=False, **factory)
        # fixed Gaussian rings (FWHM = ring spacing, the GMRConv init), cut at the inscribed circle
        radius, _, mu, delta = ring_geometry(k, d, n)  # the GMRConv rings' centres and spacing
        radius = radius[0]
        sigma = delta / FWHM_PER_SIGMA
        rings = torch.exp(-0.5 * ((radius[None] - mu[:, None]) / sigma).square()) * (radius <= k / 2.0)
        buffer_dtype = dtype if dtype is not None else torch.get_default_dtype()
        self._components: list[int] = []
        for i, m in enumerate(orders):
            factors, weights = angular_factors(d, k, m)
            # (n, components, P): every ring's profile times every angular factor
            basis = rings[:, None, :] * factors[None]
            self.register_buffer(f"_basis{i}", basis.to(device=device, dtype=buffer_dtype), persistent=False)
            self.register_buffer(f"_norm{i}", weights.to(device=device, dtype=buffer_dtype), persistent=False)
            self._components.append(factors.shape[0])
        self.weight = nn.Parameter(torch.empty(len(orders), c * multiplier, n, **factory))
        self.mix = conv1x1(c * multiplier * len(orders), out_channels, 1, bias=bias, **factory)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Ring weights uniform with a bound that gives each oriented response unit gain."""
        if self.weight.is_meta:
            return
        with torch.no_grad():
            for i in range(len(self.orders)):
                energy = float(getattr(self, f"_basis{i}").square().sum()) / self._components[i]
                bound = math.sqrt(3.0 / max(energy * self.num_rings, 1e-12))
                nn.init.uniform_(self.weight[i], -bound, bound)
            self.mix.reset_parameters()
            if self.project is not None:
                self.project.reset_parameters()

    def kernels(self) -> list[Tensor]:
        """The depthwise kernels of each order.

        Shape:
            one ``(channels * multiplier * components, 1, k, ..., k)`` tensor per order, grouped
            by channel, then filter, then component.
        """
        out = []
        for i in range(len(self.orders)):
            basis = getattr(self, f"_basis{i}").to(self.weight.dtype)
            kernel = torch.einsum("fn,ncp->fcp", self.weight[i], basis)
            out.append(kernel.reshape(-1, 1, *([self.kernel_size] * self.spatial_dims)))
        return out

    def energies(self, x: Tensor) -> Tensor:
        """The invariant energies before the mix.

        Shape:
            ``(N, in_channels, *S) -> (N, channels * multiplier * len(orders), *S)``.
        """
        if x.dim() != self.spatial_dims + 2 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"OrientedRings(spatial_dims={self.spatial_dims}, in_channels={self.in_channels}) expects input "
                f"(N, {self.in_channels}, {', '.join('*' * self.spatial_dims)}), got {tuple(x.shape)}"
            )
        conv = CONV_FUNCTIONS[self.spatial_dims]
        pad = self.kernel_size // 2
        if self.project is not None:
            x = self.project(x)
        feats = []
        for i, kernel in enumerate(self.kernels()):
            c = self._components[i]
            y = conv(x, kernel, None, 1, pad, 1, self.channels)
            y = y.reshape(x.shape[0], self.channels * self.multiplier, c, *y.shape[2:])
            norm = getattr(self, f"_norm{i}").to(y.dtype).reshape(1, 1, c, *([1] * self.spatial_dims))
            feats.append((y.square() * norm).sum(2).add(1e-8).sqrt())  # eps: a finite gradient at zero response
        return torch.cat(feats, dim=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.mix(self.energies(x))


class OrientedGMRConv(nn.Module):
    """A radial :class:`GMRConv` plus the :class:`OrientedRings` energies of the same input.

    Args:
        spatial_dims: 1, 2 or 3.
        in_channels: input channels.
        out_channels: output channels.
        kernel_size: odd kernel size (at least 3).
        orders: angular orders of the oriented part.
        multiplier: oriented filters per channel and order.
        reduction: the oriented part sees a 1x1 projection to ``ceil(in_channels / reduction)`` channels.
        bias: bias of the radial convolution.
        **gmr_kwargs: further :class:`GMRConv` arguments (``num_rings`` is shared with the oriented part).

    Shape:
        ``(N, in_channels, *S) -> (N, out_channels, *S)``.

    Example:
        >>> import torch
        >>> OrientedGMRConv(2, 3, 8, 5)(torch.randn(1, 3, 16, 16)).shape
        torch.Size([1, 8, 16, 16])
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        orders: Sequence[int] = ORDERS,
        multiplier: int = 1,
        reduction: int = 1,
        bias: bool = True,
        **gmr_kwargs,
    ) -> None:
        super().__init__()
        if gmr_kwargs.get("stride", 1) != 1 or gmr_kwargs.get("padding", "same") != "same":
            raise ValueError("OrientedGMRConv supports stride 1 and 'same' padding only")
        factory = {key: gmr_kwargs[key] for key in ("device", "dtype") if key in gmr_kwargs}
        self.radial = GMRConv(spatial_dims, in_channels, out_channels, kernel_size, bias=bias, **gmr_kwargs)
        self.oriented = OrientedRings(
            spatial_dims, in_channels, out_channels, kernel_size, orders=orders,
            num_rings=gmr_kwargs.get("num_rings"), multiplier=multiplier, reduction=reduction, **factory,
        )
        self.in_channels, self.out_channels, self.kernel_size = in_channels, out_channels, kernel_size

    def forward(self, x: Tensor) -> Tensor:
        return self.radial(x) + self.oriented(x)
