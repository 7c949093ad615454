"""Triton kernels for the affine coupling transform (forward/inverse and its backward).

A restatement of flowkern/reference/affine_coupling.py (the ground truth) and of
csrc/math/affine_coupling.h, one program per batch row so that each row's
log-determinant is reduced in registers and written once (deterministic, no atomics).

With s = raw scale, t = shift, m = scale factor, c = clamp, mode 0-4 = exp/sigmoid/tanh/softplus/rational:

    exp:     log m = s,                   m = exp(s)         dlogm/ds = 1
    sigmoid: sg = sigmoid(s + 2),         m = sg + 1e-3,     log m = log(m)
                                                             dlogm/ds = sg (1 - sg) / m
    tanh:    th = tanh(s / c),            log m = c th,      m = exp(log m)
                                                             dlogm/ds = 1 - th^2
    softplus: m = softplus(s) + 1e-3,     log m = log(m),    dlogm/ds = sigmoid(s) / m
    rational: log m = s / (1 + |s / c|),  m = exp(log m),    dlogm/ds = 1 / (1 + |s / c|)^2

    forward (inverse=False): out = x m + t        logdet = logdet_in + sum_row log m
    inverse (inverse=True):  out = (x - t) / m    logdet = logdet_in - sum_row log m

Backward, with g = dL/d(out), gld = dL/d(logdet) of the row (0 when absent) and `saved`
the forward's input x or the inverse's output:

    forward: grad_in = g m,     grad_s = (g saved m + gld) dlogm/ds
    inverse: grad_in = g / m,   grad_s = -(g saved + gld) dlogm/ds

grad_shift (g, or -g/m) is left to the caller, which already has both pieces.
Arithmetic is fp32 for every input dtype (fp16/bf16 upcast on load, fp64 accepted at
fp32 precision); the log-det is float32, or float64 for float64 inputs.
"""
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.library import triton_op, wrap_triton

from ..ops._vmap import register_row_vmap
from ..ops.affine_coupling import BWD_TENSOR_ARGS, FWD_TENSOR_ARGS, check_factor
from ._common import logdet_dtype, on_input_device, register_interpreter_fakes, rows_cols

__all__ = ["affine_coupling_fwd", "affine_coupling_bwd", "affine_coupling_merge_fwd", "affine_coupling_merge_bwd",
           "affine_coupling_merge_bwd_out"]

MODE_EXP = 0
MODE_SIGMOID = 1
MODE_TANH = 2
MODE_SOFTPLUS = 3
MODE_RATIONAL = 4

_MAX_BLOCK = 1024
_MIN_BLOCK = 16


@triton.jit
def _tanh_parts(u):
    """tanh(u) and 1 - tanh(u)^2, finite for every finite u (no libdevice tanh here)."""
    a = tl.abs(u)
    # exp of a non-positive argument never overflows, so huge |u| gives th = +-1 exactly
    # instead of inf/inf = NaN.
    e = tl.exp(-2.0 * a)
    big = (1.0 - e) / (1.0 + e)
    # 1 - th^2 written without the subtraction, which would cancel to a few correct bits
    # once |th| is close to 1 (the gradient would lose its relative accuracy).
    big_d = 4.0 * e / ((1.0 + e) * (1.0 + e))
    # Near 0, 1 - e cancels; the odd series through u^9 is accurate to ~1e-8 relative for
    # |u| < 0.25. The input is zeroed outside that range so the unused branch cannot overflow.
    small = a < 0.25
    us = tl.where(small, u, 0.0)
    u2 = us * us
    poly = us * (1.0 + u2 * (-0.3333333333333333 + u2 * (0.13333333333333333
                 + u2 * (-0.05396825396825397 + u2 * 0.021869488536155203))))
    th = tl.where(small, poly, tl.where(u < 0.0, -big, big))
    d = tl.where(small, 1.0 - poly * poly, big_d)
    return th, d


