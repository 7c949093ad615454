"""flowkern.ops.rq_spline: the rational-quadratic spline of Neural Spline Flows, with its log-det.

    params[..., :] = [unnormalised widths (bins) | heights (bins) | interior derivatives (bins - 1)]
    inside [-bound, bound]:  y = the monotone rational-quadratic spline through the knots
    outside:                 y = x, log-det 0 (linear tails; the boundary derivatives are 1)

The same function as nflows' unconstrained_rational_quadratic_spline(tails="linear",
tail_bound=bound) with minimal bin width, height and derivative 1e-3 by default; the knot style
keywords (min_width, min_height, min_derivative, derivative, slope) also give nflows' other
minimums and zuko's MonotonicRQSTransform. bound=(lo, hi) puts the spline on [lo, hi], and
tails=None learns the end derivatives too (bins + 1 derivative params): bound=(0, 1),
tails=None is nflows' rational_quadratic_spline (its tails=None). The full formula is in
flowkern.reference.rq_spline.

Backends: the compiled kernels (csrc/math/rq_spline.h for CPU and CUDA) and the Triton
kernels keep each element's bins in registers, save only the op's inputs for the backward
(no B x D x bins intermediate) and compute the backward analytically; the "reference"
backend runs flowkern.reference.rq_spline_ref under autograd. The kernels take bins <= 64
(the reference up to 1000): "auto" uses the reference beyond, an explicit backend raises.
"""
from __future__ import annotations

import math
import numbers
from typing import Optional, Tuple, Union

import torch

from .. import _ext
from .._backend import BackendUnavailable, get_backend, kernel_dtype, kernel_inputs, resolve
from ..reference.rq_spline import (MIN_DERIVATIVE, MIN_HEIGHT, MIN_WIDTH, TAILS, interval, params_per_element,
                                   rq_spline_ref)
from . import _checks
from ._autograd import apply, contiguous_grads, kernel_functions
from ._vmap import register_row_vmap

KERNEL_MAX_BINS = 64

# min_width * bins <= 1 (and the same for heights): beyond, the minimal bins overfill [-bound, bound].
MAX_BINS = int(1 / max(MIN_WIDTH, MIN_HEIGHT) + 1e-9)


def check_bins(bins) -> int:
    if isinstance(bins, bool) or not isinstance(bins, numbers.Integral):
        raise TypeError(f"bins must be an int, got {type(bins).__name__}")
    if not 1 <= bins <= MAX_BINS:
        raise ValueError(f"bins must be between 1 and {MAX_BINS}, got {bins}")
    return int(bins)


# The knots and the spline's terms are computed in float32 (float64 for float64 input):
# between these bounds, 2 * bound * (d_max = softplus(1e4)) stays finite and the smallest
# bin, 2e-3 * bound, a normal number.
BOUND_RANGE = (1e-30, 1e30)


def check_bound(bound):
    """bound B (the interval [-B, B]) or a pair (lo, hi), checked; returned as given (a float
    or a tuple of floats)."""
    r_lo, r_hi = BOUND_RANGE
    if isinstance(bound, (tuple, list)):
        if len(bound) != 2:
            raise ValueError(f"bound must be a number or a pair (lo, hi), got {len(bound)} values")
        for end in bound:
            if isinstance(end, bool) or not isinstance(end, numbers.Real):
                raise TypeError(f"bound's ends must be numbers, got {type(end).__name__}")
        lo, hi = float(bound[0]), float(bound[1])
        if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
            raise ValueError(f"bound=(lo, hi) needs finite lo < hi, got {bound}")
        half = (hi - lo) / 2
        if not (r_lo <= half and max(abs(lo), abs(hi)) <= r_hi):
            raise ValueError(f"bound=(lo, hi) needs (hi - lo) / 2 >= {r_lo:g} and |lo|, |hi| <= {r_hi:g}, got {bound}")
        return (lo, hi)
    if isinstance(bound, bool) or not isinstance(bound, numbers.Real):
        raise TypeError(f"bound must be a number or a pair (lo, hi), got {type(bound).__name__}")
    bound = _checks.positive("bound", bound)
    if not r_lo <= bound <= r_hi:
        raise ValueError(f"bound must be between {r_lo:g} and {r_hi:g}, got {bound}")
    return bound


def check_tails(tails) -> Optional[str]:
    if tails not in TAILS:
        raise ValueError(f"tails must be 'linear' (slope 1 at the ends, the identity outside) or None (the end "
                         f"slopes learned too, nflows' tails=None), got {tails!r}")
    return tails


