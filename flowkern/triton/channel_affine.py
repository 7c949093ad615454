"""Triton kernels for the per-channel ops: ActNorm, the batch-norm flow and batch statistics.

A restatement of csrc/math/channel_affine.h and of flowkern/reference/actnorm.py, batchnorm_flow.py
(the ground truth). x (B, C, *spatial) is viewed as (B, C, S), S = prod(spatial). Both ops are,
per channel c,

    out = (in + pre_c) * m_c + post_c,        every row's log-det += S * sum_c log m_c
    actnorm  forward:  pre = t      m = e^s     post = 0       log m = s
             inverse:  pre = 0      m = e^-s    post = -t      log m = -s
    bn flow  forward:  pre = -mean  m = e^a     post = beta    log m = a = log_gamma - 0.5 log(var + eps)
             inverse:  pre = -beta  m = e^-a    post = mean    log m = -a

Backward from the op's output, g = dL/dout, G = sum over rows of dL/dlogdet, per channel
R1 = sum g and R2 = sum g (out - post) over batch and space:

    dL/din = g m,   dL/dpre = m R1,   dL/dpost = R1,   dL/dlog m = R2 + S G

and the parameters by the chain rule. Training mode (bn flow forward with the batch's own
statistics, N = B S): dL/dx = (g - R1 / N) m - (R2 + S G) e^-log_gamma (var + eps)^-1/2 / N (y - beta),
dL/dlog_gamma = R2 + S G, dL/dbeta = R1. Batch statistics: two passes (the mean, then the sums
of x - K and (x - K)^2 around it, K = that mean).

Layout: programs work on [CB, SB] tiles, CB channels by SB positions of one row, at offsets
row * C * S + c * S + s, so the per-channel coefficients are [CB] vectors computed once per
program (no division per element) and a tile row-reduces into per-channel sums. The reductions
are deterministic: program (chunk, channel block) writes the partial sums of a fixed chunk of
rows (fixed by the shape alone), and a finalize program adds the chunks in order, in float64.
Arithmetic is fp32 for every input dtype (fp16/bf16 upcast on load); the log-det is float32, or
float64 for float64 inputs.
"""
from typing import Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.library import triton_op, wrap_triton

from ..ops.actnorm import BWD_TENSOR_ARGS as ACTNORM_BWD_ARGS
from ..ops.actnorm import FWD_ROW_ARGS as ACTNORM_FWD_ROWS
from ..ops.actnorm import FWD_TENSOR_ARGS as ACTNORM_FWD_ARGS
from ..ops.actnorm import register_channel_vmap
from ..ops.batchnorm_flow import BWD_TENSOR_ARGS as BN_BWD_ARGS
from ..ops.batchnorm_flow import FWD_ROW_ARGS as BN_FWD_ROWS
from ..ops.batchnorm_flow import FWD_TENSOR_ARGS as BN_FWD_ARGS
from ..ops.batchnorm_flow import STATS_TENSOR_ARGS
from ._common import logdet_dtype, on_input_device, register_interpreter_fakes

__all__ = ["actnorm_fwd", "actnorm_bwd", "batch_stats", "batchnorm_flow_fwd", "batchnorm_flow_bwd"]

OP_ACTNORM = 0
OP_BATCHNORM = 1

KIND_GRAD_WRITE = 0  # sums R1, R2 and grad_in = g m on the way
KIND_GRAD = 1        # sums R1, R2 only (training mode's first pass)
KIND_STATS = 2       # sums of x - K and (x - K)^2

_TILE = 1024           # elements of one [CB, SB] tile
_REDUCE_ELEMS = 8192   # elements one reduction program sums (it takes that many / (CB * S) rows)
_VECTOR_BLOCK = 256    # channels / rows per program of the (C,)- and (B,)-sized kernels