@triton.jit
def _scale_terms(s, clamp, MODE: tl.constexpr):
    """(log m, m, 1/m, dlogm/ds) for fp32 s; unused results are dead code after compilation."""
    if MODE == 0:
        logm = s
        m = tl.exp(s)
        # exp(-s) rather than 1/exp(s): stays finite when exp(s) overflows.
        inv_m = tl.exp(-s)
        dlogm = tl.full(s.shape, 1.0, tl.float32)
    elif MODE == 1:
        a = s + 2.0
        sg = tl.sigmoid(a)
        # sigmoid(-a) is 1 - sg without cancellation when sg is near 1.
        sgc = tl.sigmoid(-a)
        m = sg + 1e-3
        logm = tl.log(m)
        inv_m = 1.0 / m
        dlogm = sg * sgc / m
    elif MODE == 2:
        th, dth = _tanh_parts(s / clamp)
        logm = clamp * th
        m = tl.exp(logm)
        inv_m = tl.exp(-logm)
        dlogm = dth
    elif MODE == 3:
        # torch's softplus (s itself above 20); log1p(z) as log(1 + z) z / ((1 + z) - 1), exact
        # to fp32 rounding for tiny z where log(1 + z) alone would round to 0 (no libdevice).
        z = tl.exp(tl.minimum(s, 20.0))
        u = 1.0 + z
        lp = tl.where(u == 1.0, z, tl.log(u) * (z / (u - 1.0)))
        linear = s > 20.0
        m = tl.where(linear, s, lp) + 1e-3
        logm = tl.log(m)
        inv_m = 1.0 / m
        dlogm = tl.where(linear, 1.0, tl.sigmoid(s)) / m
    else:
        den = 1.0 + tl.abs(s / clamp)
        logm = s / den
        m = tl.exp(logm)
        inv_m = tl.exp(-logm)
        dlogm = 1.0 / (den * den)
    return logm, m, inv_m, dlogm


@triton.jit
def _terms_from_factor(f, clamp, MODE: tl.constexpr, INVERSE: tl.constexpr):
    """(m, 1/m, dlogm/ds) from the factor the forward saved (m, or 1/m going back)."""
    if INVERSE:
        inv_m = f
        m = 1.0 / f
    else:
        m = f
        inv_m = 1.0 / f
    if MODE == 0:
        dlogm = tl.full(f.shape, 1.0, tl.float32)
    elif MODE == 1:
        sg = m - 1e-3
        dlogm = sg * (1.0 - sg) / m
    else:  # tanh (softplus and rational save no factor: check_factor)
        th = tl.log(f) / clamp  # +-tanh(s / c); the sign does not matter below
        dlogm = 1.0 - th * th
    return m, inv_m, dlogm


