"""flowkern.ops.actnorm: Glow's activation normalisation, a per-channel affine map, with its log-det.

    forward:  y = (x + shift) * exp(log_scale)     logdet = spatial_size * sum_c log_scale[c]
    inverse:  x = y * exp(-log_scale) - shift      logdet = -spatial_size * sum_c log_scale[c]

(Glow's convention: shift, then scale.) x is (B, C) or (B, C, *spatial); shift and log_scale are
(C,); spatial_size = prod(x.shape[2:]).

Backends: the compiled kernels (csrc/math/channel_affine.h for CPU and CUDA) and the Triton
kernels (flowkern/triton/channel_affine.py) make one elementwise pass over x and add the log-det
(the same for every row) into the caller's running `logdet`; the backward needs only the op's
OUTPUT (kept by the next layer anyway) and reduces the parameter gradients over batch and space
deterministically (fixed chunks summed in a fixed order: bit-identical run to run). The
"reference" backend runs flowkern.reference.actnorm.actnorm_ref under autograd.

This module also holds what the per-channel ops share (the batch-norm flow imports it): the
backend resolution and the vmap rule of their kernel ops.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch

from .. import _ext
from .._backend import kernel_dtype, kernel_inputs, resolve_op
from ..reference.actnorm import actnorm_ref
from . import _checks
from ._autograd import apply, contiguous_grads, kernel_functions


def register_channel_vmap(op_name: str, tensor_args: Sequence[int], row_args: Sequence[int] = ()) -> None:
    """vmap (torch.func) rule for a per-channel kernel op.

    The (C,) parameters are shared by every row and the backward reduces over the rows, so a
    vmapped dim cannot in general fold into the rows as in _vmap.register_row_vmap. When only the
    arguments in `row_args` (x and the running log-det of a forward) are batched, it does fold:
    one launch. Otherwise the op runs once per vmapped slice (a Python loop: correct, one launch
    per slice; jacrev of an n-feature map makes n).
    """
    tensor_args, row_args = frozenset(tensor_args), frozenset(row_args)
    op = getattr(torch.ops.flowkern, op_name.split("::")[1])

    def rule(info, in_dims, *args):
        size = info.batch_size
        batched = {i for i, d in enumerate(in_dims) if d is not None and i in tensor_args}
        if not batched:
            outs = op(*args)
            return outs, (None,) * len(outs)
        if batched <= row_args:
            folded = []
            for i, (a, d) in enumerate(zip(args, in_dims)):
                if i in row_args and a is not None:
                    a = a.movedim(d, 0) if d is not None else a.expand(size, *a.shape)
                    a = a.reshape(size * a.shape[1], *a.shape[2:]).contiguous()
                folded.append(a)
            outs = op(*folded)
            return tuple(o.reshape(size, o.shape[0] // size, *o.shape[1:]) for o in outs), (0,) * len(outs)
        per_slice = []
        for v in range(size):
            sliced = [a.select(d, v).contiguous() if (d is not None and i in tensor_args and a is not None) else a
                      for i, (a, d) in enumerate(zip(args, in_dims))]
            per_slice.append(op(*sliced))
        outs = tuple(torch.stack(parts) for parts in zip(*per_slice))
        return outs, (0,) * len(outs)

    torch.library.register_vmap(op_name, rule)


def _kernels(impl: str):
    if impl == "compiled":
        return torch.ops.flowkern.actnorm_fwd, torch.ops.flowkern.actnorm_bwd
    from ..triton import channel_affine as tk

    return tk.actnorm_fwd, tk.actnorm_bwd


def _run(x, shift, log_scale, logdet, inverse, impl):
    return _kernels(impl)[0](x, shift, log_scale, inverse, logdet)


def _save(ctx, inputs, outputs):
    _, shift, log_scale, logdet, inverse, impl = inputs
    # The output, not the input: the backward needs only it, and the next layer keeps it anyway.
    ctx.save_for_backward(outputs[0], shift, log_scale)
    ctx.config = (inverse, impl)
    ctx.has_logdet = logdet is not None


def _backward(ctx, grad_out, grad_logdet):
    out, shift, log_scale = ctx.saved_tensors
    inverse, impl = ctx.config
    grad_out, grad_logdet = contiguous_grads(grad_out, grad_logdet, out)
    grad_in, grad_shift, grad_log_scale = _kernels(impl)[1](grad_out, grad_logdet, out, shift, log_scale, inverse)
    return grad_in, grad_shift, grad_log_scale, (grad_logdet if ctx.has_logdet else None), None, None


_FUNCTIONS = kernel_functions("ActNormFunction", _run, _save, _backward)


def actnorm(
    x: torch.Tensor,
    shift: torch.Tensor,
    log_scale: torch.Tensor,
    *,
    inverse: bool = False,
    logdet: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """ActNorm of x (B, C, *spatial) by per-channel shift and log_scale (C,).

    Returns (out, logdet): out has x's shape and dtype; logdet has shape (B,), float32 (float64
    for float64 input), spatial_size * sum(log_scale) for every row, added to `logdet` when one
    is given. inverse=True applies the inverse map with the negated log-det. Gradients flow to
    x, shift, log_scale and the running logdet.
    """
    _checks.channel_input(x)
    _checks.per_channel("shift", shift, x)
    _checks.per_channel("log_scale", log_scale, x)
    logdet = _checks.running_logdet(logdet, x)
    inverse = _checks.flag("inverse", inverse)
    impl = resolve_op(x.device, x.dtype, "actnorm_fwd")
    if impl == "reference":
        return actnorm_ref(x, shift, log_scale, inverse=inverse, logdet=logdet)
    dtype = x.dtype
    x, shift, log_scale = kernel_inputs(kernel_dtype(impl, x.device, x.dtype), x, shift, log_scale)
    out, ld = apply(_FUNCTIONS, _run, (x, shift, log_scale, logdet), x, shift, log_scale, logdet, inverse, impl)
    return (out if out.dtype == dtype else out.to(dtype)), ld


# Positions of the tensor arguments of the fwd / bwd kernel ops (compiled and Triton alike).
FWD_TENSOR_ARGS, FWD_ROW_ARGS = (0, 1, 2, 4), (0, 4)
BWD_TENSOR_ARGS = (0, 1, 2, 3, 4)


def _register_compiled() -> None:
    if not _ext.has_op("actnorm_fwd"):
        return

    @torch.library.register_fake("flowkern::actnorm_fwd")
    def _fwd_fake(x, shift, log_scale, inverse, logdet):
        return torch.empty_like(x), x.new_empty((x.shape[0],), dtype=_checks.logdet_dtype(x.dtype))

    @torch.library.register_fake("flowkern::actnorm_bwd")
    def _bwd_fake(grad_out, grad_logdet, out, shift, log_scale, inverse):
        return torch.empty_like(out), torch.empty_like(shift), torch.empty_like(log_scale)

    register_channel_vmap("flowkern::actnorm_fwd", FWD_TENSOR_ARGS, FWD_ROW_ARGS)
    register_channel_vmap("flowkern::actnorm_bwd", BWD_TENSOR_ARGS)


_register_compiled()
