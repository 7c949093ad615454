"""Triton kernels for the rational-quadratic spline (Neural Spline Flows): forward, inverse, backward.

A restatement of flowkern/reference/rq_spline.py (the ground truth: nflows' spline on an interval
[lo, hi], identity outside it), with its styles of knots as runtime arguments:
the minimal bin width, height and derivative (w_min, h_min, d_min; nflows' 1e-3 by default), the
interior derivative d = d_min + softplus(u) or d_min + exp(u) (EXP_D, a compile-time flag), and
zuko's soft clamp of the raw params first, u <- u / (1 + |a u|) with a = 2 / l for widths and
heights and a = 1 / l for derivatives, l = log_slope < 0 (CLAMP = log_slope != 0, a compile-time
flag). The minima and log_slope are runtime scalars, so changing them compiles nothing.

The interval [lo, hi] (fp64 runtime scalars; [-B, B] for a bound B): knots x_0 = lo,
x_j = (hi - lo) cum_j + lo, x_K = hi exactly (the reference's bin_edges, with hi - lo in fp64;
for [-B, B] bit for bit the former 2B cum - B), likewise y. The end derivatives: with linear
tails d_0 = d_K = 1 (3 K - 1 params per element: [uw (K) | uh (K) | ud (K - 1)]); with
LEARNED (a compile-time flag; the reference's tails=None, nflows' rational_quadratic_spline)
d_j = d_min + f(ud_j) for j = 0..K, the clamp and f as the interior ones (3 K + 1 params:
[uw (K) | uh (K) | ud (K + 1)]).

Layout: a 2-D grid (row, program in the row); each program walks blocks of BLOCK elements of
its row. Per element it loads its params as three (BLOCK, KP) tiles (widths, heights,
derivatives; KP the next power of two of the segment, padding masked), so every parameter is
read and exponentiated once: softmax along the tile (tl.max / tl.sum), knots by tl.cumsum, the
bin by counting interior knots <= x, and the bin's terms picked by one-hot masked sums (exact:
every other term is 0). A loop over the bins with tl.static_range would need three passes over
the parameters (max, sum of exps, knots) and twice the exps; the tile keeps them in registers.

Per bin k (W, H the bin's width and height, s = H / W, d0 = d_k, d1 = d_{k+1}) at
theta = (x - x_k) / W, with t = theta (1 - theta):

    den = s + (d0 + d1 - 2 s) t,        Q = d1 theta^2 + 2 s t + d0 (1 - theta)^2
    y   = y_k + H R,  R = (s theta^2 + d0 t) / den,     ld = log F_x = log(s^2 Q) - 2 log(den)
    1 - R = (s (1 - theta)^2 + d1 t) / den: the same function seen from the right knot, d0 <-> d1

Backward. Local partials (writing D = den^2):

    H R_theta = W F_x,  F_x = s^2 Q / D
    R_s  = t (d1 theta^2 - d0 (1 - theta)^2) / D
    R_d0 = t (s (1 - theta)^2 + d1 t) / D,          R_d1 = -t (s theta^2 + d0 t) / D
    ld_theta = 2 (d1 theta - d0 (1 - theta) + s (1 - 2 theta)) / Q - 2 (d0 + d1 - 2 s)(1 - 2 theta) / den
    ld_s  = 2 t / Q + 2 (d0 + d1) t / (s den)
    ld_d0 = (1 - theta)^2 / Q - 2 t / den,           ld_d1 = theta^2 / Q - 2 t / den

With weights (gy, gl) on (y, ld): g_theta = gy W F_x + gl ld_theta, g_s = gy H R_s + gl ld_s,
g_d0/1 likewise, and through theta = (x - x_k) / W, s = H / W, W = x_{k+1} - x_k, H = y_{k+1} - y_k:

    knot x_k: (g_s s - g_theta (1 - theta)) / W        knot x_{k+1}: -(g_theta theta + g_s s) / W
    knot y_k: gy (1 - R) - g_s / W                      knot y_{k+1}: gy R + g_s / W

Knot j (1..K-1) is lo + (hi - lo) sum_{i<j} w_i (the end knots are fixed), so dL/dw_i =
(hi - lo) (sum of the interior knot gradients with j > i); w = m + (1 - K m) softmax(u) gives
dL/du_j = (1 - K m) p_j (dL/dw_j - sum_i dL/dw_i p_i); d_j = m_d + softplus(u_{j-1}) (learned
ends: u_j) gives dL/du = dL/dd sigmoid(u) (exp: dL/dd exp(u)). Under the soft clamp these are the gradients of the
clamped params u_c = u / (1 + |a u|), and dL/du = dL/du_c / (1 + |a u|)^2.

    forward (inverse=False):  (gy, gl) = (g, gld);       grad_x = g F_x + gld ld_theta / W
    inverse (inverse=True):   G = (g - gld ld_theta / W) / F_x at the recomputed theta;
                              grad_y = G;  (gy, gl) = (-G, -gld), where g_theta = -g W exactly.

Outside [lo, hi]: grad_in = g and no parameter gradient (the lanes compute the spline at lo,
which keeps them finite). The inverse gradient is the analytic one (implicit function) also
where theta lands exactly on 0 or 1 (at y knots, lo and hi).

Precision. The gradients are ill-conditioned in the knots: theta moves by ulp(max(|lo|, |hi|)) / W when a knot
moves by one fp32 ulp, and the log-det's gradient has 1 / W and 1 / Q factors. A kernel with
its own fp32 rounding of the knots errs as much as the float32 reference, but differently, and
fails the "2x the float32 reference's error" rule at ~1% of the points. So the exps, the
softmax normalisation, the knots and the differences that cancel (x - x_k, x_{k+1} - x,
x_{k+1} - x_k, likewise in y) are fp64 (about 8 K fp64 operations per element on top of 2 K
fp64 exps), as is the soft clamp (from the fp32 params, so the clamped widths and heights are
the float64 reference's to the last bit; the clamped derivative params are rounded to fp32);
everything else is fp32. w_min, h_min and log_slope are fp64 kernel arguments (the minimal sizes
enter the fp64 knots; d_min is fp32, like the derivatives). theta and 1 - theta are both taken from fp64 distances,
the inverse solves the quadratic from the nearer knot, the output is formed from the nearer
knot (exact at knots, lo and hi), and the softmax backward is written with partial sums of the
probabilities (no difference of nearly equal terms when they saturate or when the two knot
gradients of a narrow bin nearly cancel). The bin is found on the fp64 knots, so an input within
an fp32 ulp of a knot takes the float64 reference's bin for the same input.

Inputs of any float dtype are read as such (fp16/bf16 upcast, fp64 kept for the knot
arithmetic, the rest fp32; lo <= x <= hi is tested in fp64 for fp64 inputs, else in fp32 with
the ends rounded to fp32, as the reference does; elements outside are copied exactly in their
own dtype).
The log-det is float32, or float64 for float64 inputs: each program writes the fp32 partial sum
of its elements and a second kernel adds a row's partials in a fixed order (deterministic) into
the running log-det; a row that fits in one program writes its log-det directly.
"""
import math
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.library import triton_op, wrap_triton