@triton.jit
def _affine_coupling_fwd_kernel(
    x_ptr,  # (B, N) input rows, row stride x_rs
    shift_ptr,  # (B, N) t, row stride t_rs
    scale_ptr,  # (B, N) raw scale s, row stride s_rs
    out_ptr,  # output rows (row stride out_rs), the transformed part at column moved_at
    factor_out_ptr,  # (B, N) contiguous saved factor (m, or 1/m going back); a dummy unless SAVE_FACTOR
    logdet_in_ptr,  # (B,) incoming log-det; a dummy never read when HAS_LOGDET is False
    logdet_out_ptr,  # (B,) fresh log-det output (fp32, or fp64 for fp64 inputs)
    kept_ptr,  # (B, K) rows copied into out at column kept_at when HAS_KEPT (the merge); else a dummy
    N,  # elements per row
    x_rs, t_rs, s_rs, out_rs, moved_at,
    K, kept_rs, kept_at,
    clamp,  # runtime float so that changing it does not trigger a recompile
    MODE: tl.constexpr,
    INVERSE: tl.constexpr,
    HAS_LOGDET: tl.constexpr,
    SAVE_FACTOR: tl.constexpr,
    HAS_KEPT: tl.constexpr,
    BLOCK: tl.constexpr,
):
    # int64 before the multiplies: B * N may exceed 2^31 even when N alone does not.
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    out_row = out_ptr + row * out_rs
    if HAS_KEPT:
        for start in range(0, K, BLOCK):
            offs = start + cols
            mask = offs < K
            v = tl.load(kept_ptr + row * kept_rs + offs, mask=mask, other=0.0)
            tl.store(out_row + kept_at + offs, v, mask=mask)
    # Per-lane partial sums, reduced once at the end: a fixed summation order per BLOCK,
    # so the result does not depend on scheduling.
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, N, BLOCK):
        offs = start + cols
        mask = offs < N
        x = tl.load(x_ptr + row * x_rs + offs, mask=mask, other=0.0).to(tl.float32)
        t = tl.load(shift_ptr + row * t_rs + offs, mask=mask, other=0.0).to(tl.float32)
        s = tl.load(scale_ptr + row * s_rs + offs, mask=mask, other=0.0).to(tl.float32)
        logm, m, inv_m, _dlogm = _scale_terms(s, clamp, MODE)
        if INVERSE:
            y = (x - t) * inv_m
            factor = inv_m
        else:
            y = x * m + t
            factor = m
        tl.store(out_row + moved_at + offs, y.to(out_ptr.dtype.element_ty), mask=mask)
        if SAVE_FACTOR:
            tl.store(factor_out_ptr + row * N + offs, factor.to(factor_out_ptr.dtype.element_ty), mask=mask)
        # Masked lanes hold log m of s = 0, which is not 0 for sigmoid/tanh modes.
        acc += tl.where(mask, logm, 0.0)
    ld = tl.sum(acc, axis=0)
    if INVERSE:
        ld = -ld
    ld = ld.to(logdet_out_ptr.dtype.element_ty)
    if HAS_LOGDET:
        # Added in the log-det's own dtype so an fp64 running total keeps its precision.
        ld = tl.load(logdet_in_ptr + row).to(logdet_out_ptr.dtype.element_ty) + ld
    tl.store(logdet_out_ptr + row, ld)


@triton.jit
def _affine_coupling_bwd_kernel(
    grad_out_ptr,  # (B, N) dL/d(out), row stride g_rs
    grad_logdet_ptr,  # (B,) dL/d(logdet); a dummy never read when HAS_GRAD_LOGDET is False
    saved_ptr,  # (B, N) forward input x (forward) or inverse output (inverse), row stride saved_rs
    scale_ptr,  # (B, N) raw scale s, or the forward's saved factor when FROM_FACTOR; row stride s_rs
    grad_in_ptr,  # (B, N) contiguous dL/d(input), saved's dtype
    grad_scale_ptr,  # (B, N) dL/ds, row stride gs_rs
    grad_shift_ptr,  # (B, N) dL/dt (g, or -g/m going back), row stride gt_rs, when HAS_GRAD_SHIFT
    t_ptr,  # (B, N) the shift, row stride t_rs, when FROM_OUTPUT
    input_ptr,  # (B, N) contiguous: the op's input rebuilt from its output, when FROM_OUTPUT
    N,  # elements per row
    g_rs, saved_rs, s_rs, gs_rs, gt_rs, t_rs,
    clamp,  # runtime float so that changing it does not trigger a recompile
    MODE: tl.constexpr,
    INVERSE: tl.constexpr,
    HAS_GRAD_LOGDET: tl.constexpr,
    FROM_FACTOR: tl.constexpr,
    HAS_GRAD_SHIFT: tl.constexpr,
    FROM_OUTPUT: tl.constexpr,  # saved is the op's output; rebuild the input (raw scale in s)
    BLOCK: tl.constexpr,
):
    # int64 before the multiplies: B * N may exceed 2^31 even when N alone does not.
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    # Every element of a row feeds the same log-det, so its gradient is one scalar per row.
    if HAS_GRAD_LOGDET:
        gld = tl.load(grad_logdet_ptr + row).to(tl.float32)
    else:
        gld = 0.0
    for start in range(0, N, BLOCK):
        offs = start + cols
        mask = offs < N
        g = tl.load(grad_out_ptr + row * g_rs + offs, mask=mask, other=0.0).to(tl.float32)
        v = tl.load(saved_ptr + row * saved_rs + offs, mask=mask, other=0.0).to(tl.float32)
        s = tl.load(scale_ptr + row * s_rs + offs, mask=mask, other=0.0).to(tl.float32)
        if FROM_FACTOR:
            m, inv_m, dlogm = _terms_from_factor(s, clamp, MODE, INVERSE)
        else:
            _logm, m, inv_m, dlogm = _scale_terms(s, clamp, MODE)
        if FROM_OUTPUT:
            # v is the output: the input is y = v m + t going back, x = (v - t) / m going forward,
            # and g x m = g (v - t) (csrc/math/affine_coupling.h, affine_backward_from_output).
            t = tl.load(t_ptr + row * t_rs + offs, mask=mask, other=0.0).to(tl.float32)
            d = v - t
            if INVERSE:
                rebuilt = v * m + t
            else:
                rebuilt = d * inv_m
            tl.store(input_ptr + row * N + offs, rebuilt.to(input_ptr.dtype.element_ty), mask=mask)
        if INVERSE:
            # d(out)/d(log m) = -out, and out is exactly what was saved.
            gi = g * inv_m
            gs = -(g * v + gld) * dlogm
            gt = -gi
        else:
            gi = g * m
            if FROM_OUTPUT:
                gs = (g * d + gld) * dlogm
            else:
                gs = (g * v * m + gld) * dlogm
            gt = g
        tl.store(grad_in_ptr + row * N + offs, gi.to(grad_in_ptr.dtype.element_ty), mask=mask)
        tl.store(grad_scale_ptr + row * gs_rs + offs, gs.to(grad_scale_ptr.dtype.element_ty), mask=mask)
        if HAS_GRAD_SHIFT:
            tl.store(grad_shift_ptr + row * gt_rs + offs, gt.to(grad_shift_ptr.dtype.element_ty), mask=mask)