@triton.jit
def _coeffs(p0_ptr, p1_ptr, p2_ptr, p3_ptr, cols, cmask, eps, OP: tl.constexpr, INVERSE: tl.constexpr):
    """(pre, m, post, log m) as fp32 [CB] vectors for channels `cols` (masked lanes: finite junk)."""
    p0 = tl.load(p0_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
    p1 = tl.load(p1_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
    if OP == 0:  # actnorm: p0 = shift, p1 = log_scale
        zero = tl.zeros_like(p0)
        if INVERSE:
            pre = zero
            m = tl.exp(-p1)
            post = -p0
            logm = -p1
        else:
            pre = p0
            m = tl.exp(p1)
            post = zero
            logm = p1
    else:  # bn flow: p0 = mean, p1 = var, p2 = log_gamma, p3 = beta
        p2 = tl.load(p2_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
        p3 = tl.load(p3_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
        a = p2 - 0.5 * tl.log(p1 + eps)
        if INVERSE:
            pre = -p3
            m = tl.exp(-a)
            post = p0
            logm = -a
        else:
            pre = -p0
            m = tl.exp(a)
            post = p3
            logm = a
    return pre, m, post, logm


@triton.jit
def _channel_fwd_kernel(
    x_ptr,  # (B, C, S) contiguous input; row stride C * S, channel stride S
    p0_ptr, p1_ptr, p2_ptr, p3_ptr,  # (C,) parameters (see _coeffs); p2, p3 dummies for actnorm
    out_ptr,  # (B, C, S) output, x's dtype
    C, S,  # channels and positions per channel
    eps,  # runtime float: no recompile per value
    OP: tl.constexpr, INVERSE: tl.constexpr, CB: tl.constexpr, SB: tl.constexpr,
):
    # Program (row, channel block); int64 before the multiply: B * C * S may exceed 2^31.
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * CB + tl.arange(0, CB)
    cmask = cols < C
    pre, m, post, _logm = _coeffs(p0_ptr, p1_ptr, p2_ptr, p3_ptr, cols, cmask, eps, OP, INVERSE)
    base = row * C * S + cols.to(tl.int64)[:, None] * S
    for s0 in range(0, S, SB):
        s = s0 + tl.arange(0, SB)
        mask = cmask[:, None] & (s < S)[None, :]
        offs = base + s[None, :]
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        y = (x + pre[:, None]) * m[:, None] + post[:, None]
        tl.store(out_ptr + offs, y.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _channel_logdet_kernel(
    p0_ptr, p1_ptr, p2_ptr, p3_ptr,  # (C,) parameters
    logdet_in_ptr,  # (B,) incoming log-det; a dummy never read when HAS_LOGDET is False
    logdet_out_ptr,  # (B,) fresh log-det (fp32, or fp64 for fp64 inputs)
    B, C, S, eps,
    OP: tl.constexpr, INVERSE: tl.constexpr, HAS_LOGDET: tl.constexpr, BLOCK: tl.constexpr,
):
    # One program: S * sum_c log m_c, the same for every row, in a fixed order.
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for c0 in range(0, C, BLOCK):
        cols = c0 + tl.arange(0, BLOCK)
        cmask = cols < C
        _pre, _m, _post, logm = _coeffs(p0_ptr, p1_ptr, p2_ptr, p3_ptr, cols, cmask, eps, OP, INVERSE)
        acc += tl.where(cmask, logm, 0.0)
    total = (tl.sum(acc, axis=0) * S).to(logdet_out_ptr.dtype.element_ty)
    for b0 in range(0, B, BLOCK):
        rows = b0 + tl.arange(0, BLOCK)
        rmask = rows < B
        ld = tl.zeros([BLOCK], dtype=logdet_out_ptr.dtype.element_ty) + total
        if HAS_LOGDET:
            # Added in the log-det's own dtype so an fp64 running total keeps its precision.
            ld = tl.load(logdet_in_ptr + rows, mask=rmask, other=0.0).to(logdet_out_ptr.dtype.element_ty) + ld
        tl.store(logdet_out_ptr + rows, ld, mask=rmask)


@triton.jit
def _channel_reduce_kernel(
    a_ptr,  # (B, C, S): g (gradient kinds) or x (statistics)
    b_ptr,  # (B, C, S): the op's output (gradient kinds); a dummy for the statistics
    p0_ptr, p1_ptr, p2_ptr, p3_ptr,  # (C,) parameters (gradient kinds)
    pivot_ptr,  # (C,) fp32 pivot K (statistics); a dummy unless HAS_PIVOT
    out_ptr,  # (B, C, S) grad_in = g m (KIND_GRAD_WRITE); a dummy otherwise
    part_ptr,  # (P, 2, C) fp32 partial sums of this program's chunk of rows
    B, C, S,
    chunk_rows,  # rows per chunk: fixed by the shape, so the sums are too
    eps,
    OP: tl.constexpr, INVERSE: tl.constexpr, KIND: tl.constexpr, HAS_PIVOT: tl.constexpr,
    CB: tl.constexpr, SB: tl.constexpr,
):
    chunk = tl.program_id(0)
    cols = tl.program_id(1) * CB + tl.arange(0, CB)
    cmask = cols < C
    if KIND == 2:
        if HAS_PIVOT:
            post = tl.load(pivot_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
        else:
            post = tl.zeros([CB], dtype=tl.float32)
        m = post
    else:
        _pre, m, post, _logm = _coeffs(p0_ptr, p1_ptr, p2_ptr, p3_ptr, cols, cmask, eps, OP, INVERSE)
    acc1 = tl.zeros([CB, SB], dtype=tl.float32)
    acc2 = tl.zeros([CB, SB], dtype=tl.float32)
    r0 = chunk * chunk_rows
    r1 = tl.minimum(r0 + chunk_rows, B)
    # int64 offsets: B * C * S may exceed 2^31; the row's base advances by C * S per row.
    base = r0.to(tl.int64) * C * S + cols.to(tl.int64)[:, None] * S
    for _r in range(r0, r1):
        for s0 in range(0, S, SB):
            s = s0 + tl.arange(0, SB)
            mask = cmask[:, None] & (s < S)[None, :]
            offs = base + s[None, :]
            a = tl.load(a_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            if KIND == 2:
                d = tl.where(mask, a - post[:, None], 0.0)
                acc1 += d
                acc2 += d * d
            else:
                o = tl.load(b_ptr + offs, mask=mask, other=0.0).to(tl.float32)
                acc1 += a
                acc2 += a * (o - post[:, None])  # masked lanes: g = 0
                if KIND == 0:
                    tl.store(out_ptr + offs, (a * m[:, None]).to(out_ptr.dtype.element_ty), mask=mask)
        base += C * S
    tl.store(part_ptr + (2 * chunk) * C + cols, tl.sum(acc1, axis=1), mask=cmask)
    tl.store(part_ptr + (2 * chunk + 1) * C + cols, tl.sum(acc2, axis=1), mask=cmask)


@triton.jit
def _partial_sums(part_ptr, cols, cmask, C, P):
    """The two sums of channels `cols` over the P chunks, in chunk order, in float64."""
    r1 = tl.zeros(cols.shape, dtype=tl.float64)
    r2 = tl.zeros(cols.shape, dtype=tl.float64)
    for p in range(0, P):
        r1 += tl.load(part_ptr + (2 * p) * C + cols, mask=cmask, other=0.0).to(tl.float64)
        r2 += tl.load(part_ptr + (2 * p + 1) * C + cols, mask=cmask, other=0.0).to(tl.float64)
    return r1, r2


@triton.jit
def _channel_grads_kernel(
    part_ptr,  # (P, 2, C) partial sums of R1, R2
    grad_logdet_ptr,  # (B,) dL/d(logdet); a dummy unless HAS_GRAD_LOGDET
    p0_ptr, p1_ptr, p2_ptr, p3_ptr,  # (C,) parameters
    g0_ptr, g1_ptr, g2_ptr, g3_ptr,  # (C,) parameter gradients (see below); dummies where unused
    coef_ptr,  # (4, C) fp32 (c0, m, k1, beta) for the training-mode grad_x pass; a dummy unless TRAIN
    B, C, S, P, n, eps,  # n = B * S as a float
    OP: tl.constexpr, INVERSE: tl.constexpr, TRAIN: tl.constexpr, HAS_GRAD_LOGDET: tl.constexpr,
    BLOCK: tl.constexpr,
):
    # actnorm: g0 = grad_shift, g1 = grad_log_scale. bn flow: g0 = grad_mean, g1 = grad_var,
    # g2 = grad_log_gamma, g3 = grad_beta (TRAIN: g2, g3 only).
    cols = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    cmask = cols < C
    # Every program sums dL/dlogdet over the rows the same way.
    gacc = tl.zeros([BLOCK], dtype=tl.float64)
    if HAS_GRAD_LOGDET:
        for b0 in range(0, B, BLOCK):
            rows = b0 + tl.arange(0, BLOCK)
            gacc += tl.load(grad_logdet_ptr + rows, mask=rows < B, other=0.0).to(tl.float64)
    sg = (tl.sum(gacc, axis=0) * S).to(tl.float32)
    r1, r2 = _partial_sums(part_ptr, cols, cmask, C, P)
    r1 = r1.to(tl.float32)
    r2 = r2.to(tl.float32)
    _pre, m, post, _logm = _coeffs(p0_ptr, p1_ptr, p2_ptr, p3_ptr, cols, cmask, eps, OP, INVERSE)
    if OP == 0:
        if INVERSE:
            grad_shift = -r1
            grad_log_scale = -(r2 + sg)
        else:
            grad_shift = m * r1
            grad_log_scale = r2 + sg
        tl.store(g0_ptr + cols, grad_shift.to(g0_ptr.dtype.element_ty), mask=cmask)
        tl.store(g1_ptr + cols, grad_log_scale.to(g1_ptr.dtype.element_ty), mask=cmask)
    else:
        var = tl.load(p1_ptr + cols, mask=cmask, other=1.0).to(tl.float32)
        if TRAIN:
            log_gamma = tl.load(p2_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
            grad_log_gamma = r2 + sg
            grad_beta = r1
            c0 = -r1 / n
            k1 = -grad_log_gamma * tl.exp(-(log_gamma + 0.5 * tl.log(var + eps))) / n
            tl.store(coef_ptr + cols, c0, mask=cmask)
            tl.store(coef_ptr + C + cols, m, mask=cmask)
            tl.store(coef_ptr + 2 * C + cols, k1, mask=cmask)
            tl.store(coef_ptr + 3 * C + cols, post, mask=cmask)
        else:
            if INVERSE:
                grad_a = -(r2 + sg)
                grad_mean = r1
                grad_beta = -(m * r1)
            else:
                grad_a = r2 + sg
                grad_mean = -(m * r1)
                grad_beta = r1
            grad_log_gamma = grad_a
            tl.store(g0_ptr + cols, grad_mean.to(g0_ptr.dtype.element_ty), mask=cmask)
            tl.store(g1_ptr + cols, (-0.5 * grad_a / (var + eps)).to(g1_ptr.dtype.element_ty), mask=cmask)
        tl.store(g2_ptr + cols, grad_log_gamma.to(g2_ptr.dtype.element_ty), mask=cmask)
        tl.store(g3_ptr + cols, grad_beta.to(g3_ptr.dtype.element_ty), mask=cmask)


@triton.jit
def _batchnorm_train_grad_kernel(
    g_ptr,  # (B, C, S) dL/dy, contiguous
    y_ptr,  # (B, C, S) the forward's output
    coef_ptr,  # (4, C) fp32 (c0, m, k1, beta)
    grad_x_ptr,  # (B, C, S) output
    C, S,
    CB: tl.constexpr, SB: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * CB + tl.arange(0, CB)
    cmask = cols < C
    c0 = tl.load(coef_ptr + cols, mask=cmask, other=0.0)[:, None]
    m = tl.load(coef_ptr + C + cols, mask=cmask, other=0.0)[:, None]
    k1 = tl.load(coef_ptr + 2 * C + cols, mask=cmask, other=0.0)[:, None]
    beta = tl.load(coef_ptr + 3 * C + cols, mask=cmask, other=0.0)[:, None]
    base = row * C * S + cols.to(tl.int64)[:, None] * S
    for s0 in range(0, S, SB):
        s = s0 + tl.arange(0, SB)
        mask = cmask[:, None] & (s < S)[None, :]
        offs = base + s[None, :]
        g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        y = tl.load(y_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(grad_x_ptr + offs, ((g + c0) * m + k1 * (y - beta)).to(grad_x_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _batch_stats_kernel(
    part_ptr,  # (P, 2, C) partial sums of x - K and (x - K)^2
    pivot_ptr,  # (C,) fp32 K: written by the first pass (the mean), read by the last
    mean_ptr, var_ptr,  # (C,) outputs, x's dtype (LAST only)
    C, P, n,  # n = B * S as a float
    LAST: tl.constexpr, BLOCK: tl.constexpr,
):
    cols = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    cmask = cols < C
    s1, s2 = _partial_sums(part_ptr, cols, cmask, C, P)
    if LAST:
        k = tl.load(pivot_ptr + cols, mask=cmask, other=0.0).to(tl.float64)
        d = s1 / n
        var = s2 / n - d * d
        var = tl.where(var < 0.0, 0.0, var)  # clamps rounding; NaN (from NaN or inf in x) stays NaN
        tl.store(mean_ptr + cols, (k + d).to(mean_ptr.dtype.element_ty), mask=cmask)
        tl.store(var_ptr + cols, var.to(var_ptr.dtype.element_ty), mask=cmask)
    else:
        tl.store(pivot_ptr + cols, (s1 / n).to(tl.float32), mask=cmask)


def _dims(x: Tensor) -> Tuple[int, int, int]:
    spatial = 1
    for d in x.shape[2:]:
        spatial *= d
    return x.shape[0], x.shape[1], spatial


def _tile(channels: int, spatial: int) -> Tuple[int, int]:
    """[CB, SB]: SB covers a channel's positions (up to the tile), CB fills the rest."""
    sb = min(triton.next_power_of_2(max(spatial, 1)), _TILE)
    cb = min(triton.next_power_of_2(max(channels, 1)), max(1, _TILE // sb))
    return cb, sb


def _chunk_rows(cb: int, spatial: int) -> int:
    return max(1, triton.cdiv(_REDUCE_ELEMS, cb * max(spatial, 1)))


def _params4(params: Sequence[Tensor]) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    return tuple(params) + (params[0],) * (4 - len(params))  # actnorm: p2, p3 are never read


def _forward(op: int, x: Tensor, params: Sequence[Tensor], eps: float, inverse: bool,
             logdet: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
    rows, channels, spatial = _dims(x)
    out = torch.empty_like(x)
    ld = torch.empty((rows,), dtype=logdet_dtype(x.dtype), device=x.device)
    if rows == 0:
        return out, ld
    if channels == 0:  # no parameters: an empty sum (and no zero-size buffers for the launcher)
        if logdet is None:
            ld.zero_()
        else:
            ld.copy_(logdet)
        return out, ld
    p = _params4(params)
    wrap_triton(_channel_logdet_kernel)[(1,)](
        *p, logdet if logdet is not None else ld, ld, rows, channels, spatial, float(eps),
        OP=op, INVERSE=bool(inverse), HAS_LOGDET=logdet is not None, BLOCK=_VECTOR_BLOCK)
    if spatial > 0:
        cb, sb = _tile(channels, spatial)
        wrap_triton(_channel_fwd_kernel)[(rows, triton.cdiv(channels, cb))](
            x, *p, out, channels, spatial, float(eps), OP=op, INVERSE=bool(inverse), CB=cb, SB=sb, num_warps=4)
    return out, ld


def _backward(op: int, grad_out: Tensor, grad_logdet: Optional[Tensor], out: Tensor, params: Sequence[Tensor],
              eps: float, inverse: bool, train: bool) -> Tuple[Tensor, ...]:
    rows, channels, spatial = _dims(out)
    grad_in = torch.empty_like(out)
    if op == OP_ACTNORM:
        grads = [torch.empty_like(params[0]), torch.empty_like(params[1])]
    else:
        grads = [params[0].new_empty((0,)) if train else torch.empty_like(params[0]),
                 params[1].new_empty((0,)) if train else torch.empty_like(params[1]),
                 torch.empty_like(params[2]), torch.empty_like(params[3])]
    if channels == 0:
        return (grad_in, *grads)
    p = _params4(params)
    cb, sb = _tile(channels, spatial)
    chunk_rows = _chunk_rows(cb, spatial)
    chunks = triton.cdiv(rows, chunk_rows) if spatial > 0 else 0
    part = torch.empty((max(chunks, 1) * 2 * channels,), dtype=torch.float32, device=out.device)
    if chunks > 0:
        wrap_triton(_channel_reduce_kernel)[(chunks, triton.cdiv(channels, cb))](
            grad_out, out, *p, part, grad_in, part, rows, channels, spatial, chunk_rows, float(eps),
            OP=op, INVERSE=bool(inverse), KIND=KIND_GRAD if train else KIND_GRAD_WRITE, HAS_PIVOT=False,
            CB=cb, SB=sb, num_warps=4)
    coef = torch.empty((4 * channels,), dtype=torch.float32, device=out.device) if train else part
    # Outputs a variant does not write get a real buffer that is never written (a dummy).
    g = [t if t.numel() else grads[-1] for t in grads] + [grads[-1]] * (4 - len(grads))
    wrap_triton(_channel_grads_kernel)[(triton.cdiv(channels, _VECTOR_BLOCK),)](
        part, grad_logdet if grad_logdet is not None else part, *p, *g, coef,
        rows, channels, spatial, chunks, float(rows * spatial), float(eps),
        OP=op, INVERSE=bool(inverse), TRAIN=bool(train), HAS_GRAD_LOGDET=grad_logdet is not None,
        BLOCK=_VECTOR_BLOCK)
    if train and out.numel() > 0:
        wrap_triton(_batchnorm_train_grad_kernel)[(rows, triton.cdiv(channels, cb))](
            grad_out, out, coef, grad_in, channels, spatial, CB=cb, SB=sb, num_warps=4)
    return (grad_in, *grads)


@triton_op("flowkern::actnorm_fwd_triton", mutates_args=())
def _actnorm_fwd_op(x: Tensor, shift: Tensor, log_scale: Tensor, inverse: bool,
                    logdet: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
    return _forward(OP_ACTNORM, x, (shift, log_scale), 0.0, inverse, logdet)


@triton_op("flowkern::actnorm_bwd_triton", mutates_args=())
def _actnorm_bwd_op(grad_out: Tensor, grad_logdet: Optional[Tensor], out: Tensor, shift: Tensor, log_scale: Tensor,
                    inverse: bool) -> Tuple[Tensor, Tensor, Tensor]:
    return _backward(OP_ACTNORM, grad_out, grad_logdet, out, (shift, log_scale), 0.0, inverse, False)


@triton_op("flowkern::batch_stats_triton", mutates_args=())
def _batch_stats_op(x: Tensor) -> Tuple[Tensor, Tensor]:
    rows, channels, spatial = _dims(x)
    mean = x.new_empty((channels,))
    var = x.new_empty((channels,))
    if channels == 0:
        return mean, var
    if rows * spatial == 0:
        raise ValueError(f"batch_stats needs at least one value per channel, got x of shape {tuple(x.shape)}")
    cb, sb = _tile(channels, spatial)
    chunk_rows = _chunk_rows(cb, spatial)
    chunks = triton.cdiv(rows, chunk_rows)
    part = torch.empty((chunks * 2 * channels,), dtype=torch.float32, device=x.device)
    pivot = torch.empty((channels,), dtype=torch.float32, device=x.device)
    grid = (chunks, triton.cdiv(channels, cb))
    final_grid = (triton.cdiv(channels, _VECTOR_BLOCK),)
    # Two passes, as PyTorch's batch norm: the mean, then the sums around it.
    for last in (False, True):
        wrap_triton(_channel_reduce_kernel)[grid](
            x, x, pivot, pivot, pivot, pivot, pivot, x, part, rows, channels, spatial, chunk_rows, 0.0,
            OP=OP_ACTNORM, INVERSE=False, KIND=KIND_STATS, HAS_PIVOT=last, CB=cb, SB=sb, num_warps=4)
        wrap_triton(_batch_stats_kernel)[final_grid](
            part, pivot, mean, var, channels, chunks, float(rows * spatial), LAST=last, BLOCK=_VECTOR_BLOCK)
    return mean, var


@triton_op("flowkern::batchnorm_flow_fwd_triton", mutates_args=())
def _batchnorm_flow_fwd_op(x: Tensor, mean: Tensor, var: Tensor, log_gamma: Tensor, beta: Tensor, eps: float,
                           inverse: bool, logdet: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
    return _forward(OP_BATCHNORM, x, (mean, var, log_gamma, beta), eps, inverse, logdet)


@triton_op("flowkern::batchnorm_flow_bwd_triton", mutates_args=())
def _batchnorm_flow_bwd_op(grad_out: Tensor, grad_logdet: Optional[Tensor], out: Tensor, mean: Tensor, var: Tensor,
                           log_gamma: Tensor, beta: Tensor, eps: float, inverse: bool,
                           batch_stats: bool) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    if batch_stats and inverse:
        raise ValueError("batchnorm_flow's batch-statistics backward is forward-only")
    return _backward(OP_BATCHNORM, grad_out, grad_logdet, out, (mean, var, log_gamma, beta), eps, inverse,
                     batch_stats)


# Shape-only fakes, needed only when the kernels are interpreted (see _common).
def _fwd_fake(x, *args):
    return torch.empty_like(x), x.new_empty((x.shape[0],), dtype=logdet_dtype(x.dtype))


def _actnorm_bwd_fake(grad_out, grad_logdet, out, shift, log_scale, inverse):
    return torch.empty_like(out), torch.empty_like(shift), torch.empty_like(log_scale)


def _batch_stats_fake(x):
    return x.new_empty((x.shape[1],)), x.new_empty((x.shape[1],))


def _batchnorm_flow_bwd_fake(grad_out, grad_logdet, out, mean, var, log_gamma, beta, eps, inverse, batch_stats):
    stat_grad = (lambda t: t.new_empty((0,))) if batch_stats else torch.empty_like
    return (torch.empty_like(out), stat_grad(mean), stat_grad(var), torch.empty_like(log_gamma),
            torch.empty_like(beta))


register_interpreter_fakes(_channel_fwd_kernel, [(_actnorm_fwd_op, _fwd_fake), (_actnorm_bwd_op, _actnorm_bwd_fake),
                                                 (_batch_stats_op, _batch_stats_fake),
                                                 (_batchnorm_flow_fwd_op, _fwd_fake),
                                                 (_batchnorm_flow_bwd_op, _batchnorm_flow_bwd_fake)])

register_channel_vmap("flowkern::actnorm_fwd_triton", ACTNORM_FWD_ARGS, ACTNORM_FWD_ROWS)
register_channel_vmap("flowkern::actnorm_bwd_triton", ACTNORM_BWD_ARGS)
register_channel_vmap("flowkern::batch_stats_triton", STATS_TENSOR_ARGS)
register_channel_vmap("flowkern::batchnorm_flow_fwd_triton", BN_FWD_ARGS, BN_FWD_ROWS)
register_channel_vmap("flowkern::batchnorm_flow_bwd_triton", BN_BWD_ARGS)


@on_input_device
def actnorm_fwd(x: Tensor, shift: Tensor, log_scale: Tensor, inverse: bool,
                logdet: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
    """(out like x, logdet (B,), float32 or float64 for float64 x); the compiled op's schema."""
    return torch.ops.flowkern.actnorm_fwd_triton(x, shift, log_scale, bool(inverse), logdet)


@on_input_device
def actnorm_bwd(grad_out: Tensor, grad_logdet: Optional[Tensor], out: Tensor, shift: Tensor, log_scale: Tensor,
                inverse: bool) -> Tuple[Tensor, Tensor, Tensor]:
    """(grad_x, grad_shift, grad_log_scale) from the op's output."""
    return torch.ops.flowkern.actnorm_bwd_triton(grad_out, grad_logdet, out, shift, log_scale, bool(inverse))


@on_input_device
def batch_stats(x: Tensor) -> Tuple[Tensor, Tensor]:
    """Per-channel (mean, biased var) of x (B, C, *spatial), in x's dtype, deterministic."""
    return torch.ops.flowkern.batch_stats_triton(x)


@on_input_device
def batchnorm_flow_fwd(x: Tensor, mean: Tensor, var: Tensor, log_gamma: Tensor, beta: Tensor, eps: float,
                       inverse: bool, logdet: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
    """(out like x, logdet (B,)); the compiled op's schema."""
    return torch.ops.flowkern.batchnorm_flow_fwd_triton(x, mean, var, log_gamma, beta, float(eps), bool(inverse),
                                                        logdet)


@on_input_device
def batchnorm_flow_bwd(grad_out: Tensor, grad_logdet: Optional[Tensor], out: Tensor, mean: Tensor, var: Tensor,
                       log_gamma: Tensor, beta: Tensor, eps: float, inverse: bool,
                       batch_stats: bool) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(grad_x, grad_mean, grad_var, grad_log_gamma, grad_beta) from the op's output; with
    batch_stats (forward only) grad_x goes through the statistics and grad_mean, grad_var are empty."""
    return torch.ops.flowkern.batchnorm_flow_bwd_triton(grad_out, grad_logdet, out, mean, var, log_gamma, beta,
                                                        float(eps), bool(inverse), bool(batch_stats))