from ..ops._vmap import register_row_vmap
from ..reference.rq_spline import MIN_DERIVATIVE, MIN_HEIGHT, MIN_WIDTH, params_per_element
from ._common import logdet_dtype, on_input_device, register_interpreter_fakes, rows_cols

__all__ = ["rq_spline_fwd", "rq_spline_bwd"]

# The launchers' style arguments (min_width, min_height, min_derivative, exp_derivative, log_slope,
# learned_ends) of the default style, nflows' with linear tails: the kernels' results before
# styles existed, bit for bit.
DEFAULT_STYLE = (MIN_WIDTH, MIN_HEIGHT, MIN_DERIVATIVE, False, 0.0, False)

# Positions of the tensor arguments of the fwd / bwd ops, for their vmap rules.
FWD_TENSOR_ARGS = (0, 1, 6)
BWD_TENSOR_ARGS = (0, 1, 2, 3)

_MIN_BLOCK = 16
_MAX_BLOCK = 256
_TILE_BUDGET = 2048  # BLOCK * KP: the per-program parameter tile, kept in registers
_MAX_PROGRAMS_PER_ROW = 65535  # CUDA's limit on grid dim 1; longer rows loop


@triton.jit
def _softmax_tile(u, valid):
    """Row-wise softmax of a (BLOCK, KP) tile (fp32, or fp64 after the soft clamp), fp64 exps;
    padded columns get 0."""
    um = tl.where(valid, u, float("-inf"))
    mx = tl.max(um, axis=1)
    e = tl.where(valid, tl.exp(um.to(tl.float64) - mx.to(tl.float64)[:, None]), 0.0)
    inv_total = 1.0 / tl.sum(e, axis=1)
    return e * inv_total[:, None]


@triton.jit
def _right_knots(prob, cols, lo, hi, span, min_size, BINS: tl.constexpr):
    """(BLOCK, KP) fp64: column j holds knot j + 1, the right edge of bin j; column BINS - 1 is
    exactly hi, and knot 0 = lo is implicit. Interior knots are span cum + lo with span = hi - lo
    (fp64, as the reference's bin_edges; for [-B, B] the old 2B cum - B bit for bit). min_size is
    the fp64 runtime minimum."""
    sizes = min_size + (1.0 - min_size * BINS) * prob
    sizes = tl.where(cols < BINS, sizes, 0.0)
    cum = tl.cumsum(sizes, axis=1)
    return tl.where(cols < BINS - 1, span * cum + lo, hi)


@triton.jit
def _inside(xin, lo, hi):
    """lo <= x <= hi compared in the input's compute dtype, as the reference does (fp64 for
    fp64 inputs, else fp32 with the ends rounded to fp32; fp16/bf16 upcast exactly)."""
    if xin.dtype.is_fp64():
        xc = xin
        lo_c = tl.cast(lo, tl.float64)
        hi_c = tl.cast(hi, tl.float64)
    else:
        xc = xin.to(tl.float32)
        lo_c = tl.cast(lo, tl.float32)
        hi_c = tl.cast(hi, tl.float32)
    return (xc >= lo_c) & (xc <= hi_c)


@triton.jit
def _pick(tile, cols, j):
    """tile[i, j[i]] (0 where j[i] is no column): a one-hot masked sum, exact."""
    return tl.sum(tl.where(cols == j[:, None], tile, 0.0), axis=1)


@triton.jit
def _softplus(u):
    """torch's softplus (threshold 20) without log1p: log(1 + e) * e / ((1 + e) - 1) corrects the
    rounding of 1 + e, so small e keeps its relative accuracy."""
    e = tl.exp(tl.minimum(u, 20.0))
    one_e = 1.0 + e
    lp = tl.where(one_e == 1.0, e, tl.log(one_e) * (e / tl.where(one_e == 1.0, 1.0, one_e - 1.0)))
    return tl.where(u > 20.0, u, lp)


@triton.jit
def _clamp_tile(u, log_slope, TWO: tl.constexpr):
    """zuko's soft clamp of an fp32 tile in fp64, to the operation as the reference writes it:
    u / (1 + |2 u / l|) (TWO) or u / (1 + |u / l|), with (2 u) / l rounded as one division (2 u is
    exact). Returns (the clamped tile, fp64; its derivative 1 / (1 + |...|)^2, fp32)."""
    u64 = u.to(tl.float64)
    if TWO:
        den = 1.0 + tl.abs((2.0 * u64) / log_slope)
    else:
        den = 1.0 + tl.abs(u64 / log_slope)
    inv = 1.0 / den
    return u64 / den, (inv * inv).to(tl.float32)


