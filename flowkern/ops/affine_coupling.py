"""flowkern.ops.affine_coupling: the affine coupling transform with its log-det, fused.

    scale="exp":     m = exp(s)
    scale="sigmoid": m = sigmoid(s + 2) + 1e-3          (nflows / Glow)
    scale="tanh":    m = exp(clamp * tanh(s / clamp))   (soft-clamped exp)
    forward:  y = x * m + t,      logdet = sum over non-batch dims of log m
    inverse:  x = (y - t) / m,    logdet = -sum log m

One autograd.Function serves the compiled (C++/CUDA) and Triton kernels; the "reference"
backend runs flowkern.reference.affine_coupling_ref and lets autograd differentiate it.
The compiled ops are registered torch ops with fake implementations, so
torch.compile(fullgraph=True) traces through them.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from .. import _ext
from .._backend import resolve
from ..reference.affine_coupling import SCALES, affine_coupling_ref
from . import _checks

SCALE_MODES = {name: i for i, name in enumerate(SCALES)}  # the kernels' mode numbers


def _kernels(impl: str):
    if impl == "compiled":
        return torch.ops.flowkern.affine_coupling_fwd, torch.ops.flowkern.affine_coupling_bwd
    from ..triton import affine_coupling as tk

    return tk.affine_coupling_fwd, tk.affine_coupling_bwd


class _AffineCouplingFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, shift, scale_raw, logdet, mode: int, clamp: float, inverse: bool, impl: str):
        fwd, _ = _kernels(impl)
        out, ld = fwd(x, shift, scale_raw, mode, clamp, inverse, logdet)
        # The backward needs x: the input going forward, the output going back.
        ctx.save_for_backward(out if inverse else x, scale_raw)
        ctx.config = (mode, clamp, inverse, impl)
        ctx.has_logdet = logdet is not None
        return out, ld

    @staticmethod
    def backward(ctx, grad_out, grad_logdet):
        saved, scale_raw = ctx.saved_tensors
        mode, clamp, inverse, impl = ctx.config
        _, bwd = _kernels(impl)
        grad_out = grad_out.contiguous()
        grad_logdet = grad_logdet.contiguous()  # often an expanded scalar from .sum()
        grad_in, grad_s = bwd(grad_out, grad_logdet, saved, scale_raw, mode, clamp, inverse)
        grad_shift = -grad_in if inverse else grad_out
        return grad_in, grad_shift, grad_s, (grad_logdet if ctx.has_logdet else None), None, None, None, None


def affine_coupling(
    x: torch.Tensor,
    shift: torch.Tensor,
    scale_raw: torch.Tensor,
    *,
    scale: str = "exp",
    clamp: float = 2.0,
    inverse: bool = False,
    logdet: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Affine coupling transform of x (B, ...) by shift and raw scale of the same shape.

    Returns (out, logdet): out has x's shape and dtype; logdet has shape (B,), float32
    (float64 for float64 input), summed over all non-batch dims and added to `logdet` when
    one is given. inverse=True applies the inverse map with the negated log-det.
    """
    _checks.tensor("x", x)
    _checks.like("shift", shift, "x", x)
    _checks.like("scale_raw", scale_raw, "x", x)
    _checks.choice("scale", scale, SCALES)
    clamp = _checks.positive("clamp", clamp)
    logdet = _checks.running_logdet(logdet, x)
    impl = resolve(x.device)
    if impl == "reference":
        return affine_coupling_ref(x, shift, scale_raw, scale=scale, clamp=clamp, inverse=bool(inverse), logdet=logdet)
    dtype = x.dtype
    if impl == "compiled" and x.device.type == "cpu" and dtype not in (torch.float32, torch.float64):
        # The CPU kernels are float32/float64; half types compute in float32 and round once.
        x, shift, scale_raw = x.float(), shift.float(), scale_raw.float()
    out, ld = _AffineCouplingFn.apply(x.contiguous(), shift.contiguous(), scale_raw.contiguous(), logdet,
                                      SCALE_MODES[scale], clamp, bool(inverse), impl)
    return out.to(dtype), ld


def _register_fakes() -> None:
    if not _ext.available():
        return

    @torch.library.register_fake("flowkern::affine_coupling_fwd")
    def _fwd_fake(x, shift, scale_raw, mode, clamp, inverse, logdet):
        return torch.empty_like(x), x.new_empty((x.shape[0],), dtype=_checks.logdet_dtype(x.dtype))

    @torch.library.register_fake("flowkern::affine_coupling_bwd")
    def _bwd_fake(grad_out, grad_logdet, saved, scale_raw, mode, clamp, inverse):
        return torch.empty_like(saved), torch.empty_like(saved)


_register_fakes()
