"""The fused forward and inverse shared by nflows and normflows, whose spline and coupling
classes are the same code (normflows copies nflows'): mixins that go in front of the library's
own class, and the checks that say when one does not apply."""
from __future__ import annotations

import math
import numbers
from typing import Optional

import torch

from .. import ops
from ..ops.rq_spline import KERNEL_MAX_BINS
from ..reference.rq_spline import TAILS


def feature_index(indices: torch.Tensor):
    """A slice for indices that step evenly (a view instead of a gather), else the indices."""
    idx = indices.tolist()
    if not idx:  # no identity features (sbi's nsf on 1-D theta: mask [1])
        return slice(0, 0)
    if len(idx) == 1:
        return slice(idx[0], idx[0] + 1)
    step = idx[1] - idx[0]
    if step > 0 and all(b - a == step for a, b in zip(idx, idx[1:])):
        return slice(idx[0], idx[-1] + 1, step)
    return indices


def softmax_scale(net) -> float:
    """The 1 / sqrt(hidden) nflows and normflows apply to the raw widths and heights when the
    conditioner has hidden_features (or hidden_channels); 1 without."""
    for attr in ("hidden_features", "hidden_channels"):
        if hasattr(net, attr):
            return 1.0 / math.sqrt(getattr(net, attr))
    return 1.0


def scaled_params(params: torch.Tensor, bins: int, scale: float) -> torch.Tensor:
    """params (..., 3K - 1) (or 3K + 1) with the widths and heights times `scale` (the libraries divide them
    in place), in one multiply."""
    if scale == 1.0:
        return params
    factor = params.new_ones(params.shape[-1])
    factor[: 2 * bins] = scale
    return params * factor


def bins_of(module) -> int:
    """num_bins of a coupling or autoregressive spline; a CDF keeps only its params."""
    bins = getattr(module, "num_bins", None)
    return bins if bins is not None else module.unnormalized_widths.shape[-1]


def spline_check(module) -> Optional[str]:
    tails = module.tails
    if tails not in TAILS:
        return f"tails={tails!r}: the fused spline has linear tails or none (circular tails are not covered)"
    if bins_of(module) > KERNEL_MAX_BINS:
        return f"num_bins={bins_of(module)} > {KERNEL_MAX_BINS}, the fused kernels' limit"
    if tails == "linear" and (not isinstance(module.tail_bound, numbers.Real) or isinstance(module.tail_bound, bool)):
        return "a tensor tail_bound (one bound per feature): the fused spline takes one bound"
    return None


def spline_style(module) -> dict:
    """The fused op's keywords for the module's spline: linear tails at +-tail_bound, or with
    tails=None the libraries' rational_quadratic_spline on [0, 1] (tail_bound unused there)."""
    if module.tails is None:
        domain = dict(bound=(0.0, 1.0), tails=None)
    else:
        domain = dict(bound=float(module.tail_bound))
    return dict(bins=bins_of(module), min_width=module.min_bin_width, min_height=module.min_bin_height,
                min_derivative=module.min_derivative, **domain)


class CouplingMixin:
    """CouplingTransform's forward and inverse, the features split and merged through views;
    `_fk_elementwise(x, params, inverse)` is the fused map of the transformed features."""

    def _flowkern_prepare(self):
        self._fk_identity = feature_index(self.identity_features)
        self._fk_transform = feature_index(self.transform_features)

    def _flowkern_release(self):
        for attr in ("_fk_identity", "_fk_transform"):
            self.__dict__.pop(attr, None)

    def _fk_run(self, inputs, context, inverse):
        if inputs.dim() != 2:  # images (B, C, H, W): the library's own code
            own = super(CouplingMixin, self)
            return own.inverse(inputs, context) if inverse else own.forward(inputs, context)
        if inputs.shape[1] != self.features:
            raise ValueError("Expected features = {}, got {}.".format(self.features, inputs.shape[1]))
        identity = inputs[:, self._fk_identity]
        extra = None
        if inverse and self.unconditional_transform is not None:  # the libraries' order: first
            identity, extra = self.unconditional_transform.inverse(identity, context)
        params = self.transform_net(identity, context)
        y, logabsdet = self._fk_elementwise(inputs[:, self._fk_transform], params, inverse)
        if not inverse and self.unconditional_transform is not None:
            identity, extra = self.unconditional_transform(identity, context)
        if extra is not None:
            logabsdet = logabsdet + extra
        outputs = torch.empty_like(inputs)
        outputs[:, self._fk_identity] = identity
        outputs[:, self._fk_transform] = y
        return outputs, logabsdet

    def forward(self, inputs, context=None):
        return self._fk_run(inputs, context, False)

    def inverse(self, inputs, context=None):
        return self._fk_run(inputs, context, True)


class RQCouplingMixin(CouplingMixin):
    def _fk_elementwise(self, x, params, inverse):
        b, d = x.shape
        params = scaled_params(params.reshape(b, d, -1), self.num_bins, softmax_scale(self.transform_net))
        return ops.rq_spline(x, params, inverse=inverse, **spline_style(self))


class SigmoidAffineCouplingMixin(CouplingMixin):
    """nflows' AffineCouplingTransform: shift first, then sigmoid(raw + 2) + 1e-3 scales."""

    def _fk_elementwise(self, x, params, inverse):
        n = self.num_transform_features
        return ops.affine_coupling(x, params[:, :n], params[:, n:], scale="sigmoid", inverse=inverse)