@triton.jit
def _bin_terms(v64, params_ptr, pbase, mask, lo, hi, span, min_width, min_height, min_derivative, log_slope,
               BINS: tl.constexpr, INVERSE: tl.constexpr, EXP_D: tl.constexpr, CLAMP: tl.constexpr,
               LEARNED: tl.constexpr, KP: tl.constexpr, KDP: tl.constexpr):
    """The bin k of each v64 (on the x knots, or the y knots going back) and its terms:
    k; x_k, x_k+1, y_k, y_k+1 (fp64); d_k, d_k+1; the softmax probabilities of widths and heights
    (fp32 tiles); the derivative tile's d(d_min + f(u_c))/du, the chain of f' and the clamp's
    derivative (fp32); the column indices of the two tile widths; the clamp's derivative tiles
    of the width and height params (fp32; unused, the raw tiles, without CLAMP)."""
    cw = tl.arange(0, KP)[None, :]
    cd = tl.arange(0, KDP)[None, :]
    vw = mask[:, None] & (cw < BINS)
    vd = mask[:, None] & (cd < (BINS + 1 if LEARNED else BINS - 1))
    uw = tl.load(params_ptr + pbase[:, None] + cw, mask=vw, other=0.0).to(tl.float32)
    uh = tl.load(params_ptr + pbase[:, None] + BINS + cw, mask=vw, other=0.0).to(tl.float32)
    ud = tl.load(params_ptr + pbase[:, None] + 2 * BINS + cd, mask=vd, other=0.0).to(tl.float32)
    if CLAMP:
        # fp64 from the fp32 params: the clamped widths and heights are the float64 reference's
        # (padded columns are 0 and stay 0); the derivatives' are rounded to fp32 once.
        uw, fw = _clamp_tile(uw, log_slope, True)
        uh, fh = _clamp_tile(uh, log_slope, True)
        ud64, fd = _clamp_tile(ud, log_slope, False)
        ud = ud64.to(tl.float32)
    else:
        fw = uw
        fh = uh
    pw = _softmax_tile(uw, cw < BINS)
    ph = _softmax_tile(uh, cw < BINS)
    xr = _right_knots(pw, cw, lo, hi, span, min_width, BINS)
    yr = _right_knots(ph, cw, lo, hi, span, min_height, BINS)
    if INVERSE:
        search = yr
    else:
        search = xr
    # bin = number of interior knots <= v: a knot itself belongs to the bin on its right. The
    # knots are those of the float64 reference on the same (fp32) params to ~1e-16, so v takes
    # the float64 reference's bin, also within an fp32 ulp of a knot (where the log-det's
    # derivative jumps and a float32 knot's own rounding would decide the bin).
    hit = v64[:, None] >= search
    k = tl.sum(tl.where((cw < BINS - 1) & hit, 1, 0), axis=1)
    x_lo = tl.where(k == 0, lo, _pick(xr, cw, k - 1))
    x_hi = _pick(xr, cw, k)
    y_lo = tl.where(k == 0, lo, _pick(yr, cw, k - 1))
    y_hi = _pick(yr, cw, k)
    if EXP_D:
        e_d = tl.exp(ud)
        dtile = min_derivative + e_d
        dd_du = e_d  # d/du exp(u) = exp(u)
    else:
        dtile = min_derivative + _softplus(ud)
        dd_du = tl.sigmoid(ud)
    if CLAMP:
        dd_du = dd_du * fd
    if LEARNED:
        # tile column j holds d_j, j = 0..BINS: the bin's two slopes are columns k and k + 1
        d_lo = _pick(dtile, cd, k)
        d_hi = _pick(dtile, cd, k + 1)
    else:
        # column j holds d_{j+1} (the interior slopes); the end slopes are 1
        d_lo = tl.where(k == 0, 1.0, _pick(dtile, cd, k - 1))
        d_hi = tl.where(k == BINS - 1, 1.0, _pick(dtile, cd, k))
    return (k, x_lo, x_hi, y_lo, y_hi, d_lo, d_hi, pw.to(tl.float32), ph.to(tl.float32), dd_du, cw, cd,
            fw, fh)


@triton.jit
def _quadratic_root(rho, delta, d_lo, d_hi):
    """theta in [0, 1] with R(theta) = rho (R: the bin's normalised rational quadratic): the
    reference's quadratic and its cancellation-free root."""
    e = rho * (d_lo + d_hi - 2.0 * delta) - d_lo
    a = e + delta
    b = -e
    c = -delta * rho
    disc = b * b - 4.0 * a * c
    pos = disc > 0.0
    sq = tl.where(pos, tl.sqrt(tl.where(pos, disc, 1.0)), 0.0)
    use_c = b >= 0.0
    theta = tl.where(use_c, 2.0 * c, -b + sq) / tl.where(use_c, -b - sq, 2.0 * a)
    return tl.minimum(tl.maximum(theta, 0.0), 1.0)


