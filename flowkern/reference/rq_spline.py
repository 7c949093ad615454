"""Pure-PyTorch definition of the rational-quadratic spline (Neural Spline Flows): the ground truth.

The same function as nflows' `unconstrained_rational_quadratic_spline` with tails="linear",
tail_bound=bound, and minimal bin width, height and derivative 1e-3 (Durkan et al. 2019);
with tails=None and bound=(0, 1), nflows' `rational_quadratic_spline` (its tails=None).
Every fused kernel is tested against this function run in float64; its backward is
PyTorch's autograd of these lines. Written to be ported line by line.

Parameters, per element of x: params[..., :] = [uw (bins) | uh (bins) | ud (bins - 1)], or
with tails=None [uw (bins) | uh (bins) | ud (bins + 1)].

The interval [lo, hi] is [-B, B] for bound=B, or bound=(lo, hi) itself. Knots (K = bins,
w_min = min_width, h_min = min_height, d_min = min_derivative):

    w_i   = w_min + (1 - w_min K) softmax(uw)_i                       i = 0..K-1
    x_0   = lo,   x_i = (hi - lo)(w_0 + ... + w_{i-1}) + lo,   x_K = hi   (first/last set exactly)
    y_i   likewise from uh and h_min
    tails="linear": d_0 = d_K = 1 (the identity tails' slope), d_i = d_min + softplus(ud_{i-1}), i = 1..K-1
    tails=None:     d_i = d_min + softplus(ud_i), i = 0..K (the end slopes learned too)

Outside [lo, hi] the map is the identity with log-det 0 (with tails=None too, where nflows
raises: there the map is continuous but its slope jumps at lo and hi). Inside, the bin is
k = #{interior knots x_i <= x} (x exactly at a knot goes to the bin on its right, x = hi to
the last bin), and with w = x_{k+1} - x_k, h = y_{k+1} - y_k, delta = h / w:

    theta = (x - x_k) / w                                   in [0, 1]
    t     = theta (1 - theta)
    den   = delta + (d_k + d_{k+1} - 2 delta) t             > 0
    y     = y_k + h (delta theta^2 + d_k t) / den
    log dy/dx = log(delta^2 (d_{k+1} theta^2 + 2 delta t + d_k (1 - theta)^2)) - 2 log(den)

Inverse (bin k searched on the y knots), rho = (y - y_k) / h in [0, 1]. theta solves
a theta^2 + b theta + c = 0 with (nflows' a, b, c divided by h, so their size does not
depend on the bound)

    e = rho (d_k + d_{k+1} - 2 delta) - d_k
    a = e + delta,   b = -e,   c = -delta rho,   disc = max(b^2 - 4ac, 0)

and its root in [0, 1], taken without cancellation: theta = 2c / (-b - sqrt(disc)) when b >= 0
(nflows' "stable" root), else the same root as (-b + sqrt(disc)) / (2a) (there -b > 0 and
a = -b + delta > 0). theta is clamped into [0, 1], x = x_k + theta w, and the log-det is
minus the forward's log dy/dx at theta. Exactly, a + b = delta > 0 and disc > 0, so neither
denominator vanishes; the clamps only absorb rounding.

Rounding can put y_k + h (or x_k + w) an ulp past lo or hi: inside elements are clamped
into [lo, hi], keeping the gradient of the unclamped expression (what a kernel's
analytic backward computes), so the inverse of an output is always the spline's.

Log-dets are summed per row over every non-batch dim, in float32 (float64 for float64
input). Half inputs compute in float32 and round the output once.

Styles of knots (the keywords; the defaults above are nflows' and normflows'):

    min_width, min_height, min_derivative   w_min, h_min, d_min (>= 0; w_min K <= 1, h_min K <= 1)
    derivative = "softplus"                 d_i = d_min + softplus(ud_{i-1})   (nflows, normflows)
               = "exp"                      d_i = d_min + exp(ud_{i-1})        (zuko, with d_min = 0)
    slope = None                            the raw params as they come
          = s in (0, 1)                     zuko's soft clamp first, with l = log(s) < 0:
                                            uw <- uw / (1 + |2 uw / l|), uh likewise,
                                            ud <- ud / (1 + |ud / l|)
zuko's MonotonicRQSTransform(bound=B, slope=s) is min_width = min_height = min_derivative = 0,
derivative="exp", slope=s (its knots sum to +B up to rounding; these end exactly at +-B).
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from ._common import row_sum

MIN_WIDTH = 1e-3
MIN_HEIGHT = 1e-3
MIN_DERIVATIVE = 1e-3


TAILS = ("linear", None)


def params_per_element(bins: int, tails: Optional[str] = "linear") -> int:
    """Length of the last dim of params: bins widths, bins heights, and bins - 1 derivatives
    (tails="linear") or bins + 1 (tails=None)."""
    return 3 * bins - 1 if tails == "linear" else 3 * bins + 1


def interval(bound) -> Tuple[float, float]:
    """(lo, hi) of the spline's interval: (-bound, bound) for a number, or the pair itself."""
    if isinstance(bound, (tuple, list)):
        lo, hi = bound
        return float(lo), float(hi)
    return -float(bound), float(bound)


