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
from .._backend import resolve_op
from ..reference.affine_coupling import SCALES, affine_coupling_ref
from . import _checks
from ._autograd import apply, contiguous_grads, kernel_functions, needs_grad, under_functorch_or_forward_ad
from ._vmap import register_row_vmap

SCALE_MODES = {name: i for i, name in enumerate(SCALES)}  # the kernels' mode numbers


def _kernels(impl: str):
    if impl == "compiled":
        return torch.ops.flowkern.affine_coupling_fwd, torch.ops.flowkern.affine_coupling_bwd
    from ..triton import affine_coupling as tk

    return tk.affine_coupling_fwd, tk.affine_coupling_bwd


# Where the forward saves the factor m (1/m going back) for the backward instead of the raw
# scale: on the CPU, exp/log dominate and the saved factor spares the backward its
# transcendentals; on a GPU the recompute is free and the extra tensor would cost bandwidth.
SAVE_FACTOR_ON = {"cpu"}


def _run(x, shift, scale_raw, logdet, mode, clamp, inverse, impl, save_factor):
    return _kernels(impl)[0](x, shift, scale_raw, mode, clamp, inverse, logdet, save_factor)


def _save(ctx, inputs, outputs):
    x, _, scale_raw, logdet, mode, clamp, inverse, impl, save_factor = inputs
    out, _, factor = outputs
    # The backward needs x: the input going forward, the output going back.
    ctx.save_for_backward(out if inverse else x, factor if save_factor else scale_raw)
    ctx.config = (save_factor, mode, clamp, inverse, impl)
    ctx.has_logdet = logdet is not None


def _backward(ctx, grad_out, grad_logdet):
    saved, scale_or_factor = ctx.saved_tensors
    is_factor, mode, clamp, inverse, impl = ctx.config
    grad_out, grad_logdet = contiguous_grads(grad_out, grad_logdet, saved)
    grad_in, grad_s = _kernels(impl)[1](grad_out, grad_logdet, saved, scale_or_factor, is_factor, mode, clamp,
                                        inverse)
    grad_shift = -grad_in if inverse else grad_out
    return grad_in, grad_shift, grad_s, (grad_logdet if ctx.has_logdet else None), None, None, None, None, None


_FUNCTIONS = kernel_functions("AffineCouplingFunction", _run, _save, _backward)


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
    impl = resolve_op(x.device, x.dtype, "affine_coupling_fwd")
    if impl == "reference":
        return affine_coupling_ref(x, shift, scale_raw, scale=scale, clamp=clamp, inverse=bool(inverse), logdet=logdet)
    dtype = x.dtype
    if impl == "compiled" and x.device.type == "cpu" and dtype not in (torch.float32, torch.float64):
        # The CPU kernels are float32/float64; half types compute in float32 and round once.
        x, shift, scale_raw = x.float(), shift.float(), scale_raw.float()
    x, shift, scale_raw = x.contiguous(), shift.contiguous(), scale_raw.contiguous()
    mode, inverse = SCALE_MODES[scale], bool(inverse)
    # A saved tanh factor exp(+-clamp) over/underflows float32 past clamp ~ 87, and the backward
    # takes log(factor): there, recompute from s.
    save_factor = (x.device.type in SAVE_FACTOR_ON and not (scale == "tanh" and clamp > 80.0)
                   and (needs_grad(x, shift, scale_raw) or under_functorch_or_forward_ad(x, shift, scale_raw)))
    out, ld = apply(_FUNCTIONS, _run, (x, shift, scale_raw, logdet),
                    x, shift, scale_raw, logdet, mode, clamp, inverse, impl, save_factor)
    return out.to(dtype), ld


# Positions of the tensor arguments of the fwd / bwd kernel ops (both the compiled and the
# Triton ones share these schemas), for their vmap rules.
FWD_TENSOR_ARGS = (0, 1, 2, 6)
BWD_TENSOR_ARGS = (0, 1, 2, 3)


def _register_fakes() -> None:
    if not _ext.available():
        return
    register_row_vmap("flowkern::affine_coupling_fwd", FWD_TENSOR_ARGS)
    register_row_vmap("flowkern::affine_coupling_bwd", BWD_TENSOR_ARGS)

    @torch.library.register_fake("flowkern::affine_coupling_fwd")
    def _fwd_fake(x, shift, scale_raw, mode, clamp, inverse, logdet, save_factor):
        factor = torch.empty_like(x) if save_factor else x.new_empty((0,))
        return torch.empty_like(x), x.new_empty((x.shape[0],), dtype=_checks.logdet_dtype(x.dtype)), factor

    @torch.library.register_fake("flowkern::affine_coupling_bwd")
    def _bwd_fake(grad_out, grad_logdet, saved, scale_or_factor, is_factor, mode, clamp, inverse):
        return torch.empty_like(saved), torch.empty_like(saved)


_register_fakes()