@triton.jit
def _locate(v64, x_lo, x_hi, y_lo, y_hi, w, h, delta, d_lo, d_hi, INVERSE: tl.constexpr):
    """(theta, 1 - theta), each to its own relative accuracy: both come from fp64 distances to
    the two knots, so neither is the rounded complement of a number close to 1."""
    if INVERSE:
        # R is the same function seen from the other knot with d_lo and d_hi swapped, so the
        # root is taken from whichever end it is near.
        th_a = _quadratic_root((v64 - y_lo).to(tl.float32) / h, delta, d_lo, d_hi)
        om_b = _quadratic_root((y_hi - v64).to(tl.float32) / h, delta, d_hi, d_lo)
        near_lo = th_a <= 0.5
        theta = tl.where(near_lo, th_a, 1.0 - om_b)
        omt = tl.where(near_lo, 1.0 - th_a, om_b)
    else:
        # The fp64 search puts v between the two knots; the clamps are a safety net, since
        # outside [0, 1] the bin's terms (den, q) can change sign where the slopes are tiny.
        theta = tl.minimum(tl.maximum((v64 - x_lo).to(tl.float32) / w, 0.0), 1.0)
        omt = tl.minimum(tl.maximum((x_hi - v64).to(tl.float32) / w, 0.0), 1.0)
    return theta, omt


@triton.jit
def _log_slope(theta, omt, delta, d_lo, d_hi):
    t = theta * omt
    den = delta + (d_lo + d_hi - 2.0 * delta) * t
    num = delta * delta * (d_hi * (theta * theta) + 2.0 * delta * t + d_lo * (omt * omt))
    return tl.log(num) - 2.0 * tl.log(den)


@triton.jit
def _rq_spline_fwd_kernel(
    x_ptr,  # (B, N) contiguous input (x going forward, y going back); row stride is N
    params_ptr,  # (B, N, NP) contiguous, NP = 3 BINS - 1 (3 BINS + 1 if LEARNED); element e's at e * NP
    out_ptr,  # (B, N) output, x's dtype
    logdet_in_ptr,  # (B,) incoming log-det; a dummy never read unless HAS_LOGDET and DIRECT
    logdet_out_ptr,  # (B,) log-det output (fp32, or fp64 for fp64 inputs); written only if DIRECT
    partial_ptr,  # (B, P) fp32 partial log-det per program; a dummy when DIRECT
    N,  # elements per row, which is also the row stride of the contiguous (B, N) view
    P,  # programs per row (grid dim 1): program p handles blocks p, p + P, p + 2P, ...
    # The interval [lo, hi], fp64 runtime scalars (no recompile per value); hi - lo in fp64.
    lo: tl.float64,
    hi: tl.float64,
    # The knots' style, runtime scalars (no recompile per value): the minimal bin width and
    # height (fp64: they enter the fp64 knots), the minimal derivative (fp32, like the
    # derivatives), and l = log(slope) of zuko's soft clamp (fp64; read only with CLAMP).
    min_width: tl.float64,
    min_height: tl.float64,
    min_derivative: tl.float32,
    log_slope: tl.float64,
    BINS: tl.constexpr,
    INVERSE: tl.constexpr,
    EXP_D: tl.constexpr,  # interior derivatives d_min + exp(u) (else d_min + softplus(u))
    CLAMP: tl.constexpr,  # log_slope != 0: soft-clamp the raw params first
    LEARNED: tl.constexpr,  # learned end derivatives d_0, d_K (tails=None), else d_0 = d_K = 1
    HAS_LOGDET: tl.constexpr,
    DIRECT: tl.constexpr,  # P == 1: write the row's log-det here, no second kernel
    BLOCK: tl.constexpr,
    KP: tl.constexpr,  # next power of two >= BINS: width of the width/height tiles
    KDP: tl.constexpr,  # next power of two >= BINS + 1 (LEARNED) or BINS - 1 (>= 1): the derivative tile
):
    # int64 before the multiply: B * N * NP may exceed 2^31 even when N alone does not.
    row = tl.program_id(0).to(tl.int64)
    pid = tl.program_id(1)
    lanes = tl.arange(0, BLOCK)
    # Per-lane partial sums reduced once at the end: a fixed order, independent of scheduling.
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    span = hi - lo  # fp64
    for start in range(pid * BLOCK, N, P * BLOCK):
        offs = start + lanes
        mask = offs < N
        idx = row * N + offs
        xin = tl.load(x_ptr + idx, mask=mask, other=0.0)
        # Compared in the input's own dtype, as the reference does; outside elements take the
        # spline at lo so that their unused branch stays finite.
        inside = _inside(xin, lo, hi)
        v = tl.where(inside, xin.to(tl.float64), lo)
        pbase = idx * (3 * BINS + 1 if LEARNED else 3 * BINS - 1)
        k, x_lo, x_hi, y_lo, y_hi, d_lo, d_hi, _pw, _ph, _dd, _cw, _cd, _fw, _fh = _bin_terms(
            v, params_ptr, pbase, mask, lo, hi, span, min_width, min_height, min_derivative, log_slope,
            BINS, INVERSE, EXP_D, CLAMP, LEARNED, KP, KDP)
        w = (x_hi - x_lo).to(tl.float32)
        h = (y_hi - y_lo).to(tl.float32)
        delta = h / w
        theta, omt = _locate(v, x_lo, x_hi, y_lo, y_hi, w, h, delta, d_lo, d_hi, INVERSE)
        near_lo = theta <= 0.5
        if INVERSE:
            res = tl.where(near_lo, x_lo + (theta * w).to(tl.float64), x_hi - (omt * w).to(tl.float64))
            ls = -_log_slope(theta, omt, delta, d_lo, d_hi)
        else:
            # y_k + h R, or y_k+1 - h (1 - R) near the right knot: exact at both knots
            t = theta * omt
            den = delta + (d_lo + d_hi - 2.0 * delta) * t
            up = h * (delta * (theta * theta) + d_lo * t) / den
            down = h * (delta * (omt * omt) + d_hi * t) / den
            res = tl.where(near_lo, y_lo + up.to(tl.float64), y_hi - down.to(tl.float64))
            ls = _log_slope(theta, omt, delta, d_lo, d_hi)
        # Rounded to fp32 first, as the reference does for half inputs (and the interpreter
        # converts fp64 to bf16 wrongly). Outside, the identity: the input itself, exactly.
        if not out_ptr.dtype.element_ty.is_fp64():
            res = res.to(tl.float32)
        res = tl.where(inside, res.to(out_ptr.dtype.element_ty), xin.to(out_ptr.dtype.element_ty))
        tl.store(out_ptr + idx, res, mask=mask)
        acc += tl.where(mask & inside, ls, 0.0)
    ld = tl.sum(acc, axis=0)
    if DIRECT:
        ld = ld.to(logdet_out_ptr.dtype.element_ty)
        if HAS_LOGDET:
            # Added in the log-det's own dtype so an fp64 running total keeps its precision.
            ld = tl.load(logdet_in_ptr + row).to(logdet_out_ptr.dtype.element_ty) + ld
        tl.store(logdet_out_ptr + row, ld)
    else:
        tl.store(partial_ptr + row * P + pid, ld)


