"""normflows 1.7 on flowkern's fused ops (flowkern.accelerate; docs/interop.md).

normflows' spline flows hold nflows-style modules (its own copies of nflows' code), and those are
what is accelerated, so its wrappers' direction convention (Flow.forward maps z to x: the
wrappers call the inner module's inverse) is kept as it is:
- CoupledRationalQuadraticSpline -> PiecewiseRationalQuadraticCoupling with its unconditional
  PiecewiseRationalQuadraticCDF on the identity features (tails="linear" with a float
  tail_bound, or tails=None on [0, 1]);
- AutoregressiveRationalQuadraticSpline -> MaskedPiecewiseRationalQuadraticAutoregressive;
- AffineCouplingBlock -> AffineCoupling with scale_map="exp" (or scale=False: additive);
- MaskedAffineAutoregressive (sigmoid(raw + 2) + 1e-3 scales: flowkern's "sigmoid" mode).
Left as they are: circular and per-feature tails (CircularCoupledRationalQuadraticSpline),
tensor tail bounds, AffineCoupling's "sigmoid" and "sigmoid_inv" maps (no 1e-3 floor, unlike
flowkern's sigmoid mode), and every other flow.
"""
from __future__ import annotations

from typing import Optional

from normflows.flows.affine.autoregressive import MaskedAffineAutoregressive
from normflows.flows.affine.coupling import AffineCoupling
from normflows.flows.base import Composite, Flow
from normflows.flows.neural_spline.autoregressive import MaskedPiecewiseRationalQuadraticAutoregressive
from normflows.flows.neural_spline.coupling import PiecewiseRationalQuadraticCDF, PiecewiseRationalQuadraticCoupling
from normflows.flows.neural_spline.wrapper import (AutoregressiveRationalQuadraticSpline,
                                                   CircularCoupledRationalQuadraticSpline,
                                                   CoupledRationalQuadraticSpline)
from normflows.flows.affine.coupling import AffineCouplingBlock
from normflows.flows.reshape import Merge, Split

from .. import ops
from . import register, register_family
from ._layers import (AffineAutoregressiveMixin, RQAutoregressiveMixin, RQCDFMixin, RQCouplingMixin, cdf_check,
                      spline_check)


class AcceleratedRQCoupling(RQCouplingMixin, PiecewiseRationalQuadraticCoupling):
    pass


class AcceleratedMaskedRQAutoregressive(RQAutoregressiveMixin, MaskedPiecewiseRationalQuadraticAutoregressive):
    pass


class AcceleratedRQCDF(RQCDFMixin, PiecewiseRationalQuadraticCDF):
    pass


class AcceleratedMaskedAffineAutoregressive(AffineAutoregressiveMixin, MaskedAffineAutoregressive):
    _fk_scale = "sigmoid"


class AcceleratedAffineCoupling(AffineCoupling):
    """z = [z1, z2]; param_map(z1) interleaves shift (even columns) and log-scale (odd)."""

    def _fk_run(self, z, inverse):
        z1, z2 = z
        param = self.param_map(z1)
        if self.scale:
            z2, log_det = ops.affine_coupling(z2, param[:, 0::2, ...], param[:, 1::2, ...], scale="exp",
                                              inverse=inverse)
        else:
            z2, log_det = ops.additive_coupling(z2, param, inverse=inverse)
        return [z1, z2], log_det

    def forward(self, z):
        return self._fk_run(z, False)

    def inverse(self, z):
        return self._fk_run(z, True)


def _affine_check(module) -> Optional[str]:
    if module.scale and module.scale_map != "exp":
        return (f"scale_map={module.scale_map!r}: normflows' sigmoid(raw + 2) without a floor is not flowkern's "
                "sigmoid mode (sigmoid(raw + 2) + 1e-3); scale_map='exp' is covered")
    return None


register(PiecewiseRationalQuadraticCoupling, AcceleratedRQCoupling, spline_check)
register(MaskedPiecewiseRationalQuadraticAutoregressive, AcceleratedMaskedRQAutoregressive, spline_check)
register(PiecewiseRationalQuadraticCDF, AcceleratedRQCDF, cdf_check)
register(AffineCoupling, AcceleratedAffineCoupling, _affine_check)
register(MaskedAffineAutoregressive, AcceleratedMaskedAffineAutoregressive)
# wrappers of the modules above and pure reshapes: what they hold is reported, not they
register_family("normflows", Flow, (Composite, CoupledRationalQuadraticSpline, AutoregressiveRationalQuadraticSpline,
                                    CircularCoupledRationalQuadraticSpline, AffineCouplingBlock, Split, Merge))
