"""Triton kernels for the standard-normal negative log-likelihood of a flow's latent.

A restatement of flowkern/reference/gaussian_nll.py and csrc/math/gaussian_nll.h, one program
per batch row (the row's sum reduced in registers and written once; deterministic):

    nll = 0.5 sum_row z^2 + (D / 2) log(2 pi) - logdet       (D = elements per row)
    bits per dim: nll / (D ln 2)
    backward: dL/dz = g k z with g the row's dL/d(nll), k = 1 or 1 / (D ln 2)

The sum is fp32 for every input dtype; float64 is not taken (flowkern.ops routes it elsewhere).
"""
import math
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.library import triton_op, wrap_triton

from ..ops._vmap import register_row_vmap
from ..ops.gaussian_nll import BWD_TENSOR_ARGS, FWD_TENSOR_ARGS
from ._common import on_input_device, register_interpreter_fakes, rows_cols

__all__ = ["gaussian_nll_fwd", "gaussian_nll_bwd"]

_MAX_BLOCK = 1024
_MIN_BLOCK = 16
_HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)


@triton.jit
def _gaussian_nll_fwd_kernel(
    z_ptr,  # (B, N) latent, contiguous; row stride is N
    logdet_ptr,  # (B,) log-det (fp32); a dummy never read unless HAS_LOGDET
    nll_ptr,  # (B,) output (fp32)
    N,  # elements per row = row stride
    norm_const,  # (D / 2) log(2 pi), a runtime float
    divisor,  # D ln 2 for bits per dim, else 1
    HAS_LOGDET: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    row_start = row * N
    cols = tl.arange(0, BLOCK)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, N, BLOCK):
        offs = start + cols
        v = tl.load(z_ptr + row_start + offs, mask=offs < N, other=0.0).to(tl.float32)
        acc += v * v
    nll = 0.5 * tl.sum(acc, axis=0) + norm_const
    if HAS_LOGDET:
        nll = nll - tl.load(logdet_ptr + row)
    tl.store(nll_ptr + row, nll / divisor)


@triton.jit
def _gaussian_nll_bwd_kernel(
    grad_ptr,  # (B,) dL/d(nll) (fp32)
    z_ptr,  # (B, N) latent, contiguous; row stride is N
    grad_z_ptr,  # (B, N) dL/dz, z's dtype
    N,  # elements per row = row stride
    divisor,  # D ln 2 for bits per dim, else 1
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    row_start = row * N
    cols = tl.arange(0, BLOCK)
    k = tl.load(grad_ptr + row) / divisor
    for start in range(0, N, BLOCK):
        offs = start + cols
        mask = offs < N
        v = tl.load(z_ptr + row_start + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(grad_z_ptr + row_start + offs, (k * v).to(grad_z_ptr.dtype.element_ty), mask=mask)


def _block_for(cols: int) -> Tuple[int, int]:
    block = max(_MIN_BLOCK, min(triton.next_power_of_2(max(cols, 1)), _MAX_BLOCK))
    num_warps = 4 if block >= 512 else (2 if block >= 256 else 1)
    return block, num_warps


def _float32_only(dtype: torch.dtype) -> None:
    if dtype == torch.float64:
        raise TypeError("the Triton gaussian_nll kernels compute in float32; for float64 use backend "
                        "'cpu', 'cuda' or 'reference'")


@triton_op("flowkern::gaussian_nll_fwd_triton", mutates_args=())
def _gaussian_nll_fwd_op(z: Tensor, logdet: Optional[Tensor], bits: bool) -> Tensor:
    _float32_only(z.dtype)
    rows, cols = rows_cols(z)
    nll = torch.empty((rows,), dtype=torch.float32, device=z.device)
    if rows == 0:
        return nll
    if cols == 0:  # no element: the sum is empty (and zero-size buffers stay away from the launcher)
        nll = -logdet if logdet is not None else torch.zeros_like(nll)
        return nll / 0.0 if bits else nll
    block, num_warps = _block_for(cols)
    wrap_triton(_gaussian_nll_fwd_kernel)[(rows,)](
        z,
        logdet if logdet is not None else nll,
        nll,
        cols,
        cols * _HALF_LOG_2PI,
        cols * math.log(2.0) if bits else 1.0,
        HAS_LOGDET=logdet is not None,
        BLOCK=block,
        num_warps=num_warps,
    )
    return nll


@triton_op("flowkern::gaussian_nll_bwd_triton", mutates_args=())
def _gaussian_nll_bwd_op(grad: Tensor, z: Tensor, bits: bool) -> Tensor:
    _float32_only(z.dtype)
    rows, cols = rows_cols(z)
    grad_z = torch.empty_like(z)
    if rows == 0 or cols == 0:
        return grad_z
    block, num_warps = _block_for(cols)
    wrap_triton(_gaussian_nll_bwd_kernel)[(rows,)](
        grad,
        z,
        grad_z,
        cols,
        cols * math.log(2.0) if bits else 1.0,
        BLOCK=block,
        num_warps=num_warps,
    )
    return grad_z


# Shape-only fakes, needed only when the kernels are interpreted (see _common).
def _fwd_fake(z, logdet, bits):
    return z.new_empty((z.shape[0],), dtype=torch.float32)


def _bwd_fake(grad, z, bits):
    return torch.empty_like(z)


register_interpreter_fakes(_gaussian_nll_fwd_kernel, [(_gaussian_nll_fwd_op, _fwd_fake),
                                                      (_gaussian_nll_bwd_op, _bwd_fake)])

register_row_vmap("flowkern::gaussian_nll_fwd_triton", FWD_TENSOR_ARGS)
register_row_vmap("flowkern::gaussian_nll_bwd_triton", BWD_TENSOR_ARGS)


@on_input_device
def gaussian_nll_fwd(z: Tensor, logdet: Optional[Tensor], bits: bool) -> Tensor:
    """The row NLL (B,), float32; the compiled op's signature."""
    return torch.ops.flowkern.gaussian_nll_fwd_triton(z, logdet, bool(bits))


@on_input_device
def gaussian_nll_bwd(grad: Tensor, z: Tensor, bits: bool) -> Tensor:
    """dL/dz, like z."""
    return torch.ops.flowkern.gaussian_nll_bwd_triton(grad, z, bool(bits))