@triton.jit
def _rq_spline_logdet_kernel(
    partial_ptr,  # (B, P) fp32 partial sums of the forward kernel's programs; row stride is P
    logdet_in_ptr,  # (B,) incoming log-det; a dummy never read unless HAS_LOGDET
    logdet_out_ptr,  # (B,) log-det output (fp32, or fp64 for fp64 inputs)
    P,  # partials per row
    HAS_LOGDET: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_P)
    acc = tl.zeros([BLOCK_P], dtype=tl.float32)
    for start in range(0, P, BLOCK_P):
        offs = start + cols
        acc += tl.load(partial_ptr + row * P + offs, mask=offs < P, other=0.0)
    ld = tl.sum(acc, axis=0).to(logdet_out_ptr.dtype.element_ty)
    if HAS_LOGDET:
        ld = tl.load(logdet_in_ptr + row).to(logdet_out_ptr.dtype.element_ty) + ld
    tl.store(logdet_out_ptr + row, ld)


@triton.jit
def _size_grads(g_lo, g_hi, g_sum, k, prob, cols, scale, BINS: tl.constexpr):
    """dL/du (BLOCK, KP) of one softmax-sized knot set, from the gradients g_lo, g_hi on the bin's
    left and right knot and g_sum = g_lo + g_hi computed without cancellation (all times hi - lo);
    scale = 1 - K m, fp32.

    Knot j = lo + (hi - lo) sum_{i<j} size_i for interior j, so dL/dsize_i = al [i < k] + b [i == k]
    with b = g_hi and al = g_sum when knot k + 1 is interior, else b = 0 and al = g_lo. The
    softmax backward dL/dsize_j - sum_i dL/dsize_i prob_i is written with partial sums of prob
    on either side of k: no difference of nearly equal terms, neither when prob saturates nor
    when g_lo and g_hi nearly cancel (a narrow bin between two large knot gradients)."""
    right = k < BINS - 1
    b = tl.where(right, g_hi, 0.0)[:, None]
    al = tl.where(right, g_sum, g_lo)[:, None]
    a = g_lo[:, None]
    kk = k[:, None]
    below = tl.sum(tl.where(cols < kk, prob, 0.0), axis=1)[:, None]  # sum_{i<k} prob_i
    above = tl.sum(tl.where(cols > kk, prob, 0.0), axis=1)[:, None]  # sum_{i>k} prob_i
    p_k = tl.sum(tl.where(cols == kk, prob, 0.0), axis=1)[:, None]
    centred = tl.where(cols < kk, a * p_k + al * above,
                       tl.where(cols == kk, b * above - a * below, -(al * below + b * p_k)))
    return tl.where(cols < BINS, scale * prob * centred, 0.0)


