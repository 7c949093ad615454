"""zuko 1.6 on flowkern's fused ops (flowkern.accelerate).

Covered: MaskedAutoregressiveTransform (the layer of zuko's NSF and MAF) and
GeneralCouplingTransform (RealNVP, NICE) whose univariate is
- MonotonicRQSTransform, or a functools.partial of it setting bound= and slope= (NSF): the
  splines of a pass run as one fused op on the hyper-network's packed output, the log-det summed
  in the same pass (zuko's soft-clamped logits, softmax widths and heights, exp derivatives and
  identity outside the bound are a knot style of flowkern.ops.rq_spline);
- MonotonicAffineTransform, or a partial of it setting slope= (MAF, RealNVP, NICE): the
  affine op's "rational" scale, log m = a / (1 + |a / log(slope)|).
zuko builds the transform anew on each call (a LazyTransform); the accelerated module builds
flowkern's. Left as they are: other univariates (NCSF's circular spline, SOSPF, BPF, NAF),
and every other module.
"""
from __future__ import annotations

import functools
import math
from typing import Optional

import torch
from torch.distributions import constraints
from zuko.flows.autoregressive import MaskedAutoregressiveTransform
from zuko.lazy import LazyComposedTransform, LazyInverse, LazyTransform
from zuko.flows.coupling import GeneralCouplingTransform
from zuko.transforms import MonotonicAffineTransform, MonotonicRQSTransform, Transform
from zuko.utils import broadcast

from .. import ops
from ..ops.rq_spline import KERNEL_MAX_BINS
from . import register, register_family

__all__ = ["AcceleratedGeneralCoupling", "AcceleratedMaskedAutoregressive", "FusedAffineTransform",
           "FusedRQSTransform"]


class _FusedUnivariates(Transform):
    """A zuko univariate of every feature at once, on one fused flowkern op: x (*, D) with its
    packed params phi (*, D, P). A transform of event dim 1 (its log-det sums the features, as
    DependentTransform(., 1)). `_op(v (N, D), phi (N, D, P), inverse)` is the fused map."""

    domain = constraints.independent(constraints.real, 1)
    codomain = constraints.independent(constraints.real, 1)
    bijective = True
    sign = +1

    def _run(self, v: torch.Tensor, inverse: bool):
        phi = self.phi
        if phi.shape[:-1] != v.shape:
            v, phi = broadcast(v, phi, ignore=(0, 1))
        batch = v.shape[:-1]
        y, ld = self._op(v.reshape(-1, v.shape[-1]), phi.reshape(-1, *phi.shape[-2:]), inverse)
        return y.reshape(v.shape), ld.reshape(batch)

    def _call(self, x):
        return self._run(x, False)[0]

    def _inverse(self, y):
        return self._run(y, True)[0]

    def log_abs_det_jacobian(self, x, y):
        return self._run(x, False)[1]

    def call_and_ladj(self, x):
        return self._run(x, False)


class FusedRQSTransform(_FusedUnivariates):
    """zuko's MonotonicRQSTransform: phi (*, D, 3K - 1) = [widths | heights | derivatives] as
    zuko packs them, on flowkern's fused spline in zuko's knot style."""

    def __init__(self, phi: torch.Tensor, bins: int, bound: float, slope: float, **kwargs) -> None:
        super().__init__(**kwargs)
        self.phi, self.bins, self.bound, self.slope = phi, bins, bound, slope

    def __repr__(self) -> str:
        return f"{self.__class__.__name__}(bins={self.bins})"

    def _op(self, v, phi, inverse):
        return ops.rq_spline(v, phi, bins=self.bins, bound=self.bound, inverse=inverse, min_width=0.0, min_height=0.0,
                             min_derivative=0.0, derivative="exp", slope=self.slope)