def _block_for(cols: int) -> Tuple[int, int]:
    block = max(_MIN_BLOCK, min(triton.next_power_of_2(max(cols, 1)), _MAX_BLOCK))
    # One warp covers 32 lanes; more warps than BLOCK/128 would mostly idle on short rows.
    num_warps = 4 if block >= 512 else (2 if block >= 256 else 1)
    return block, num_warps


def _launch_fwd(x, shift, scale_raw, out, factor, logdet, logdet_out, *, rows, n, strides, moved_at, mode, clamp,
                inverse, kept=None, kept_rs=0, k=0, kept_at=0):
    """The forward kernel over `rows` rows of n elements; strides = the row strides of (x, shift,
    scale_raw, out). factor: the saved factor's buffer, or None; kept: rows copied into out at
    kept_at (the merge), or None."""
    check_factor(mode, factor is not None)
    block, num_warps = _block_for(max(n, k))
    x_rs, t_rs, s_rs, out_rs = strides
    wrap_triton(_affine_coupling_fwd_kernel)[(rows,)](
        x, shift, scale_raw, out,
        factor if factor is not None else out,
        logdet if logdet is not None else logdet_out,
        logdet_out,
        kept if kept is not None else x,
        n, x_rs, t_rs, s_rs, out_rs, moved_at, k, kept_rs, kept_at,
        float(clamp),
        MODE=int(mode), INVERSE=bool(inverse), HAS_LOGDET=logdet is not None, SAVE_FACTOR=factor is not None,
        HAS_KEPT=kept is not None, BLOCK=block, num_warps=num_warps,
    )


def _launch_bwd(grad_out, grad_logdet, saved, scale_or_factor, grad_in, grad_scale, *, rows, n, strides, mode, clamp,
                inverse, is_factor, grad_shift=None, grad_shift_rs=0, shift=None, shift_rs=0, rebuilt=None):
    """The backward kernel; strides = the row strides of (grad_out, saved, scale_or_factor,
    grad_scale); grad_in is contiguous; grad_shift, when given, receives dL/dt. With `rebuilt`
    (contiguous), saved is the op's output and shift its shift: the input is rebuilt there."""
    check_factor(mode, is_factor)
    block, num_warps = _block_for(n)
    g_rs, saved_rs, s_rs, gs_rs = strides
    wrap_triton(_affine_coupling_bwd_kernel)[(rows,)](
        grad_out,
        grad_logdet if grad_logdet is not None else grad_out,
        saved, scale_or_factor, grad_in, grad_scale,
        grad_shift if grad_shift is not None else grad_scale,
        shift if shift is not None else grad_scale,
        rebuilt if rebuilt is not None else grad_scale,
        n, g_rs, saved_rs, s_rs, gs_rs, grad_shift_rs, shift_rs,
        float(clamp),
        MODE=int(mode), INVERSE=bool(inverse), HAS_GRAD_LOGDET=grad_logdet is not None,
        FROM_FACTOR=bool(is_factor), HAS_GRAD_SHIFT=grad_shift is not None, FROM_OUTPUT=rebuilt is not None,
        BLOCK=block, num_warps=num_warps,
    )