@triton.jit
def _rq_spline_bwd_kernel(
    grad_out_ptr,  # (B, N) dL/d(out), contiguous; row stride is N
    grad_logdet_ptr,  # (B,) dL/d(logdet); a dummy never read unless HAS_GRAD_LOGDET
    x_in_ptr,  # (B, N) the op's input: x going forward, y going back
    params_ptr,  # (B, N, NP) contiguous, NP = 3 BINS - 1 (3 BINS + 1 if LEARNED); element e's at e * NP
    grad_in_ptr,  # (B, N) dL/d(x_in), x_in's dtype
    grad_params_ptr,  # (B, N, NP) dL/d(params), params' dtype
    N,  # elements per row, which is also the row stride of the contiguous (B, N) view
    P,  # programs per row (grid dim 1): program p handles blocks p, p + P, p + 2P, ...
    # The interval [lo, hi], fp64 runtime scalars (no recompile per value); hi - lo in fp64.
    lo: tl.float64,
    hi: tl.float64,
    # The knots' style, runtime scalars (no recompile per value): the minimal bin width and
    # height (fp64: they enter the fp64 knots), the minimal derivative (fp32, like the
    # derivatives), and l = log(slope) of zuko's soft clamp (fp64; read only with CLAMP).
    min_width: tl.float64,
    min_height: tl.float64,
    min_derivative: tl.float32,
    log_slope: tl.float64,
    BINS: tl.constexpr,
    INVERSE: tl.constexpr,
    EXP_D: tl.constexpr,  # interior derivatives d_min + exp(u) (else d_min + softplus(u))
    CLAMP: tl.constexpr,  # log_slope != 0: soft-clamp the raw params first
    LEARNED: tl.constexpr,  # learned end derivatives d_0, d_K (tails=None), else d_0 = d_K = 1
    HAS_GRAD_LOGDET: tl.constexpr,
    BLOCK: tl.constexpr,
    KP: tl.constexpr,  # next power of two >= BINS: width of the width/height tiles
    KDP: tl.constexpr,  # next power of two >= BINS + 1 (LEARNED) or BINS - 1 (>= 1): the derivative tile
):
    row = tl.program_id(0).to(tl.int64)
    pid = tl.program_id(1)
    lanes = tl.arange(0, BLOCK)
    # Every element of a row feeds the same log-det, so its gradient is one scalar per row.
    if HAS_GRAD_LOGDET:
        gld = tl.load(grad_logdet_ptr + row).to(tl.float32)
    else:
        gld = 0.0
    span = hi - lo  # fp64: it places the knots
    # The knot gradients' scale hi - lo, rounded once to fp32 (for [-B, B] the old 2B exactly)
    span32 = tl.cast(span, tl.float32)
    for start in range(pid * BLOCK, N, P * BLOCK):
        offs = start + lanes
        mask = offs < N
        idx = row * N + offs
        g = tl.load(grad_out_ptr + idx, mask=mask, other=0.0).to(tl.float32)
        xin = tl.load(x_in_ptr + idx, mask=mask, other=0.0)
        inside = _inside(xin, lo, hi)
        v = tl.where(inside, xin.to(tl.float64), lo)
        pbase = idx * (3 * BINS + 1 if LEARNED else 3 * BINS - 1)
        k, x_lo, x_hi, y_lo, y_hi, d0, d1, pw, ph, dd_du, cw, cd, fw, fh = _bin_terms(
            v, params_ptr, pbase, mask, lo, hi, span, min_width, min_height, min_derivative, log_slope,
            BINS, INVERSE, EXP_D, CLAMP, LEARNED, KP, KDP)
        w = (x_hi - x_lo).to(tl.float32)
        h = (y_hi - y_lo).to(tl.float32)
        s = h / w
        theta, omt = _locate(v, x_lo, x_hi, y_lo, y_hi, w, h, s, d0, d1, INVERSE)
        t = theta * omt
        th2 = theta * theta
        omt2 = omt * omt
        one_m_2th = omt - theta
        den = s + (d0 + d1 - 2.0 * s) * t
        inv_den = 1.0 / den
        inv_d2 = inv_den * inv_den
        q = d1 * th2 + 2.0 * s * t + d0 * omt2
        inv_q = 1.0 / q
        n_lo = s * th2 + d0 * t  # R = n_lo / den
        n_hi = s * omt2 + d1 * t  # 1 - R = n_hi / den, without the cancellation
        fx = s * s * q * inv_d2
        r_s = t * (d1 * th2 - d0 * omt2) * inv_d2
        r_d0 = t * n_hi * inv_d2
        r_d1 = -t * n_lo * inv_d2
        ld_th = 2.0 * (d1 * theta - d0 * omt + s * one_m_2th) * inv_q \
            - 2.0 * (d0 + d1 - 2.0 * s) * one_m_2th * inv_den
        ld_s = 2.0 * t * inv_q + 2.0 * (d0 + d1) * t / (s * den)
        two_t_den = 2.0 * t * inv_den
        ld_d0 = omt2 * inv_q - two_t_den
        ld_d1 = th2 * inv_q - two_t_den
        if INVERSE:
            big_g = (g - gld * (ld_th / w)) / fx
            gi = big_g
            gy = -big_g
            gl = -gld
            g_th = -g * w  # = gy W F_x + gl ld_theta, without the cancellation
        else:
            gi = g * fx + gld * (ld_th / w)
            gy = g
            gl = gld
            g_th = g * w * fx + gld * ld_th
        gi = tl.where(inside, gi, g)
        tl.store(grad_in_ptr + idx, gi.to(grad_in_ptr.dtype.element_ty), mask=mask)

        g_s = gy * h * r_s + gl * ld_s
        g_d0 = tl.where(inside, gy * h * r_d0 + gl * ld_d0, 0.0)
        g_d1 = tl.where(inside, gy * h * r_d1 + gl * ld_d1, 0.0)
        # Knot gradients times hi - lo; (hi - lo) / W = 1 / (the bin's share) never overflows,
        # for any interval.
        rw = span32 / w
        gx_lo = tl.where(inside, (g_s * s - g_th * omt) * rw, 0.0)
        gx_hi = tl.where(inside, -(g_th * theta + g_s * s) * rw, 0.0)
        gy_lo = tl.where(inside, gy * (n_hi * inv_den) * span32 - g_s * rw, 0.0)
        gy_hi = tl.where(inside, gy * (n_lo * inv_den) * span32 + g_s * rw, 0.0)
        # Moving both knots of the bin together: the sums of the pairs above, exactly
        # (theta + (1 - theta) = 1 and n_lo + n_hi = den), without their cancellation.
        gx_sum = tl.where(inside, -g_th * rw, 0.0)
        gy_sum = tl.where(inside, gy * span32, 0.0)

        # 1 - K m rounded once to fp32 (tl.cast also takes the interpreter's Python floats)
        gpw = _size_grads(gx_lo, gx_hi, gx_sum, k, pw, cw, tl.cast(1.0 - min_width * BINS, tl.float32), BINS)
        gph = _size_grads(gy_lo, gy_hi, gy_sum, k, ph, cw, tl.cast(1.0 - min_height * BINS, tl.float32), BINS)
        if CLAMP:
            # through the soft clamp: d u_c / du = 1 / (1 + |a u|)^2
            gpw = gpw * fw
            gph = gph * fh
        if LEARNED:
            kd = k  # d_k, d_k+1 at columns k, k + 1
        else:
            kd = k - 1  # d_k, d_k+1 at columns k - 1, k (d_0 = d_K = 1 have no column)
        gdd = tl.where(cd == kd[:, None], g_d0[:, None], 0.0) + tl.where(cd == (kd + 1)[:, None], g_d1[:, None], 0.0)
        gpd = gdd * dd_du  # times f'(u_c) (sigmoid or exp) and the clamp's derivative
        vw = mask[:, None] & (cw < BINS)
        vd = mask[:, None] & (cd < (BINS + 1 if LEARNED else BINS - 1))
        gp_ptr = grad_params_ptr + pbase[:, None]
        gty = grad_params_ptr.dtype.element_ty
        tl.store(gp_ptr + cw, gpw.to(gty), mask=vw)
        tl.store(gp_ptr + BINS + cw, gph.to(gty), mask=vw)
        tl.store(gp_ptr + 2 * BINS + cd, gpd.to(gty), mask=vd)


