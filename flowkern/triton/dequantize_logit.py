"""Triton kernels for the fused dequantize + logit of 8-bit pixels (forward, backward, inverse).

A restatement of flowkern/reference/dequantize.py (the ground truth) and of
csrc/math/dequantize_logit.h, one program per batch row so that each row's log-det is reduced
in registers and written once (deterministic, no atomics). With a = alpha, c = 1 - 2a:

    s  = min(x + u, the largest float32 below x + 1)      v = s / 256
    v' = a + c v,   1 - v' = a + c (1 - v)                 (not 1 - v': keeps its precision near 1)
    y  = log v' - log(1 - v')
    logdet = logdet_in - D log 256 + D log c - sum_row (log v' + log(1 - v'))

u is the given noise, or the counter noise of flowkern.reference.dequantize.counter_uniform:
SplitMix64's output at step i + 1 (i the element's flat index) from the 64-bit seed, in uint64
arithmetic (wrapping), u = (z >> 40) 2^-24: bit-identical to the C++/CUDA kernels and the
reference. Backward (to the given noise; x is integer), g = dL/dy, gld = dL/d(logdet):

    grad_u = (c / 256) ((g - gld)(1 - v') + (g + gld) v') / (v' (1 - v'))

Inverse (sampling): e = exp(-|y|), sigmoid(y) = (y >= 0 ? 1 : e) / (1 + e),
pixel = clamp(floor(256 (sigmoid(y) - a) / c), 0, 255) (NaN stays NaN), and
logdet = logdet_in + D log 256 - D log c + sum_row (-|y| - 2 log1p(e)).

Arithmetic is fp32 (float16/bfloat16 output is stored once, rounded); float64 is not taken:
flowkern.ops routes it elsewhere.
"""
import math
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.library import triton_op, wrap_triton

from ..ops._vmap import register_row_vmap
from ..ops.dequantize import BWD_TENSOR_ARGS, FWD_TENSOR_ARGS, INV_TENSOR_ARGS
from ._common import on_input_device, register_interpreter_fakes, rows_cols

__all__ = ["dequantize_logit_fwd", "dequantize_logit_bwd", "dequantize_logit_inv"]

_MAX_BLOCK = 1024
_MIN_BLOCK = 16
_LOG_LEVELS = math.log(256.0)


@triton.jit
def _counter_uniform(seed, idx):
    """The counter noise of flat indices idx (int64) for the int64 seed (its two's complement
    bits as uint64): SplitMix64's output at step idx + 1, top 24 bits scaled to [0, 1)."""
    z = seed.to(tl.uint64) + (idx.to(tl.uint64) + 1) * 0x9E3779B97F4A7C15
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9
    z = (z ^ (z >> 27)) * 0x94D049BB133111EB
    z = z ^ (z >> 31)
    return (z >> 40).to(tl.float32) * 5.9604644775390625e-08  # 2^-24


@triton.jit
def _dequantized(pixel, u):
    """v = min(x + u, the largest float32 below x + 1) / 256, for pixel = x as fp32 (x + 1 is a
    positive normal float, so the one below it is its bit pattern minus one)."""
    below = ((pixel + 1.0).to(tl.int32, bitcast=True) - 1).to(tl.float32, bitcast=True)
    return tl.minimum(pixel + u, below) * 0.00390625  # / 256, exact


