"""flowkern.ops.rq_spline: the rational-quadratic spline of Neural Spline Flows, with its log-det.

    params[..., :] = [unnormalised widths (bins) | heights (bins) | interior derivatives (bins - 1)]
    inside [-bound, bound]:  y = the monotone rational-quadratic spline through the knots
    outside:                 y = x, log-det 0 (linear tails; the boundary derivatives are 1)

The same function as nflows' unconstrained_rational_quadratic_spline(tails="linear",
tail_bound=bound) with minimal bin width, height and derivative 1e-3; the full formula is in
flowkern.reference.rq_spline. Fused C++/CUDA/Triton kernels will come later behind this
signature; for now every backend runs the pure-PyTorch reference and autograd differentiates
it, so the backend switch (flowkern.set_backend) does not change this op yet.
"""
from __future__ import annotations

import numbers
from typing import Optional, Tuple

import torch

from ..reference.rq_spline import MIN_HEIGHT, MIN_WIDTH, params_per_element, rq_spline_ref
from . import _checks

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


def check_bound(bound) -> float:
    if isinstance(bound, bool) or not isinstance(bound, numbers.Real):
        raise TypeError(f"bound must be a number, got {type(bound).__name__}")
    bound = _checks.positive("bound", bound)
    lo, hi = BOUND_RANGE
    if not lo <= bound <= hi:
        raise ValueError(f"bound must be between {lo:g} and {hi:g}, got {bound}")
    return bound


def rq_spline(
    x: torch.Tensor,
    params: torch.Tensor,
    *,
    bins: int = 8,
    bound: float = 3.0,
    inverse: bool = False,
    logdet: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Rational-quadratic spline of x (B, ...) elementwise, with params x.shape + (3 * bins - 1,).

    Returns (y, logdet): y has x's shape and dtype; logdet has shape (B,), float32 (float64 for
    float64 input; half inputs compute in float32), the sum over all non-batch dims of
    log|dy/dx|, added to `logdet` when one is given. inverse=True applies the inverse map with
    the negated log-det. Finite for every finite x and y (also at the knots, at +-bound and far
    outside it) and for large params (|params| up to 1e4), with finite gradients.
    """
    _checks.tensor("x", x)
    bins = check_bins(bins)
    bound = check_bound(bound)
    _checks.tensor("params", params)
    expected = tuple(x.shape) + (params_per_element(bins),)
    if tuple(params.shape) != expected:
        raise ValueError(f"params must have shape x.shape + (3 * bins - 1,) = {expected} for bins={bins}, "
                         f"got {tuple(params.shape)}")
    if params.dtype != x.dtype:
        raise TypeError(f"params must have the dtype of x ({x.dtype}), got {params.dtype}")
    if params.device != x.device:
        raise ValueError(f"params is on {params.device} but x is on {x.device}")
    logdet = _checks.running_logdet(logdet, x)
    return rq_spline_ref(x, params, bins=bins, bound=bound, inverse=bool(inverse), logdet=logdet)