class RQAutoregressiveMixin:
    """The masked autoregressive spline's elementwise map (each pass of the inverse too)."""

    def _elementwise(self, inputs, autoregressive_params, inverse=False):
        b, d = inputs.shape[0], inputs.shape[1]
        params = autoregressive_params.view(b, d, self._output_dim_multiplier())
        params = scaled_params(params, self.num_bins, softmax_scale(self.autoregressive_net))
        return ops.rq_spline(inputs, params, inverse=inverse, **spline_style(self))


class AffineAutoregressiveMixin:
    """The masked affine autoregressive map (MAF) of nflows and normflows: the MADE's output
    interleaves (raw scale, shift) per feature; `_fk_scale` is the scale's map ("softplus" in
    nflows 0.14, "sigmoid" in normflows), each with its + 1e-3 floor."""

    _fk_scale: str  # set by each library's class

    def _fk_affine(self, inputs, autoregressive_params, inverse):
        params = autoregressive_params.view(-1, self.features, 2)
        return ops.affine_coupling(inputs, params[..., 1], params[..., 0], scale=self._fk_scale, inverse=inverse)

    def _elementwise_forward(self, inputs, autoregressive_params):
        return self._fk_affine(inputs, autoregressive_params, False)

    def _elementwise_inverse(self, inputs, autoregressive_params):
        return self._fk_affine(inputs, autoregressive_params, True)


def affine_autoregressive_check(module) -> Optional[str]:
    if getattr(module, "_epsilon", 1e-3) != 1e-3:
        return f"_epsilon={module._epsilon}: the fused scales' floor is 1e-3"
    return None


class RQCDFMixin:
    """PiecewiseRationalQuadraticCDF: one spline per feature, its params shared by the batch."""

    def _spline(self, inputs, inverse=False):
        params = torch.cat([self.unnormalized_widths, self.unnormalized_heights, self.unnormalized_derivatives], -1)
        params = params.expand(inputs.shape + params.shape[-1:])
        return ops.rq_spline(inputs, params, inverse=inverse, **spline_style(self))


def cdf_check(module) -> Optional[str]:
    why = spline_check(module)
    if why:
        return why
    if module.unnormalized_widths.dim() != 2:
        return "a CDF over a multi-dimensional shape (image inputs)"
    return None


LU_MAX_FEATURES = 32  # the placement matrices hold D^2 x D(D+1)/2 entries: 2 MB at 32, 1 GB at 128


def lu_check(module) -> Optional[str]:
    if module.features > LU_MAX_FEATURES:
        return (f"features={module.features} > {LU_MAX_FEATURES}: the fused assembly's placement matrices grow as "
                "D^4, and nflows' own index assignments are the cheaper way there")
    return None


class LUAssembly:
    """LULinear's L (unit lower) and U (upper, softplus(raw) + eps on the diagonal) from its
    entry vectors by two matrix-vector products with constant 0/1 placement matrices, instead of
    zero tensors filled by four index assignments on every call (nflows' _create_lower_upper)."""

    def _fk_placements(self, like: torch.Tensor):
        cache = self.__dict__.get("_fk_lu")
        if cache is None or cache[0].dtype != like.dtype or cache[0].device != like.device:
            d = self.features
            rows_l, cols_l = torch.tril_indices(d, d, -1)
            rows_u, cols_u = torch.triu_indices(d, d, 0)  # the diagonal last of each row: reorder below
            strict = rows_u != cols_u
            place_l = torch.zeros(d * d, rows_l.numel(), dtype=like.dtype)
            place_l[rows_l * d + cols_l, torch.arange(rows_l.numel())] = 1
            rows_s, cols_s = rows_u[strict], cols_u[strict]
            place_u = torch.zeros(d * d, rows_s.numel() + d, dtype=like.dtype)
            place_u[rows_s * d + cols_s, torch.arange(rows_s.numel())] = 1       # upper entries
            place_u[torch.arange(d) * (d + 1), rows_s.numel() + torch.arange(d)] = 1  # then the diagonal
            eye = torch.eye(d, dtype=like.dtype).reshape(-1)
            cache = tuple(t.to(like.device) for t in (place_l, place_u, eye))
            self.__dict__["_fk_lu"] = cache
        return cache

    def _fk_lower_upper(self):
        place_l, place_u, eye = self._fk_placements(self.lower_entries)
        d = self.features
        lower = torch.addmv(eye, place_l, self.lower_entries).view(d, d)
        diag = self.upper_diag
        upper = torch.mv(place_u, torch.cat([self.upper_entries, diag])).view(d, d)
        return lower, upper, diag

    def _flowkern_release(self):
        self.__dict__.pop("_fk_lu", None)

    def forward_no_cache(self, inputs):
        lower, upper, diag = self._fk_lower_upper()
        outputs = torch.addmm(self.bias, inputs, (lower @ upper).t())  # x (LU)^T + b in one matmul
        return outputs, torch.log(diag).sum().expand(inputs.shape[0])

    def inverse_no_cache(self, inputs):
        lower, upper, diag = self._fk_lower_upper()
        rhs = (inputs - self.bias).t()
        out = torch.linalg.solve_triangular(lower, rhs, upper=False, unitriangular=True)
        out = torch.linalg.solve_triangular(upper, out, upper=True)
        return out.t(), (-torch.log(diag).sum()).expand(inputs.shape[0])