def identity_derivative_raw(min_derivative: float = MIN_DERIVATIVE, derivative: str = "softplus") -> float:
    """The unnormalised derivative ud with d_min + softplus(ud) = 1 (nflows' boundary constant),
    or d_min + exp(ud) = 1 for derivative="exp" (a soft clamp keeps 0 at 0)."""
    if derivative == "exp":
        return math.log(1.0 - min_derivative)
    return math.log(math.expm1(1.0 - min_derivative))



def bin_edges(unnormalised: torch.Tensor, bound, min_size: float) -> torch.Tensor:
    """Knot positions (..., K + 1) on [lo, hi] = interval(bound) from unnormalised bin sizes (..., K)."""
    lo, hi = interval(bound)
    bins = unnormalised.shape[-1]
    sizes = min_size + (1 - min_size * bins) * torch.softmax(unnormalised, dim=-1)
    cum = torch.cumsum(sizes, dim=-1)
    inner = (hi - lo) * cum[..., :-1] + lo  # for [-B, B]: 2B cum - B, the same rounding
    first = torch.full_like(unnormalised[..., :1], lo)
    return torch.cat([first, inner, torch.full_like(first, hi)], dim=-1)  # the end knots exactly lo and hi


def spline_knots(
    params: torch.Tensor,
    bins: int,
    bound: float,
    min_width: float = MIN_WIDTH,
    min_height: float = MIN_HEIGHT,
    min_derivative: float = MIN_DERIVATIVE,
    derivative: str = "softplus",
    slope: Optional[float] = None,
    tails: Optional[str] = "linear",
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(xk, yk, dk), each (..., bins + 1): the knots' x, y and the derivative at each knot."""
    uw, uh, ud = params.split([bins, bins, params_per_element(bins, tails) - 2 * bins], dim=-1)
    if slope is not None:
        log_slope = math.log(slope)
        # zuko's expressions, to the operation: 2 u / l rounds as (2 u) / l
        uw = uw / (1 + abs(2 * uw / log_slope))
        uh = uh / (1 + abs(2 * uh / log_slope))
        ud = ud / (1 + abs(ud / log_slope))
    xk = bin_edges(uw, bound, min_width)
    yk = bin_edges(uh, bound, min_height)
    inner = min_derivative + (torch.exp(ud) if derivative == "exp" else F.softplus(ud))
    if tails is None:
        return xk, yk, inner
    one = params.new_ones(params.shape[:-1] + (1,))  # slope 1 at the ends meets the identity tails
    return xk, yk, torch.cat([one, inner, one], dim=-1)


def find_bin(knots: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Bin index (..., 1) of v in [knots[0], knots[-1]]: the number of interior knots <= v."""
    return (v.unsqueeze(-1) >= knots[..., 1:-1]).sum(dim=-1, keepdim=True)


def _at(t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    return t.gather(-1, idx).squeeze(-1)


def rq_log_slope(theta, delta, d_lo, d_hi):
    """log dy/dx of one bin's rational quadratic at theta in [0, 1]."""
    t = theta * (1 - theta)
    den = delta + (d_lo + d_hi - 2 * delta) * t
    num = delta.pow(2) * (d_hi * theta.pow(2) + 2 * delta * t + d_lo * (1 - theta).pow(2))
    return torch.log(num) - 2 * torch.log(den)


def rq_forward(x, x_lo, w, y_lo, h, d_lo, d_hi):
    """One bin's rational quadratic at x in [x_lo, x_lo + w]: (y, log dy/dx)."""
    delta = h / w
    theta = (x - x_lo) / w
    t = theta * (1 - theta)
    num = h * (delta * theta.pow(2) + d_lo * t)
    den = delta + (d_lo + d_hi - 2 * delta) * t
    return y_lo + num / den, rq_log_slope(theta, delta, d_lo, d_hi)


def _safe_sqrt(v: torch.Tensor) -> torch.Tensor:
    """sqrt(max(v, 0)) whose gradient stays finite (zero) where v <= 0: sqrt's derivative at 0
    is infinite, and would turn the whole gradient into inf/NaN."""
    pos = v > 0
    return torch.where(pos, torch.sqrt(torch.where(pos, v, torch.ones_like(v))), torch.zeros_like(v))


def _clamp_keep_grad(v: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    """v clamped into [lo, hi], with the gradient of v itself (a clamp's gradient would be 0
    where rounding overshot the bound by an ulp, e.g. at x = +bound)."""
    return v + (v.clamp(lo, hi) - v).detach()


def rq_inverse(y, x_lo, w, y_lo, h, d_lo, d_hi):
    """Inverse of rq_forward on one bin, y in [y_lo, y_lo + h]: (x, log dy/dx at that x)."""
    delta = h / w
    rho = (y - y_lo) / h
    e = rho * (d_lo + d_hi - 2 * delta) - d_lo
    a = e + delta
    b = -e
    c = -delta * rho
    sq = _safe_sqrt(b * b - 4 * a * c)  # > 0 exactly; rounding can take it to <= 0 (nflows asserts there)
    # Pick numerator and denominator before dividing: a division in an unused torch.where
    # branch could still send NaN into the gradient.
    use_c = b >= 0
    theta = torch.where(use_c, 2 * c, -b + sq) / torch.where(use_c, -b - sq, 2 * a)
    # Rounding can put theta an ulp outside [0, 1] (at y = +-bound, say): clamp the value but
    # keep the root's gradient, which a clamp would zero (the kernels' analytic backward agrees).
    theta = _clamp_keep_grad(theta, 0.0, 1.0)
    return x_lo + theta * w, rq_log_slope(theta, delta, d_lo, d_hi)


def rq_spline_ref(
    x: torch.Tensor,
    params: torch.Tensor,
    *,
    bins: int = 8,
    bound: float = 3.0,
    inverse: bool = False,
    logdet: Optional[torch.Tensor] = None,
    min_width: float = MIN_WIDTH,
    min_height: float = MIN_HEIGHT,
    min_derivative: float = MIN_DERIVATIVE,
    derivative: str = "softplus",
    slope: Optional[float] = None,
    tails: Optional[str] = "linear",
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Reference rational-quadratic spline; same signature and result as flowkern.ops.rq_spline.

    x (B, ...); params x.shape + (params_per_element(bins, tails),). Returns (y, logdet): y has x's shape and
    dtype, logdet (B,) the per-row sum of log|dy/dx| (negated for inverse=True), added to
    `logdet` when one is given.
    """
    if min_width * bins > 1 or min_height * bins > 1:
        raise ValueError(f"bins * min_width and bins * min_height must be <= 1, got bins={bins}")
    dtype = x.dtype
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    x, params = x.to(compute), params.to(compute)
    lo, hi = interval(bound)
    inside = (x >= lo) & (x <= hi)
    # Elements outside take the spline at lo instead: their unused spline branch stays finite
    # (x = 1e38 would give inf/NaN there, which torch.where passes on to the gradient).
    v = torch.where(inside, x, torch.full_like(x, lo))
    xk, yk, dk = spline_knots(params, bins, bound, min_width, min_height, min_derivative, derivative, slope, tails)
    k = find_bin(yk if inverse else xk, v)
    x_lo, y_lo, d_lo = _at(xk, k), _at(yk, k), _at(dk, k)
    w, h, d_hi = _at(xk, k + 1) - x_lo, _at(yk, k + 1) - y_lo, _at(dk, k + 1)
    if inverse:
        out, log_slope = rq_inverse(v, x_lo, w, y_lo, h, d_lo, d_hi)
        log_slope = -log_slope
    else:
        out, log_slope = rq_forward(v, x_lo, w, y_lo, h, d_lo, d_hi)
    out = torch.where(inside, _clamp_keep_grad(out, lo, hi), x)
    ld = row_sum(torch.where(inside, log_slope, torch.zeros_like(log_slope)))
    if logdet is not None:
        ld = logdet + ld
    return out.to(dtype), ld