@triton_op("flowkern::affine_coupling_fwd_triton", mutates_args=())
def _affine_coupling_fwd_op(
    x: Tensor,
    shift: Tensor,
    scale_raw: Tensor,
    mode: int,
    clamp: float,
    inverse: bool,
    logdet: Optional[Tensor],
    save_factor: bool,
) -> Tuple[Tensor, Tensor, Tensor]:
    rows, cols = rows_cols(x)
    ld_dtype = logdet_dtype(x.dtype)
    out = torch.empty_like(x)
    factor = torch.empty_like(x) if save_factor else x.new_empty((0,))
    logdet_out = torch.empty((rows,), dtype=ld_dtype, device=x.device)
    if rows == 0:
        return out, logdet_out, factor
    if cols == 0:
        # Nothing to transform and an empty sum; also keeps zero-size buffers away from
        # the launcher, which may reject their null data pointers.
        if logdet is None:
            logdet_out.zero_()
        else:
            logdet_out.copy_(logdet)
        return out, logdet_out, factor
    _launch_fwd(x, shift, scale_raw, out, factor if save_factor else None, logdet, logdet_out, rows=rows, n=cols,
                strides=(cols,) * 4, moved_at=0, mode=mode, clamp=clamp, inverse=inverse)
    return out, logdet_out, factor


@triton_op("flowkern::affine_coupling_bwd_triton", mutates_args=())
def _affine_coupling_bwd_op(
    grad_out: Tensor,
    grad_logdet: Optional[Tensor],
    saved: Tensor,
    scale_or_factor: Tensor,
    is_factor: bool,
    mode: int,
    clamp: float,
    inverse: bool,
) -> Tuple[Tensor, Tensor]:
    rows, cols = rows_cols(saved)
    grad_in = torch.empty_like(saved)
    grad_scale = torch.empty_like(saved)
    if rows == 0 or cols == 0:
        return grad_in, grad_scale
    _launch_bwd(grad_out, grad_logdet, saved, scale_or_factor, grad_in, grad_scale, rows=rows, n=cols,
                strides=(cols,) * 4, mode=mode, clamp=clamp, inverse=inverse, is_factor=is_factor)
    return grad_in, grad_scale


@triton_op("flowkern::affine_coupling_merge_fwd_triton", mutates_args=())
def _affine_coupling_merge_fwd_op(
    kept: Tensor,
    x: Tensor,
    params: Tensor,
    mode: int,
    clamp: float,
    inverse: bool,
    logdet: Optional[Tensor],
    save_factor: bool,
    kept_first: bool,
) -> Tuple[Tensor, Tensor, Tensor]:
    rows, n = x.shape
    k = kept.shape[1]
    out = x.new_empty((rows, k + n))
    factor = x.new_empty((rows, n)) if save_factor else x.new_empty((0,))
    logdet_out = torch.empty((rows,), dtype=logdet_dtype(x.dtype), device=x.device)
    if rows == 0:
        return out, logdet_out, factor
    if n == 0:  # nothing to transform: out is kept, the log-det the incoming one
        out.copy_(kept)
        if logdet is None:
            logdet_out.zero_()
        else:
            logdet_out.copy_(logdet)
        return out, logdet_out, factor
    _launch_fwd(x, params, params[:, n:], out, factor if save_factor else None, logdet, logdet_out, rows=rows, n=n,
                strides=(x.stride(0), params.stride(0), params.stride(0), k + n), moved_at=k if kept_first else 0,
                mode=mode, clamp=clamp, inverse=inverse, kept=kept, kept_rs=kept.stride(0), k=k,
                kept_at=0 if kept_first else n)
    return out, logdet_out, factor


