"""The benchmark's RealNVP built with the peer libraries, when they are installed: the same
depth, conditioner (Linear-ReLU-Linear-ReLU-Linear of width `hidden`), alternating masks,
coupling function (affine with m = sigmoid(s + 2) + 1e-3, or the rational-quadratic spline
with linear tails) and N(0, I) base as flowkern.models.RealNVP, so that a training step
measures the libraries, not the models.

Each builder returns an nn.Module with log_prob(x) -> (B,), or None when the library is
missing. The `peers` extra installs them (pip install -e .[peers]).
"""
from __future__ import annotations

import functools
import math
from typing import Callable, Optional

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
    return _NormalBase(CompositeTransform(transforms))


class _NormalBase(nn.Module):
    """log N(f(x); 0, I) + log|det J_f(x)| over a peer's transform f (returning (z, logabsdet)),
    the same arithmetic as nflows' StandardNormal."""

    def __init__(self, transform: nn.Module):
        super().__init__()
        self.transform = transform

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        z, logabsdet = self.transform(x)
        return -0.5 * z.pow(2).sum(1) - 0.5 * z.shape[1] * math.log(2 * math.pi) + logabsdet


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
    """log_prob(x) of a zuko lazy flow: flow() builds the distribution, then its log_prob."""

    def __init__(self, flow: nn.Module):
        super().__init__()
        self.flow = flow

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        return self.flow().log_prob(x)


# name -> builder(features, layers, hidden, coupling) -> model or None
PEERS: dict[str, Callable[..., Optional[nn.Module]]] = {"nflows": nflows_realnvp, "zuko": zuko_realnvp}