DERIVATIVES = ("softplus", "exp")


def check_style(bins: int, min_width, min_height, min_derivative, derivative, slope, tails="linear") -> tuple:
    """The knot style checked: (min_width, min_height, min_derivative, exp_derivative, log_slope,
    learned_ends), the kernels' style arguments."""
    tails = check_tails(tails)
    mins = {}
    for name, value in (("min_width", min_width), ("min_height", min_height), ("min_derivative", min_derivative)):
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise TypeError(f"{name} must be a number, got {type(value).__name__}")
        if not (math.isfinite(value) and value >= 0):
            raise ValueError(f"{name} must be finite and >= 0, got {value}")
        mins[name] = float(value)
    for name in ("min_width", "min_height"):
        if mins[name] * bins > 1:
            raise ValueError(f"{name} * bins must be <= 1 (the minimal bins fill [-bound, bound]), got "
                             f"{name}={mins[name]} with bins={bins}")
    if derivative not in DERIVATIVES:
        raise ValueError(f"derivative must be one of {DERIVATIVES}, got {derivative!r}")
    log_slope = 0.0
    if slope is not None:
        if isinstance(slope, bool) or not isinstance(slope, numbers.Real):
            raise TypeError(f"slope must be a number or None, got {type(slope).__name__}")
        if not 0 < slope < 1:
            raise ValueError(f"slope must be in (0, 1) (zuko's minimum slope), got {slope}")
        log_slope = math.log(slope)
    elif min(mins["min_width"], mins["min_height"]) == 0 or (derivative == "exp" and mins["min_derivative"] == 0):
        # softmax and exp underflow to 0 for raw params of a few hundred: a bin or a slope would vanish
        raise ValueError("min_width, min_height (and min_derivative with derivative='exp') of 0 need slope= "
                         "(zuko's soft clamp) to keep the bins and slopes away from 0")
    return (mins["min_width"], mins["min_height"], mins["min_derivative"], derivative == "exp", log_slope,
            tails is None)