def _launch_config(cols: int, bins: int, learned_ends: bool = False) -> Tuple[int, int, int, int, int]:
    """(BLOCK, KP, KDP, programs per row, num_warps)."""
    kp = triton.next_power_of_2(bins)
    kdp = triton.next_power_of_2(bins + 1 if learned_ends else max(bins - 1, 1))
    # The three parameter tiles live in registers: cap BLOCK * KP rather than BLOCK alone (the
    # learned ends' derivative tile can be twice as wide: KDP then, which linear tails never reach).
    cap = max(_MIN_BLOCK, min(_MAX_BLOCK, _TILE_BUDGET // max(kp, kdp)))
    block = max(_MIN_BLOCK, min(triton.next_power_of_2(max(cols, 1)), cap))
    programs = min(triton.cdiv(cols, block), _MAX_PROGRAMS_PER_ROW)
    num_warps = max(1, min(8, block * kp // 256))
    return block, kp, kdp, programs, num_warps


def _check_style(bins: int, min_width: float, min_height: float, min_derivative: float, log_slope: float) -> None:
    # The kernels assume these (sizes >= 0 summing to at most the interval, d > 0 before any
    # rounding, l < 0 or no clamp); the op layer checks the user-facing options first.
    for name, m in (("min_width", min_width), ("min_height", min_height)):
        if not (0.0 <= m and m * bins <= 1.0):
            raise ValueError(f"{name} must be >= 0 with bins * {name} <= 1, got {m} for bins={bins}")
    if not (0.0 <= min_derivative < math.inf):
        raise ValueError(f"min_derivative must be finite and >= 0, got {min_derivative}")
    if not log_slope <= 0.0:
        raise ValueError(f"log_slope must be < 0 (0: no soft clamp), got {log_slope}")


def _check_interval(lo: float, hi: float) -> None:
    # The knots need a finite, non-empty interval (hi - lo finite too: it scales every knot).
    if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi and math.isfinite(hi - lo)):
        raise ValueError(f"the spline's interval needs finite lo < hi, got lo={lo}, hi={hi}")


def _check_shapes(x: Tensor, params: Tensor, bins: int, learned_ends: bool) -> None:
    # The kernels index params by x's element count: a mismatch would read out of bounds.
    if bins < 1:
        raise ValueError(f"bins must be >= 1, got {bins}")
    tails = None if learned_ends else "linear"
    expected = tuple(x.shape) + (params_per_element(bins, tails),)
    if tuple(params.shape) != expected:
        raise ValueError(f"params must have shape {expected} for bins={bins}, tails={tails!r}, "
                         f"got {tuple(params.shape)}")
    if not (x.is_contiguous() and params.is_contiguous()):
        raise ValueError("the Triton rq_spline kernels take contiguous x and params")


@triton_op("flowkern::rq_spline_fwd_triton", mutates_args=())
def _rq_spline_fwd_op(
    x: Tensor,
    params: Tensor,
    bins: int,
    lo: float,
    hi: float,
    inverse: bool,
    logdet: Optional[Tensor],
    min_width: float,
    min_height: float,
    min_derivative: float,
    exp_derivative: bool,
    log_slope: float,
    learned_ends: bool,
) -> Tuple[Tensor, Tensor]:
    _check_shapes(x, params, bins, learned_ends)
    _check_interval(lo, hi)
    _check_style(bins, min_width, min_height, min_derivative, log_slope)
    rows, cols = rows_cols(x)
    out = torch.empty_like(x)
    logdet_out = torch.empty((rows,), dtype=logdet_dtype(x.dtype), device=x.device)
    if rows == 0:
        return out, logdet_out
    if cols == 0:
        # Nothing to transform and an empty sum; also keeps zero-size buffers away from
        # the launcher, which may reject their null data pointers.
        if logdet is None:
            logdet_out.zero_()
        else:
            logdet_out.copy_(logdet)
        return out, logdet_out
    block, kp, kdp, programs, num_warps = _launch_config(cols, bins, learned_ends)
    direct = programs == 1
    partial = logdet_out if direct else torch.empty((rows, programs), dtype=torch.float32, device=x.device)
    wrap_triton(_rq_spline_fwd_kernel)[(rows, programs)](
        x,
        params,
        out,
        logdet if logdet is not None else logdet_out,
        logdet_out,
        partial,
        cols,
        programs,
        float(lo),
        float(hi),
        float(min_width),
        float(min_height),
        float(min_derivative),
        float(log_slope),
        BINS=int(bins),
        INVERSE=bool(inverse),
        EXP_D=bool(exp_derivative),
        CLAMP=log_slope != 0.0,
        LEARNED=bool(learned_ends),
        HAS_LOGDET=logdet is not None,
        DIRECT=direct,
        BLOCK=block,
        KP=kp,
        KDP=kdp,
        num_warps=num_warps,
    )
    if not direct:
        block_p = max(_MIN_BLOCK, min(triton.next_power_of_2(programs), 1024))
        wrap_triton(_rq_spline_logdet_kernel)[(rows,)](
            partial,
            logdet if logdet is not None else logdet_out,
            logdet_out,
            programs,
            HAS_LOGDET=logdet is not None,
            BLOCK_P=block_p,
            num_warps=1 if block_p <= 128 else 4,
        )
    return out, logdet_out


@triton_op("flowkern::rq_spline_bwd_triton", mutates_args=())
def _rq_spline_bwd_op(
    grad_out: Tensor,
    grad_logdet: Optional[Tensor],
    x_in: Tensor,
    params: Tensor,
    bins: int,
    lo: float,
    hi: float,
    inverse: bool,
    min_width: float,
    min_height: float,
    min_derivative: float,
    exp_derivative: bool,
    log_slope: float,
    learned_ends: bool,
) -> Tuple[Tensor, Tensor]:
    _check_shapes(x_in, params, bins, learned_ends)
    _check_interval(lo, hi)
    _check_style(bins, min_width, min_height, min_derivative, log_slope)
    if grad_out.shape != x_in.shape or (grad_logdet is not None and grad_logdet.shape != (x_in.shape[0],)):
        raise ValueError(f"grad_out must have x_in's shape {tuple(x_in.shape)} and grad_logdet shape "
                         f"({x_in.shape[0]},)")
    # Autograd often hands expanded (stride-0) gradients; the kernel reads dense rows.
    grad_out = grad_out.contiguous()
    grad_logdet = None if grad_logdet is None else grad_logdet.contiguous()
    rows, cols = rows_cols(x_in)
    grad_in = torch.empty_like(x_in)
    grad_params = torch.empty_like(params)
    if rows == 0 or cols == 0:
        return grad_in, grad_params
    block, kp, kdp, programs, num_warps = _launch_config(cols, bins, learned_ends)
    wrap_triton(_rq_spline_bwd_kernel)[(rows, programs)](
        grad_out,
        grad_logdet if grad_logdet is not None else grad_out,
        x_in,
        params,
        grad_in,
        grad_params,
        cols,
        programs,
        float(lo),
        float(hi),
        float(min_width),
        float(min_height),
        float(min_derivative),
        float(log_slope),
        BINS=int(bins),
        INVERSE=bool(inverse),
        EXP_D=bool(exp_derivative),
        CLAMP=log_slope != 0.0,
        LEARNED=bool(learned_ends),
        HAS_GRAD_LOGDET=grad_logdet is not None,
        BLOCK=block,
        KP=kp,
        KDP=kdp,
        num_warps=num_warps,
    )
    return grad_in, grad_params


# Shape-only fakes, needed only when the kernels are interpreted (see _common).
def _rq_spline_fwd_fake(x, params, bins, lo, hi, inverse, logdet, min_width, min_height, min_derivative,
                        exp_derivative, log_slope, learned_ends):
    return torch.empty_like(x), x.new_empty((x.shape[0],), dtype=logdet_dtype(x.dtype))


def _rq_spline_bwd_fake(grad_out, grad_logdet, x_in, params, bins, lo, hi, inverse, min_width, min_height,
                        min_derivative, exp_derivative, log_slope, learned_ends):
    return torch.empty_like(x_in), torch.empty_like(params)


register_interpreter_fakes(_rq_spline_fwd_kernel, [(_rq_spline_fwd_op, _rq_spline_fwd_fake),
                                                    (_rq_spline_bwd_op, _rq_spline_bwd_fake)])

register_row_vmap("flowkern::rq_spline_fwd_triton", FWD_TENSOR_ARGS)
register_row_vmap("flowkern::rq_spline_bwd_triton", BWD_TENSOR_ARGS)


@on_input_device
def rq_spline_fwd(
    x: Tensor,
    params: Tensor,
    bins: int,
    lo: float,
    hi: float,
    inverse: bool,
    logdet: Optional[Tensor],
    min_width: float,
    min_height: float,
    min_derivative: float,
    exp_derivative: bool,
    log_slope: float,
    learned_ends: bool,
) -> Tuple[Tensor, Tensor]:
    """Returns (out like x, logdet of shape (B,), float32 or float64 for float64 x): the spline
    on [lo, hi] (inverse=True: its inverse) of contiguous x with contiguous params
    x.shape + (params_per_element(bins, tails),), its log-det summed per row and added to
    `logdet` when given.

    The knots' style (flowkern.reference.rq_spline's keywords): min_width, min_height,
    min_derivative; exp_derivative (derivative="exp", else "softplus"); log_slope = log(slope)
    < 0 of zuko's soft clamp, 0.0 for none (slope=None); learned_ends (tails=None: 3 bins + 1
    params, the end slopes learned; else tails="linear", 3 bins - 1). DEFAULT_STYLE is nflows'."""
    return torch.ops.flowkern.rq_spline_fwd_triton(
        x, params, int(bins), float(lo), float(hi), bool(inverse), logdet,
        float(min_width), float(min_height), float(min_derivative), bool(exp_derivative), float(log_slope),
        bool(learned_ends),
    )


@on_input_device
def rq_spline_bwd(
    grad_out: Tensor,
    grad_logdet: Optional[Tensor],
    x_in: Tensor,
    params: Tensor,
    bins: int,
    lo: float,
    hi: float,
    inverse: bool,
    min_width: float,
    min_height: float,
    min_derivative: float,
    exp_derivative: bool,
    log_slope: float,
    learned_ends: bool,
) -> Tuple[Tensor, Tensor]:
    """Returns (grad_x_in like x_in, grad_params like params) from dL/d(out) and dL/d(logdet)
    (None: zero); x_in is the op's input (x going forward, y going back); the style arguments as
    rq_spline_fwd's. The gradient of the incoming running log-det is grad_logdet itself, left to
    the caller."""
    return torch.ops.flowkern.rq_spline_bwd_triton(
        grad_out, grad_logdet, x_in, params, int(bins), float(lo), float(hi), bool(inverse),
        float(min_width), float(min_height), float(min_derivative), bool(exp_derivative), float(log_slope),
        bool(learned_ends),
    )