# The seed is a plain runtime value: no recompile (or constant folding) per seed.
@triton.jit(do_not_specialize=["seed"])
def _dequantize_logit_fwd_kernel(
    x_ptr,  # (B, N) uint8 pixels, contiguous; row stride is N
    noise_ptr,  # (B, N) given noise (fp32, or y's dtype); a dummy never read unless HAS_NOISE
    y_ptr,  # (B, N) output logits, in the requested dtype
    logdet_in_ptr,  # (B,) incoming log-det (fp32); a dummy never read unless HAS_LOGDET
    logdet_out_ptr,  # (B,) fresh log-det output (fp32)
    seed,  # int64: the counter noise's seed (uint64 bits), unused with HAS_NOISE
    N,  # elements per row, which is also the row stride of every (B, N) view
    alpha,  # runtime floats, so changing alpha does not recompile
    scale,  # 1 - 2 alpha
    row_const,  # -D log 256 + D log(1 - 2 alpha)
    HAS_NOISE: tl.constexpr,
    HAS_LOGDET: tl.constexpr,
    BLOCK: tl.constexpr,
):
    # int64 before the multiply: B * N may exceed 2^31 even when N alone does not.
    row = tl.program_id(0).to(tl.int64)
    row_start = row * N
    cols = tl.arange(0, BLOCK)
    # Per-lane partial sums, reduced once at the end: a fixed summation order per BLOCK.
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, N, BLOCK):
        offs = start + cols
        mask = offs < N
        idx = row_start + offs
        pixel = tl.load(x_ptr + idx, mask=mask, other=0).to(tl.float32)
        if HAS_NOISE:
            u = tl.load(noise_ptr + idx, mask=mask, other=0.0).to(tl.float32)
        else:
            u = _counter_uniform(seed, idx)
        v = _dequantized(pixel, u)
        log_lo = tl.log(alpha + scale * v)
        log_hi = tl.log(alpha + scale * (1.0 - v))
        tl.store(y_ptr + idx, (log_lo - log_hi).to(y_ptr.dtype.element_ty), mask=mask)
        acc += tl.where(mask, log_lo + log_hi, 0.0)
    ld = row_const - tl.sum(acc, axis=0)
    if HAS_LOGDET:
        ld = tl.load(logdet_in_ptr + row) + ld
    tl.store(logdet_out_ptr + row, ld)


