"""The benchmark's models built with the peer libraries, when they are installed.

RealNVP (PEERS): the same depth, conditioner (Linear-ReLU-Linear-ReLU-Linear of width `hidden`),
alternating masks, coupling function (affine with a sigmoid(s + 2) scale, or the
rational-quadratic spline with linear tails) and N(0, I) base as flowkern.models.RealNVP, so
that a training step measures the libraries, not the models. Glow (GLOW_PEERS): the same
multi-scale architecture as flowkern.models.Glow, where a peer ships Glow's pieces (normflows
does; nflows and zuko have no invertible 1x1 convolution or multi-scale flow, so they get '-').

Each builder returns an nn.Module with log_prob(x) -> (B,) and sample(n) -> (n, *event), or
None when the library is missing. The `peers` extra installs them (pip install -e .[peers]);
`make venv` installs the pinned versions with --no-deps (nflows 0.14, zuko 1.6.0, normflows
1.7.3: none needs more than torch and numpy for what is used here).
"""
from __future__ import annotations

import functools
import math
from typing import Callable, Optional, Sequence

import torch
from torch import nn


class _Conditioner(nn.Sequential):
    """flowkern's MLP conditioner, called as peers call theirs: net(x, context)."""

    def __init__(self, in_features: int, out_features: int, hidden: int):
        super().__init__(nn.Linear(in_features, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                         nn.Linear(hidden, out_features))
        nn.init.zeros_(self[-1].weight)
        nn.init.zeros_(self[-1].bias)

    def forward(self, x: torch.Tensor, context: Optional[torch.Tensor] = None) -> torch.Tensor:
        return super().forward(x)


def evens_first(features: int) -> torch.Tensor:
    """The permutation that puts the even features first, then the odd ones (flowkern's
    Permutation(features, "evens_first"), which turns alternating masks into two halves)."""
    idx = torch.arange(features)
    return torch.cat([idx[0::2], idx[1::2]])


# ------------------------------------------------------------------------------------- nflows

def nflows_realnvp(features: int, layers: int, hidden: int, coupling: str, bins: int = 8,
                   bound: float = 3.0) -> Optional[nn.Module]:
    """nflows' CouplingTransforms with a ±1 mask alternating like flowkern's (layer i transforms
    the odd features when i is even)."""
    try:
        # Not nflows.flows / nflows.distributions: they import matplotlib at import time.
        from nflows.transforms.base import CompositeTransform
        from nflows.transforms.coupling import (AffineCouplingTransform,
                                                PiecewiseRationalQuadraticCouplingTransform)
    except ImportError:
        return None

    def net(in_f: int, out_f: int) -> nn.Module:
        return _Conditioner(in_f, out_f, hidden)

    transforms = []
    for i in range(layers):
        odd = torch.arange(features) % 2 == 1
        mask = torch.where(odd if i % 2 == 0 else ~odd, 1, -1)  # > 0: transformed
        if coupling == "affine":
            transforms.append(AffineCouplingTransform(mask, net))
        elif coupling == "spline":
            transforms.append(PiecewiseRationalQuadraticCouplingTransform(mask, net, num_bins=bins, tails="linear",
                                                                          tail_bound=bound))
        else:
            raise ValueError(f"no nflows build for coupling {coupling!r}")
    return _NormalBase(CompositeTransform(transforms), features)


class _NormalBase(nn.Module):
    """log N(f(x); 0, I) + log|det J_f(x)| over a peer's transform f (returning (z, logabsdet)),
    the same arithmetic as nflows' StandardNormal; sample(n) = f^-1(N(0, I) draws), as nflows'
    Flow.sample."""

    def __init__(self, transform: nn.Module, features: int):
        super().__init__()
        self.transform, self.features = transform, features
        self.register_buffer("_anchor", torch.zeros(()), persistent=False)

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        z, logabsdet = self.transform(x)
        return -0.5 * z.pow(2).sum(1) - 0.5 * z.shape[1] * math.log(2 * math.pi) + logabsdet

    def sample(self, n: int) -> torch.Tensor:
        z = torch.randn(n, self.features, device=self._anchor.device)
        return self.transform.inverse(z)[0]


# --------------------------------------------------------------------------------------- zuko

def zuko_realnvp(features: int, layers: int, hidden: int, coupling: str, bins: int = 8,
                 bound: float = 3.0) -> Optional[nn.Module]:
    """zuko's GeneralCouplingTransform (its lazy flows, called with no context) with the same
    alternating masks and MLP width; zuko's own monotonic affine or rational-quadratic spline."""
    try:
        from zuko.distributions import DiagNormal
        from zuko.flows import Flow, GeneralCouplingTransform, UnconditionalDistribution
        from zuko.transforms import MonotonicAffineTransform, MonotonicRQSTransform
    except ImportError:
        return None
    if coupling == "affine":
        univariate, shapes = MonotonicAffineTransform, ((), ())
    elif coupling == "spline":
        univariate = functools.partial(MonotonicRQSTransform, bound=bound)
        shapes = ((bins,), (bins,), (bins - 1,))
    else:
        raise ValueError(f"no zuko build for coupling {coupling!r}")
    odd = torch.arange(features) % 2 == 1
    transforms = [GeneralCouplingTransform(features, mask=odd if i % 2 == 0 else ~odd, univariate=univariate,
                                           shapes=shapes, hidden_features=(hidden, hidden)) for i in range(layers)]
    base = UnconditionalDistribution(DiagNormal, torch.zeros(features), torch.ones(features), buffer=True)
    return _Lazy(Flow(transforms, base))


class _Lazy(nn.Module):
    """log_prob(x) and sample(n) of a zuko lazy flow: flow() builds the distribution."""

    def __init__(self, flow: nn.Module):
        super().__init__()
        self.flow = flow

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        return self.flow().log_prob(x)

    def sample(self, n: int) -> torch.Tensor:
        return self.flow().sample((n,))


# ---------------------------------------------------------------------------------- normflows

def normflows_realnvp(features: int, layers: int, hidden: int, coupling: str, bins: int = 8,
                      bound: float = 3.0) -> Optional[nn.Module]:
    """normflows' NormalizingFlow. Affine: AffineCouplingBlock (Split, AffineCoupling with
    scale_map="sigmoid", Merge) on the two halves of an evens-first Permute, restored at the end,
    which is flowkern's own layout of the alternating masks ("channel" split when layer i
    transforms the odd features, "channel_inv" when the even ones). normflows' checkerboard split
    would build the same masks but gathers through a Python-built index on every call.
    Spline: normflows' PiecewiseRationalQuadraticCoupling (nflows' code) with the alternating mask
    and flowkern's conditioner (normflows' CoupledRationalQuadraticSpline wrapper fixes a
    ResidualNet conditioner and an extra unconditional transform, a different model).

    normflows' flows map latent -> data in forward(), and log_prob calls inverse() from the
    last flow to the first: the list is the data-direction order reversed, and each flow's
    inverse() is the data -> latent map flowkern's forward() computes.
    """
    try:
        import normflows as nf
        from normflows.flows.neural_spline.coupling import PiecewiseRationalQuadraticCoupling
    except ImportError:
        return None
    if coupling not in ("affine", "spline"):
        raise ValueError(f"no normflows build for coupling {coupling!r}")
    perm = evens_first(features)

    def permute(order: torch.Tensor) -> nn.Module:
        """A Permute whose inverse() (the data direction) maps x to x[:, order]."""
        p = nf.flows.Permute(features, mode="shuffle")
        p.inv_perm.copy_(order)
        p.perm.copy_(torch.argsort(order))
        return p

    # The spline couplings gather through their interleaved masks themselves (nflows' code).
    data_order = [permute(perm)] if coupling == "affine" else []
    half = (features + 1) // 2
    for i in range(layers):
        if coupling == "affine":
            kept = half if i % 2 == 0 else features - half
            net = _Conditioner(kept, 2 * (features - kept), hidden)
            # "channel": z1 (kept) = first half (the evens), z2 (transformed) = second half.
            data_order.append(nf.flows.AffineCouplingBlock(net, scale=True, scale_map="sigmoid",
                                                           split_mode="channel" if i % 2 == 0 else "channel_inv"))
        else:
            odd = torch.arange(features) % 2 == 1
            mask = torch.where(odd if i % 2 == 0 else ~odd, 1, -1)
            data_order.append(_NFSpline(PiecewiseRationalQuadraticCoupling(
                mask, lambda in_f, out_f: _Conditioner(in_f, out_f, hidden), num_bins=bins, tails="linear",
                tail_bound=bound)))
    if coupling == "affine":
        data_order.append(permute(torch.argsort(perm)))
    q0 = nf.distributions.DiagGaussian(features, trainable=False)
    return _NFModel(nf.NormalizingFlow(q0, list(reversed(data_order))))


class _NFSpline(nn.Module):
    """A normflows flow over an nflows-style coupling: inverse() is the data -> latent map (as
    in normflows' CoupledRationalQuadraticSpline)."""

    def __init__(self, coupling: nn.Module):
        super().__init__()
        self.coupling = coupling

    def forward(self, z):
        z, log_det = self.coupling.inverse(z)
        return z, log_det.view(-1)

    def inverse(self, x):
        x, log_det = self.coupling(x)
        return x, log_det.view(-1)


class _NFModel(nn.Module):
    """log_prob(x) and sample(n) of a normflows model (its sample returns (x, log q))."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.log_prob(x)

    def sample(self, n: int) -> torch.Tensor:
        return self.model.sample(n)[0]


def normflows_glow(image_shape: Sequence[int], levels: int, steps: int, hidden: int) -> Optional[nn.Module]:
    """normflows' MultiscaleFlow of GlowBlocks (its Glow example): per level a squeeze, `steps`
    of (ActNorm, LU 1x1 conv, affine coupling with scale_map="sigmoid" and a 3x3-1x1-3x3
    ReLU ConvNet of width `hidden`), then half the channels to the base, as flowkern.models.Glow
    (which flips the coupling's halves every other step where normflows keeps them: the same
    cost). A fixed N(0, I) base per factored-out part (normflows' example learns a class-
    conditional one)."""
    try:
        import normflows as nf
    except ImportError:
        return None
    c, h, w = (int(s) for s in image_shape)
    q0, flows, merges = [], [], []
    # normflows lists the levels from the deepest (level 0: smallest image) to the first.
    for i in range(levels):
        channels = c * 2 ** (levels + 1 - i)
        flows.append([nf.flows.GlowBlock(channels, hidden, scale=True, scale_map="sigmoid", split_mode="channel",
                                         leaky=0.0, init_zeros=True, use_lu=True) for _ in range(steps)]
                     + [nf.flows.Squeeze()])
        if i > 0:
            merges.append(nf.flows.Merge())
            shape = (c * 2 ** (levels - i), h // 2 ** (levels - i), w // 2 ** (levels - i))
        else:
            shape = (c * 2 ** (levels + 1), h // 2 ** levels, w // 2 ** levels)
        q0.append(nf.distributions.DiagGaussian(shape, trainable=False))
    model = nf.MultiscaleFlow(q0, flows, merges, class_cond=False)
    return _NFMultiscale(model)


class _NFMultiscale(_NFModel):
    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.log_prob(x, None)


# name -> builder(features, layers, hidden, coupling) -> model or None
PEERS: dict[str, Callable[..., Optional[nn.Module]]] = {
    "nflows": nflows_realnvp, "zuko": zuko_realnvp, "normflows": normflows_realnvp}
# name -> builder(image_shape, levels, steps, hidden) -> model or None
GLOW_PEERS: dict[str, Callable[..., Optional[nn.Module]]] = {"normflows": normflows_glow}
