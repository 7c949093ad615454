"""nflows 0.14 on flowkern's fused ops (flowkern.accelerate; docs/interop.md).

Covered, with the classes' own arithmetic (tests/test_interop.py):
- PiecewiseRationalQuadraticCouplingTransform with tails="linear" (any tail_bound, num_bins <= 64,
  min_bin_width, min_bin_height, min_derivative) or tails=None (nflows' default: the spline on
  [0, 1] with learned end slopes), its unconditional transform too when that is a
  covered one: the spline and its log-det in one fused op per direction, the features split and
  merged through strided views where the mask allows (nflows' alternating and half masks);
- MaskedPiecewiseRationalQuadraticAutoregressiveTransform with tails="linear" or None: the spline
  of each pass fused (the inverse still makes one pass per feature, as nflows does);
- PiecewiseRationalQuadraticCDF with tails="linear" or None on 2-D inputs;
- AffineCouplingTransform: nflows' sigmoid(raw + 2) + 1e-3 scale is flowkern's "sigmoid" mode;
- MaskedAffineAutoregressiveTransform (sbi's maf): its softplus(raw) + 1e-3 scale is the affine
  op's "softplus" mode (each pass of the inverse too);
- LULinear: L and U assembled by two matrix-vector products with constant placement matrices
  (not four index assignments into zero tensors) and x (LU)^T + b as one matmul; the inverse by
  two triangular solves, as nflows (torch.linalg.solve_triangular); its eval-mode cache as nflows.
The widths and heights are divided by sqrt(hidden_features) (or hidden_channels) as nflows does.

Where nflows asserts (the spline inverse's negative discriminant, nflows#87), the fused spline
takes the root of a discriminant written as a sum of squares and stays finite; where nflows
raises on an input outside [0, 1] with tails=None (InputOutsideDomain), the fused spline passes
it through unchanged with log-det 0.
Left as they are: LULinear above 32 features and every other transform; image (4-D) inputs of a
coupling run nflows' own code.
"""
from __future__ import annotations

from nflows.transforms.autoregressive import (MaskedAffineAutoregressiveTransform,
                                             MaskedPiecewiseRationalQuadraticAutoregressiveTransform)
from nflows.transforms.base import CompositeTransform, InverseTransform, MultiscaleCompositeTransform, Transform
from nflows.transforms.coupling import AffineCouplingTransform, PiecewiseRationalQuadraticCouplingTransform
from nflows.transforms.lu import LULinear
from nflows.transforms.nonlinearities import PiecewiseRationalQuadraticCDF

from . import register, register_family
from ._layers import (AffineAutoregressiveMixin, LUAssembly, RQAutoregressiveMixin, RQCDFMixin, RQCouplingMixin,
                      SigmoidAffineCouplingMixin, affine_autoregressive_check, cdf_check, lu_check, spline_check)


class AcceleratedRQCoupling(RQCouplingMixin, PiecewiseRationalQuadraticCouplingTransform):
    pass


class AcceleratedAffineCoupling(SigmoidAffineCouplingMixin, AffineCouplingTransform):
    pass


class AcceleratedMaskedRQAutoregressive(RQAutoregressiveMixin, MaskedPiecewiseRationalQuadraticAutoregressiveTransform):
    pass


class AcceleratedMaskedAffineAutoregressive(AffineAutoregressiveMixin, MaskedAffineAutoregressiveTransform):
    _fk_scale = "softplus"


class AcceleratedRQCDF(RQCDFMixin, PiecewiseRationalQuadraticCDF):
    pass


class AcceleratedLULinear(LUAssembly, LULinear):
    pass


# a coupling calls its unconditional transform as the module it is (fused itself or not)
register(PiecewiseRationalQuadraticCouplingTransform, AcceleratedRQCoupling, spline_check)
register(AffineCouplingTransform, AcceleratedAffineCoupling)
register(MaskedPiecewiseRationalQuadraticAutoregressiveTransform, AcceleratedMaskedRQAutoregressive, spline_check)
register(MaskedAffineAutoregressiveTransform, AcceleratedMaskedAffineAutoregressive, affine_autoregressive_check)
register(PiecewiseRationalQuadraticCDF, AcceleratedRQCDF, cdf_check)
register(LULinear, AcceleratedLULinear, lu_check)
register_family("nflows", Transform, (CompositeTransform, MultiscaleCompositeTransform, InverseTransform))