@triton.jit
def _dequantize_logit_bwd_kernel(
    grad_out_ptr,  # (B, N) dL/dy, contiguous; row stride is N
    grad_logdet_ptr,  # (B,) dL/d(logdet) (fp32); a dummy never read unless HAS_GRAD_LOGDET
    x_ptr,  # (B, N) uint8 pixels
    noise_ptr,  # (B, N) the noise the forward was given
    grad_noise_ptr,  # (B, N) dL/du, the noise's dtype
    N,  # elements per row = row stride
    alpha,
    scale,  # 1 - 2 alpha
    HAS_GRAD_LOGDET: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    row_start = row * N
    cols = tl.arange(0, BLOCK)
    # Every element of a row feeds the same log-det: its gradient is one scalar per row.
    if HAS_GRAD_LOGDET:
        gld = tl.load(grad_logdet_ptr + row).to(tl.float32)
    else:
        gld = 0.0
    c = scale * 0.00390625  # (1 - 2 alpha) / 256
    for start in range(0, N, BLOCK):
        offs = start + cols
        mask = offs < N
        idx = row_start + offs
        pixel = tl.load(x_ptr + idx, mask=mask, other=0).to(tl.float32)
        u = tl.load(noise_ptr + idx, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(grad_out_ptr + idx, mask=mask, other=0.0).to(tl.float32)
        v = _dequantized(pixel, u)
        lo = alpha + scale * v
        hi = alpha + scale * (1.0 - v)
        gu = c * ((g - gld) * hi + (g + gld) * lo) / (lo * hi)
        tl.store(grad_noise_ptr + idx, gu.to(grad_noise_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _dequantize_logit_inv_kernel(
    y_ptr,  # (B, N) logits, contiguous; row stride is N
    pixels_ptr,  # (B, N) pixel values out, y's dtype
    logdet_in_ptr,  # (B,) incoming log-det (fp32); a dummy never read unless HAS_LOGDET
    logdet_out_ptr,  # (B,) fresh log-det output (fp32)
    N,  # elements per row = row stride
    alpha,
    scale,  # 1 - 2 alpha
    row_const,  # D log 256 - D log(1 - 2 alpha)
    HAS_LOGDET: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    row_start = row * N
    cols = tl.arange(0, BLOCK)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, N, BLOCK):
        offs = start + cols
        mask = offs < N
        idx = row_start + offs
        y = tl.load(y_ptr + idx, mask=mask, other=0.0).to(tl.float32)
        a = tl.abs(y)
        e = tl.exp(-a)  # never overflows; 0 far in the tails
        sig = tl.where(y >= 0.0, 1.0, e) / (1.0 + e)
        p = tl.floor((sig - alpha) / scale * 256.0)
        # Comparisons that are false for NaN: NaN passes through, as in the reference.
        p = tl.where(p < 0.0, 0.0, tl.where(p > 255.0, 255.0, p))
        tl.store(pixels_ptr + idx, p.to(pixels_ptr.dtype.element_ty), mask=mask)
        # log1p(e) = log(1 + e) e / ((1 + e) - 1) (Kahan; e itself where 1 + e rounds to 1).
        w = 1.0 + e
        d = w - 1.0
        log1p_e = tl.where(d == 0.0, e, tl.log(w) * (e / tl.where(d == 0.0, 1.0, d)))
        acc += tl.where(mask, -a - 2.0 * log1p_e, 0.0)
    ld = row_const + tl.sum(acc, axis=0)
    if HAS_LOGDET:
        ld = tl.load(logdet_in_ptr + row) + ld
    tl.store(logdet_out_ptr + row, ld)


def _block_for(cols: int) -> Tuple[int, int]:
    block = max(_MIN_BLOCK, min(triton.next_power_of_2(max(cols, 1)), _MAX_BLOCK))
    num_warps = 4 if block >= 512 else (2 if block >= 256 else 1)
    return block, num_warps


def _float32_only(dtype: torch.dtype) -> None:
    if dtype == torch.float64:
        raise TypeError("the Triton dequantize_logit kernels compute in float32; for float64 use backend "
                        "'cpu', 'cuda' or 'reference'")


def _constants(alpha: float, cols: int, sign: float) -> Tuple[float, float]:
    scale = 1.0 - 2.0 * alpha
    return scale, sign * cols * (math.log(scale) - _LOG_LEVELS)


@triton_op("flowkern::dequantize_logit_fwd_triton", mutates_args=())
def _dequantize_logit_fwd_op(
    x: Tensor,
    noise: Optional[Tensor],
    seed: int,
    alpha: float,
    dtype: torch.dtype,
    logdet: Optional[Tensor],
) -> Tuple[Tensor, Tensor]:
    _float32_only(dtype)
    rows, cols = rows_cols(x)
    y = torch.empty(x.shape, dtype=dtype, device=x.device)
    logdet_out = torch.empty((rows,), dtype=torch.float32, device=x.device)
    if rows == 0:
        return y, logdet_out
    if cols == 0:
        # An empty sum; also keeps zero-size buffers away from the launcher.
        if logdet is None:
            logdet_out.zero_()
        else:
            logdet_out.copy_(logdet)
        return y, logdet_out
    scale, row_const = _constants(float(alpha), cols, 1.0)
    block, num_warps = _block_for(cols)
    wrap_triton(_dequantize_logit_fwd_kernel)[(rows,)](
        x,
        noise if noise is not None else y,
        y,
        logdet if logdet is not None else logdet_out,
        logdet_out,
        int(seed),
        cols,
        float(alpha),
        scale,
        row_const,
        HAS_NOISE=noise is not None,
        HAS_LOGDET=logdet is not None,
        BLOCK=block,
        num_warps=num_warps,
    )
    return y, logdet_out


@triton_op("flowkern::dequantize_logit_bwd_triton", mutates_args=())
def _dequantize_logit_bwd_op(
    grad_out: Tensor,
    grad_logdet: Optional[Tensor],
    x: Tensor,
    noise: Tensor,
    alpha: float,
) -> Tensor:
    _float32_only(noise.dtype)
    rows, cols = rows_cols(x)
    grad_noise = torch.empty_like(noise)
    if rows == 0 or cols == 0:
        return grad_noise
    block, num_warps = _block_for(cols)
    wrap_triton(_dequantize_logit_bwd_kernel)[(rows,)](
        grad_out,
        grad_logdet if grad_logdet is not None else grad_out,
        x,
        noise,
        grad_noise,
        cols,
        float(alpha),
        1.0 - 2.0 * float(alpha),
        HAS_GRAD_LOGDET=grad_logdet is not None,
        BLOCK=block,
        num_warps=num_warps,
    )
    return grad_noise


@triton_op("flowkern::dequantize_logit_inv_triton", mutates_args=())
def _dequantize_logit_inv_op(y: Tensor, alpha: float, logdet: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
    _float32_only(y.dtype)
    rows, cols = rows_cols(y)
    pixels = torch.empty_like(y)
    logdet_out = torch.empty((rows,), dtype=torch.float32, device=y.device)
    if rows == 0:
        return pixels, logdet_out
    if cols == 0:
        if logdet is None:
            logdet_out.zero_()
        else:
            logdet_out.copy_(logdet)
        return pixels, logdet_out
    scale, row_const = _constants(float(alpha), cols, -1.0)
    block, num_warps = _block_for(cols)
    wrap_triton(_dequantize_logit_inv_kernel)[(rows,)](
        y,
        pixels,
        logdet if logdet is not None else logdet_out,
        logdet_out,
        cols,
        float(alpha),
        scale,
        row_const,
        HAS_LOGDET=logdet is not None,
        BLOCK=block,
        num_warps=num_warps,
    )
    return pixels, logdet_out


# Shape-only fakes, needed only when the kernels are interpreted (see _common).
def _fwd_fake(x, noise, seed, alpha, dtype, logdet):
    return x.new_empty(x.shape, dtype=dtype), x.new_empty((x.shape[0],), dtype=torch.float32)


def _bwd_fake(grad_out, grad_logdet, x, noise, alpha):
    return torch.empty_like(noise)


def _inv_fake(y, alpha, logdet):
    return torch.empty_like(y), y.new_empty((y.shape[0],), dtype=torch.float32)


register_interpreter_fakes(_dequantize_logit_fwd_kernel, [(_dequantize_logit_fwd_op, _fwd_fake),
                                                          (_dequantize_logit_bwd_op, _bwd_fake),
                                                          (_dequantize_logit_inv_op, _inv_fake)])

register_row_vmap("flowkern::dequantize_logit_fwd_triton", FWD_TENSOR_ARGS)
register_row_vmap("flowkern::dequantize_logit_bwd_triton", BWD_TENSOR_ARGS)
register_row_vmap("flowkern::dequantize_logit_inv_triton", INV_TENSOR_ARGS)


@on_input_device
def dequantize_logit_fwd(x: Tensor, noise: Optional[Tensor], seed: int, alpha: float, dtype: torch.dtype,
                         logdet: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
    """(y of `dtype` like x, logdet (B,) float32); the compiled op's signature."""
    return torch.ops.flowkern.dequantize_logit_fwd_triton(x, noise, int(seed), float(alpha), dtype, logdet)


@on_input_device
def dequantize_logit_bwd(grad_out: Tensor, grad_logdet: Optional[Tensor], x: Tensor, noise: Tensor,
                         alpha: float) -> Tensor:
    """dL/d(noise), like noise."""
    return torch.ops.flowkern.dequantize_logit_bwd_triton(grad_out, grad_logdet, x, noise, float(alpha))


@on_input_device
def dequantize_logit_inv(y: Tensor, alpha: float, logdet: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
    """(pixel values like y, logdet (B,) float32)."""
    return torch.ops.flowkern.dequantize_logit_inv_triton(y, float(alpha), logdet)