@triton_op("flowkern::affine_coupling_merge_bwd_triton", mutates_args=())
def _affine_coupling_merge_bwd_op(
    grad_out: Tensor,
    grad_logdet: Optional[Tensor],
    saved: Tensor,
    scale_or_factor: Tensor,
    is_factor: bool,
    mode: int,
    clamp: float,
    inverse: bool,
    kept_first: bool,
) -> Tuple[Tensor, Tensor]:
    rows, n = saved.shape
    k = grad_out.shape[1] - n
    grad_x = saved.new_empty((rows, n))
    grad_params = saved.new_empty((rows, 2 * n))
    if rows == 0 or n == 0:
        return grad_x, grad_params
    _launch_bwd(grad_out[:, k:] if kept_first else grad_out, grad_logdet, saved, scale_or_factor, grad_x,
                grad_params[:, n:], rows=rows, n=n,
                strides=(grad_out.stride(0), saved.stride(0), scale_or_factor.stride(0), 2 * n), mode=mode,
                clamp=clamp, inverse=inverse, is_factor=is_factor, grad_shift=grad_params, grad_shift_rs=2 * n)
    return grad_x, grad_params


@triton_op("flowkern::affine_coupling_merge_bwd_out_triton", mutates_args=())
def _affine_coupling_merge_bwd_out_op(
    grad_out: Tensor,
    grad_logdet: Optional[Tensor],
    out: Tensor,
    params: Tensor,
    mode: int,
    clamp: float,
    inverse: bool,
    kept_first: bool,
) -> Tuple[Tensor, Tensor, Tensor]:
    rows = out.shape[0]
    n = params.shape[1] // 2
    k = out.shape[1] - n
    rebuilt, grad_x, grad_params = out.new_empty((rows, n)), out.new_empty((rows, n)), out.new_empty((rows, 2 * n))
    if rows == 0 or n == 0:
        return rebuilt, grad_x, grad_params
    at = k if kept_first else 0
    _launch_bwd(grad_out[:, at:], grad_logdet, out[:, at:], params[:, n:], grad_x, grad_params[:, n:], rows=rows, n=n,
                strides=(grad_out.stride(0), out.stride(0), params.stride(0), 2 * n), mode=mode, clamp=clamp,
                inverse=inverse, is_factor=False, grad_shift=grad_params, grad_shift_rs=2 * n, shift=params,
                shift_rs=params.stride(0), rebuilt=rebuilt)
    return rebuilt, grad_x, grad_params


# Shape-only fakes, needed only when the kernels are interpreted (see _common).
def _affine_coupling_fwd_fake(x, shift, scale_raw, mode, clamp, inverse, logdet, save_factor):
    factor = torch.empty_like(x) if save_factor else x.new_empty((0,))
    return torch.empty_like(x), x.new_empty((x.shape[0],), dtype=logdet_dtype(x.dtype)), factor


def _affine_coupling_bwd_fake(grad_out, grad_logdet, saved, scale_or_factor, is_factor, mode, clamp, inverse):
    return torch.empty_like(saved), torch.empty_like(saved)


def _affine_coupling_merge_fwd_fake(kept, x, params, mode, clamp, inverse, logdet, save_factor, kept_first):
    factor = x.new_empty(x.shape) if save_factor else x.new_empty((0,))
    return (x.new_empty((x.shape[0], kept.shape[1] + x.shape[1])),
            x.new_empty((x.shape[0],), dtype=logdet_dtype(x.dtype)), factor)


def _affine_coupling_merge_bwd_fake(grad_out, grad_logdet, saved, scale_or_factor, is_factor, mode, clamp, inverse,
                                    kept_first):
    return saved.new_empty(saved.shape), saved.new_empty((saved.shape[0], 2 * saved.shape[1]))