def rq_spline(
    x: torch.Tensor,
    params: torch.Tensor,
    *,
    bins: int = 8,
    bound: Union[float, Tuple[float, float]] = 3.0,
    inverse: bool = False,
    logdet: Optional[torch.Tensor] = None,
    min_width: float = MIN_WIDTH,
    min_height: float = MIN_HEIGHT,
    min_derivative: float = MIN_DERIVATIVE,
    derivative: str = "softplus",
    slope: Optional[float] = None,
    tails: Optional[str] = "linear",
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Rational-quadratic spline of x (B, ...) elementwise, with params x.shape + (3 * bins - 1,)
    (tails="linear") or x.shape + (3 * bins + 1,) (tails=None).

    Returns (y, logdet): y has x's shape and dtype; logdet has shape (B,), float32 (float64 for
    float64 input; half inputs compute in float32), the sum over all non-batch dims of
    log|dy/dx|, added to `logdet` when one is given. inverse=True applies the inverse map with
    the negated log-det. Finite for every finite x and y (also at the knots, at +-bound and far
    outside it) and for large params (|params| up to 1e4), with finite gradients.

    The interval: bound=B is [-B, B], bound=(lo, hi) is [lo, hi]. Outside it the map is the
    identity with log-det 0. tails="linear": the derivative at both ends is 1, so the spline
    meets the identity smoothly (nflows' linear tails, zuko). tails=None: the end derivatives
    are learned like the interior ones (params [widths | heights | bins + 1 derivatives]), as
    nflows' tails=None spline on bound=(0, 1); nflows raises on inputs outside the interval,
    flowkern passes them through unchanged (continuous there, with a jump in slope).

    The knot style (flowkern.reference.rq_spline): bins of at least min_width / min_height of
    [-bound, bound] and interior derivatives min_derivative + softplus(raw) (nflows' defaults),
    or derivative="exp": min_derivative + exp(raw); slope= first soft-clamps the raw params as
    zuko does. zuko's MonotonicRQSTransform(bound=B, slope=s) is bound=B, min_width=0,
    min_height=0, min_derivative=0, derivative="exp", slope=s.
    """
    _checks.tensor("x", x)
    bins = check_bins(bins)
    bound = check_bound(bound)
    style = check_style(bins, min_width, min_height, min_derivative, derivative, slope, tails)
    _checks.tensor("params", params)
    expected = tuple(x.shape) + (params_per_element(bins, tails),)
    if tuple(params.shape) != expected:
        count = "3 * bins - 1" if tails == "linear" else "3 * bins + 1 (tails=None)"
        raise ValueError(f"params must have shape x.shape + ({count},) = {expected} for bins={bins}, "
                         f"got {tuple(params.shape)}")
    if params.dtype != x.dtype:
        raise TypeError(f"params must have the dtype of x ({x.dtype}), got {params.dtype}")
    if params.device != x.device:
        raise ValueError(f"params is on {params.device} but x is on {x.device}")
    inverse = _checks.flag("inverse", inverse)
    logdet = _checks.running_logdet(logdet, x)
    impl = resolve(x.device)
    if impl == "compiled" and not _ext.has_op("rq_spline_fwd"):  # an extension built before the spline
        if get_backend() != "auto":
            raise BackendUnavailable(f"backend {get_backend()!r}: flowkern._C has no spline kernels; rebuild it")
        impl = "triton" if x.device.type == "cuda" else "reference"
    if impl != "reference":
        unsupported = ("bins > 64" if bins > KERNEL_MAX_BINS else
                       "float64 (the Triton kernels compute in float32)" if impl == "triton" and x.dtype == torch.float64
                       else None)
        if unsupported:
            if get_backend() != "auto":
                raise ValueError(f"backend {get_backend()!r}: the fused spline kernels do not take {unsupported}; "
                                 "use backend 'reference' (or 'auto')")
            impl = "reference"
    if impl == "reference":
        return rq_spline_ref(x, params, bins=bins, bound=bound, inverse=bool(inverse), logdet=logdet,
                             min_width=style[0], min_height=style[1], min_derivative=style[2], derivative=derivative,
                             slope=slope, tails=tails)
    dtype = x.dtype
    x, params = kernel_inputs(kernel_dtype(impl, x.device, dtype), x, params)
    out, ld = apply(_FUNCTIONS, _run, (x, params, logdet), x, params, logdet, bins, interval(bound), bool(inverse),
                    style, impl)
    return out.to(dtype), ld


def _kernels(impl: str):
    if impl == "compiled":
        return torch.ops.flowkern.rq_spline_fwd, torch.ops.flowkern.rq_spline_bwd
    from ..triton import rq_spline as tk

    return tk.rq_spline_fwd, tk.rq_spline_bwd


def _run(x, params, logdet, bins, lo_hi, inverse, style, impl):
    return _kernels(impl)[0](x, params, bins, *lo_hi, inverse, logdet, *style)


def _save(ctx, inputs, outputs):
    x, params, logdet, bins, lo_hi, inverse, style, impl = inputs
    ctx.save_for_backward(x, params)  # the op's inputs only: the kernels recompute the rest
    ctx.config = (bins, lo_hi, inverse, style, impl)
    ctx.has_logdet = logdet is not None


def _backward(ctx, grad_out, grad_logdet):
    x, params = ctx.saved_tensors
    bins, lo_hi, inverse, style, impl = ctx.config
    grad_out, grad_logdet = contiguous_grads(grad_out, grad_logdet, x)
    grad_x, grad_params = _kernels(impl)[1](grad_out, grad_logdet, x, params, bins, *lo_hi, inverse, *style)
    return grad_x, grad_params, (grad_logdet if ctx.has_logdet else None), None, None, None, None, None


_FUNCTIONS = kernel_functions("RQSplineFunction", _run, _save, _backward)

# Positions of the tensor arguments of the fwd / bwd kernel ops (compiled and Triton alike).
FWD_TENSOR_ARGS = (0, 1, 6)
BWD_TENSOR_ARGS = (0, 1, 2, 3)


def _register_compiled() -> None:
    if not _ext.has_op("rq_spline_fwd"):
        return

    @torch.library.register_fake("flowkern::rq_spline_fwd")
    def _fwd_fake(x, params, bins, lo, hi, inverse, logdet, min_width, min_height, min_derivative, exp_derivative,
                  log_slope, learned_ends):
        return torch.empty_like(x), x.new_empty((x.shape[0],), dtype=_checks.logdet_dtype(x.dtype))

    @torch.library.register_fake("flowkern::rq_spline_bwd")
    def _bwd_fake(grad_out, grad_logdet, x_in, params, bins, lo, hi, inverse, min_width, min_height, min_derivative,
                  exp_derivative, log_slope, learned_ends):
        return torch.empty_like(x_in), torch.empty_like(params)

    register_row_vmap("flowkern::rq_spline_fwd", FWD_TENSOR_ARGS)
    register_row_vmap("flowkern::rq_spline_bwd", BWD_TENSOR_ARGS)


_register_compiled()
