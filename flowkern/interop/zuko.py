"""zuko 1.6 on flowkern's fused ops (flowkern.accelerate).

Covered: MaskedAutoregressiveTransform (the layer of zuko's NSF and MAF) whose univariate is
MonotonicRQSTransform, or a functools.partial of it setting bound= and slope=: its splines run
as one fused op per pass on the hyper-network's packed output, the log-det summed in the same
pass (zuko's soft-clamped logits, softmax widths and heights, exp derivatives and identity
outside the bound are the op's "zuko" knot style: flowkern.ops.rq_spline). zuko builds the
transform anew on each call (a LazyTransform); the accelerated module builds flowkern's.

Left as they are: other univariate transforms (MonotonicAffineTransform: MAF, NICE), zuko's
coupling transforms and every other module.
"""
from __future__ import annotations

import functools
import math
from typing import Optional

import torch
from torch.distributions import constraints
from zuko.flows.autoregressive import MaskedAutoregressiveTransform
from zuko.lazy import LazyComposedTransform, LazyInverse, LazyTransform
from zuko.transforms import MonotonicRQSTransform, Transform
from zuko.utils import broadcast

from .. import ops
from ..ops.rq_spline import KERNEL_MAX_BINS
from . import register, register_family

__all__ = ["AcceleratedMaskedAutoregressive", "FusedRQSTransform"]


class FusedRQSTransform(Transform):
    """zuko's MonotonicRQSTransform of every feature at once, on flowkern's fused spline:
    x (*, D), params phi (*, D, 3K - 1) = [widths | heights | derivatives] as zuko packs them.
    A transform of event dim 1 (its log-det sums the features, as DependentTransform(., 1))."""

    domain = constraints.independent(constraints.real, 1)
    codomain = constraints.independent(constraints.real, 1)
    bijective = True
    sign = +1

    def __init__(self, phi: torch.Tensor, bins: int, bound: float, slope: float, **kwargs) -> None:
        super().__init__(**kwargs)
        self.phi, self.bins, self.bound, self.slope = phi, bins, bound, slope

    def __repr__(self) -> str:
        return f"{self.__class__.__name__}(bins={self.bins})"

    def _spline(self, v: torch.Tensor, inverse: bool):
        phi = self.phi
        if phi.shape[:-1] != v.shape:
            v, phi = broadcast(v, phi, ignore=(0, 1))
        batch = v.shape[:-1]
        y, ld = ops.rq_spline(v.reshape(-1, v.shape[-1]), phi.reshape(-1, *phi.shape[-2:]), bins=self.bins,
                              bound=self.bound, inverse=inverse, min_width=0.0, min_height=0.0, min_derivative=0.0,
                              derivative="exp", slope=self.slope)
        return y.reshape(v.shape), ld.reshape(batch)

    def _call(self, x):
        return self._spline(x, False)[0]

    def _inverse(self, y):
        return self._spline(y, True)[0]

    def log_abs_det_jacobian(self, x, y):
        return self._spline(x, False)[1]

    def call_and_ladj(self, x):
        return self._spline(x, False)


def _rqs_options(univariate) -> Optional[dict]:
    """bound and slope when `univariate` is MonotonicRQSTransform or a partial of it with only
    those keywords; else None."""
    if univariate is MonotonicRQSTransform:
        return {"bound": 5.0, "slope": 1e-3}
    if isinstance(univariate, functools.partial) and univariate.func is MonotonicRQSTransform and not univariate.args:
        kw = dict(univariate.keywords)
        if set(kw) <= {"bound", "slope"}:
            return {"bound": float(kw.get("bound", 5.0)), "slope": float(kw.get("slope", 1e-3))}
    return None


class AcceleratedMaskedAutoregressive(MaskedAutoregressiveTransform):
    def meta(self, c, x):
        if c is not None:
            x = torch.cat(broadcast(x, c, ignore=1), dim=-1)
        phi = self.hyper(x).unflatten(-1, (-1, self.total))
        opts = _rqs_options(self.univariate)
        return FusedRQSTransform(phi, self.shapes[0][0], **opts)


def _check(module) -> Optional[str]:
    opts = _rqs_options(module.univariate)
    if opts is None:
        name = getattr(module.univariate, "__name__", type(module.univariate).__name__)
        return f"univariate {name}: only MonotonicRQSTransform (zuko's NSF) has a fused version yet"
    shapes = [tuple(s) for s in module.shapes]
    if len(shapes) != 3 or len(shapes[0]) != 1 or shapes[1] != shapes[0] or shapes[2] != (shapes[0][0] - 1,):
        return f"spline parameter shapes {shapes}: expected ((K,), (K,), (K - 1,))"
    bins = shapes[0][0]
    if bins > KERNEL_MAX_BINS:
        return f"bins={bins} > {KERNEL_MAX_BINS}, the fused kernels' limit"
    if not 0 < opts["slope"] < 1 or not (math.isfinite(opts["bound"]) and opts["bound"] > 0):
        return f"slope={opts['slope']}, bound={opts['bound']}: outside what the fused spline takes"
    return None


register(MaskedAutoregressiveTransform, AcceleratedMaskedAutoregressive, _check)
register_family("zuko", LazyTransform, (LazyComposedTransform, LazyInverse))