class FusedAffineTransform(_FusedUnivariates):
    """zuko's MonotonicAffineTransform: phi (*, D, 2) = [shift | unconstrained scale] as zuko
    packs them, on the affine op's "rational" scale."""

    def __init__(self, phi: torch.Tensor, slope: float, **kwargs) -> None:
        super().__init__(**kwargs)
        self.phi, self.slope = phi, slope

    def __repr__(self) -> str:
        return f"{self.__class__.__name__}(slope={self.slope})"

    def _op(self, v, phi, inverse):
        return ops.affine_coupling(v, phi[..., 0], phi[..., 1], scale="rational", clamp=-math.log(self.slope),
                                   inverse=inverse)


def _partial_options(univariate, cls, defaults: dict) -> Optional[dict]:
    """`defaults` updated by the keywords of `univariate` when it is `cls` or a partial of it
    setting only those keywords; else None."""
    if univariate is cls:
        return dict(defaults)
    if isinstance(univariate, functools.partial) and univariate.func is cls and not univariate.args:
        kw = dict(univariate.keywords)
        if set(kw) <= set(defaults):
            return {k: float(kw.get(k, v)) for k, v in defaults.items()}
    return None


def _univariate(module):
    """("rqs" | "affine", options) for the univariate a module builds, or None."""
    opts = _partial_options(module.univariate, MonotonicRQSTransform, {"bound": 5.0, "slope": 1e-3})
    if opts is not None:
        return "rqs", opts
    opts = _partial_options(module.univariate, MonotonicAffineTransform, {"slope": 1e-3})
    if opts is not None:
        return "affine", opts
    return None


def _fused(module, phi) -> Transform:
    kind, opts = _univariate(module)
    if kind == "rqs":
        return FusedRQSTransform(phi, module.shapes[0][0], **opts)
    return FusedAffineTransform(phi, **opts)


class _FusedMeta:
    """meta() of zuko's MaskedAutoregressiveTransform and GeneralCouplingTransform (the same
    code in both), returning the fused univariates."""

    def meta(self, c, x):
        if c is not None:
            x = torch.cat(broadcast(x, c, ignore=1), dim=-1)
        return _fused(self, self.hyper(x).unflatten(-1, (-1, self.total)))


class AcceleratedMaskedAutoregressive(_FusedMeta, MaskedAutoregressiveTransform):
    pass


class AcceleratedGeneralCoupling(_FusedMeta, GeneralCouplingTransform):
    pass


def _check(module) -> Optional[str]:
    found = _univariate(module)
    if found is None:
        u = module.univariate
        u = u.func if isinstance(u, functools.partial) else u
        name = getattr(u, "__name__", type(u).__name__)
        return (f"univariate {name}: only MonotonicRQSTransform (NSF) and MonotonicAffineTransform (MAF, RealNVP) "
                "have fused versions")
    kind, opts = found
    shapes = [tuple(s) for s in module.shapes]
    if not 0 < opts["slope"] < 1:
        return f"slope={opts['slope']}: outside (0, 1)"
    if kind == "affine":
        return None if shapes == [(), ()] else f"affine parameter shapes {shapes}: expected ((), ())"
    if len(shapes) != 3 or len(shapes[0]) != 1 or shapes[1] != shapes[0] or shapes[2] != (shapes[0][0] - 1,):
        return f"spline parameter shapes {shapes}: expected ((K,), (K,), (K - 1,))"
    bins = shapes[0][0]
    if bins > KERNEL_MAX_BINS:
        return f"bins={bins} > {KERNEL_MAX_BINS}, the fused kernels' limit"
    if not (math.isfinite(opts["bound"]) and opts["bound"] > 0):
        return f"bound={opts['bound']}: outside what the fused spline takes"
    return None


register(MaskedAutoregressiveTransform, AcceleratedMaskedAutoregressive, _check)
register(GeneralCouplingTransform, AcceleratedGeneralCoupling, _check)
register_family("zuko", LazyTransform, (LazyComposedTransform, LazyInverse))