def _affine_coupling_merge_bwd_out_fake(grad_out, grad_logdet, out, params, mode, clamp, inverse, kept_first):
    n = params.shape[1] // 2
    return out.new_empty((out.shape[0], n)), out.new_empty((out.shape[0], n)), params.new_empty(params.shape)


register_interpreter_fakes(_affine_coupling_fwd_kernel, [
    (_affine_coupling_fwd_op, _affine_coupling_fwd_fake), (_affine_coupling_bwd_op, _affine_coupling_bwd_fake),
    (_affine_coupling_merge_fwd_op, _affine_coupling_merge_fwd_fake),
    (_affine_coupling_merge_bwd_op, _affine_coupling_merge_bwd_fake),
    (_affine_coupling_merge_bwd_out_op, _affine_coupling_merge_bwd_out_fake)])

register_row_vmap("flowkern::affine_coupling_fwd_triton", FWD_TENSOR_ARGS)
register_row_vmap("flowkern::affine_coupling_bwd_triton", BWD_TENSOR_ARGS)


@on_input_device
def affine_coupling_fwd(
    x: Tensor,
    shift: Tensor,
    scale_raw: Tensor,
    mode: int,
    clamp: float,
    inverse: bool,
    logdet: Optional[Tensor],
    save_factor: bool = False,
) -> Tuple[Tensor, Tensor, Tensor]:
    """Returns (out like x, logdet of shape (B,), float32 or float64 for float64 x, factor:
    m or 1/m like x when save_factor, else empty)."""
    return torch.ops.flowkern.affine_coupling_fwd_triton(
        x, shift, scale_raw, int(mode), float(clamp), bool(inverse), logdet, bool(save_factor)
    )


@on_input_device
def affine_coupling_bwd(
    grad_out: Tensor,
    grad_logdet: Optional[Tensor],
    saved: Tensor,
    scale_or_factor: Tensor,
    is_factor: bool,
    mode: int,
    clamp: float,
    inverse: bool,
) -> Tuple[Tensor, Tensor]:
    """Returns (grad_in, grad_scale_raw), both like `saved`; grad_shift is the caller's."""
    return torch.ops.flowkern.affine_coupling_bwd_triton(
        grad_out, grad_logdet, saved, scale_or_factor, bool(is_factor), int(mode), float(clamp), bool(inverse)
    )


@on_input_device
def affine_coupling_merge_fwd(kept: Tensor, x: Tensor, params: Tensor, mode: int, clamp: float, inverse: bool,
                              logdet: Optional[Tensor], save_factor: bool, kept_first: bool) -> Tuple[Tensor, Tensor, Tensor]:
    """The coupling layer's transform and merge: (out (B, k + n), logdet, factor)."""
    return torch.ops.flowkern.affine_coupling_merge_fwd_triton(
        kept, x, params, int(mode), float(clamp), bool(inverse), logdet, bool(save_factor), bool(kept_first))


@on_input_device
def affine_coupling_merge_bwd(grad_out: Tensor, grad_logdet: Optional[Tensor], saved: Tensor, scale_or_factor: Tensor,
                              is_factor: bool, mode: int, clamp: float, inverse: bool,
                              kept_first: bool) -> Tuple[Tensor, Tensor]:
    """Returns (grad_x (B, n), grad_params (B, 2n) = [grad shift | grad raw scale])."""
    return torch.ops.flowkern.affine_coupling_merge_bwd_triton(
        grad_out, grad_logdet, saved, scale_or_factor, bool(is_factor), int(mode), float(clamp), bool(inverse),
        bool(kept_first))


@on_input_device
def affine_coupling_merge_bwd_out(grad_out: Tensor, grad_logdet: Optional[Tensor], out: Tensor, params: Tensor,
                                  mode: int, clamp: float, inverse: bool,
                                  kept_first: bool) -> Tuple[Tensor, Tensor, Tensor]:
    """The merge op's backward from its output: (input (B, n), grad_x (B, n), grad_params (B, 2n))."""
    return torch.ops.flowkern.affine_coupling_merge_bwd_out_triton(
        grad_out, grad_logdet, out, params, int(mode), float(clamp), bool(inverse), bool(kept_first))
