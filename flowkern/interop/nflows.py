"""nflows 0.14 on flowkern's fused ops (flowkern.accelerate).

Covered, with the classes' own arithmetic (tests/test_interop.py):
- PiecewiseRationalQuadraticCouplingTransform with tails="linear" (any tail_bound, num_bins <= 64,
  min_bin_width, min_bin_height, min_derivative): the spline, its log-det and the split and merge
  of the features in one fused op per direction, the features taken as strided views where the
  mask allows (nflows' alternating and half masks) instead of gathers and scatters;
- MaskedPiecewiseRationalQuadraticAutoregressiveTransform with tails="linear": the spline of
  each pass fused (the inverse still makes one pass per feature, as nflows does);
- AffineCouplingTransform: nflows' sigmoid(raw + 2) + 1e-3 scale is flowkern's "sigmoid" mode.
The widths and heights are divided by sqrt(hidden_features) (or hidden_channels) as nflows does.

Where nflows returns NaN or asserts (the spline inverse's negative discriminant, nflows#87), the
fused spline takes the root of a discriminant written as a sum of squares and stays finite.
Left as they are: tails=None (nflows' [0, 1] domain with learned end slopes), an unconditional
transform on the identity features, image (4-D) inputs, and every other transform.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from nflows.transforms.autoregressive import MaskedPiecewiseRationalQuadraticAutoregressiveTransform
from nflows.transforms.base import CompositeTransform, InverseTransform, MultiscaleCompositeTransform, Transform
from nflows.transforms.coupling import AffineCouplingTransform, PiecewiseRationalQuadraticCouplingTransform

from .. import ops
from ..ops.rq_spline import KERNEL_MAX_BINS
from . import register, register_family

__all__ = ["AcceleratedRQCoupling", "AcceleratedMaskedRQAutoregressive", "AcceleratedAffineCoupling"]


def _index(indices: torch.Tensor):
    """A slice for indices that step evenly (a view instead of a gather), else the indices."""
    idx = indices.tolist()
    if len(idx) == 1:
        return slice(idx[0], idx[0] + 1)
    step = idx[1] - idx[0]
    if step > 0 and all(b - a == step for a, b in zip(idx, idx[1:])):
        return slice(idx[0], idx[-1] + 1, step)
    return indices


def _softmax_scale(module, net) -> float:
    """1 / sqrt(hidden) that nflows applies to the raw widths and heights (1 without one)."""
    for attr in ("hidden_features", "hidden_channels"):
        if hasattr(net, attr):
            return 1.0 / math.sqrt(getattr(net, attr))
    return 1.0


def _spline_check(module) -> Optional[str]:
    if module.tails != "linear":
        return (f"tails={module.tails!r}: the fused spline has linear tails (nflows' tails=None spline on "
                "[0, 1] with learned end slopes is not covered yet)")
    if module.num_bins > KERNEL_MAX_BINS:
        return f"num_bins={module.num_bins} > {KERNEL_MAX_BINS}, the fused kernels' limit"
    if not isinstance(module.tail_bound, (int, float)):
        return "a tensor tail_bound (the fused spline takes one bound)"
    return None


def _spline_style(module) -> dict:
    return dict(bins=module.num_bins, bound=float(module.tail_bound), min_width=module.min_bin_width,
                min_height=module.min_bin_height, min_derivative=module.min_derivative)


def _scaled_params(params: torch.Tensor, bins: int, scale: float) -> torch.Tensor:
    """params (..., 3K - 1) with the widths and heights times `scale`, as nflows' in-place
    division does, in one multiply."""
    if scale == 1.0:
        return params
    factor = params.new_ones(params.shape[-1])
    factor[: 2 * bins] = scale
    return params * factor


class _Coupling:
    """The split and merge of CouplingTransform on views; `_elementwise(x, params, inverse)` is
    the subclass's fused map of the transformed features."""

    def _flowkern_prepare(self):
        self._fk_identity = _index(self.identity_features)
        self._fk_transform = _index(self.transform_features)

    def _flowkern_release(self):
        for attr in ("_fk_identity", "_fk_transform"):
            self.__dict__.pop(attr, None)

    def _run(self, inputs, context, inverse):
        if inputs.dim() != 2:
            raise ValueError(f"flowkern's accelerated {type(self).__name__} takes 2-D inputs, got {inputs.dim()}-D "
                             "(flowkern.accelerate(model, enable=False) for nflows' own code)")
        if inputs.shape[1] != self.features:
            raise ValueError("Expected features = {}, got {}.".format(self.features, inputs.shape[1]))
        identity = inputs[:, self._fk_identity]
        params = self.transform_net(identity, context)
        y, logabsdet = self._elementwise(inputs[:, self._fk_transform], params, inverse)
        outputs = torch.empty_like(inputs)
        outputs[:, self._fk_identity] = identity
        outputs[:, self._fk_transform] = y
        return outputs, logabsdet

    def forward(self, inputs, context=None):
        return self._run(inputs, context, False)

    def inverse(self, inputs, context=None):
        return self._run(inputs, context, True)


class AcceleratedRQCoupling(_Coupling, PiecewiseRationalQuadraticCouplingTransform):
    def _elementwise(self, x, params, inverse):
        b, d = x.shape
        params = _scaled_params(params.reshape(b, d, -1), self.num_bins, _softmax_scale(self, self.transform_net))
        return ops.rq_spline(x, params, inverse=inverse, **_spline_style(self))


class AcceleratedAffineCoupling(_Coupling, AffineCouplingTransform):
    def _elementwise(self, x, params, inverse):
        n = self.num_transform_features
        return ops.affine_coupling(x, params[:, :n], params[:, n:], scale="sigmoid", inverse=inverse)


class AcceleratedMaskedRQAutoregressive(MaskedPiecewiseRationalQuadraticAutoregressiveTransform):
    def _elementwise(self, inputs, autoregressive_params, inverse=False):
        b, d = inputs.shape[0], inputs.shape[1]
        params = autoregressive_params.view(b, d, self._output_dim_multiplier())
        params = _scaled_params(params, self.num_bins, _softmax_scale(self, self.autoregressive_net))
        return ops.rq_spline(inputs, params, inverse=inverse, **_spline_style(self))


def _coupling_check(module) -> Optional[str]:
    if module.unconditional_transform is not None:
        return "an unconditional transform of the identity features (apply_unconditional_transform=True)"
    return None


def _rq_coupling_check(module) -> Optional[str]:
    return _spline_check(module) or _coupling_check(module)


register(PiecewiseRationalQuadraticCouplingTransform, AcceleratedRQCoupling, _rq_coupling_check)
register(AffineCouplingTransform, AcceleratedAffineCoupling, _coupling_check)
register(MaskedPiecewiseRationalQuadraticAutoregressiveTransform, AcceleratedMaskedRQAutoregressive, _spline_check)
register_family("nflows", Transform, (CompositeTransform, MultiscaleCompositeTransform, InverseTransform))
