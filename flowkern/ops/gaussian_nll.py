"""flowkern.ops.gaussian_nll: a flow's negative log-likelihood under its N(0, I) base, fused.

    nll = 0.5 sum z^2 + (D / 2) log(2 pi) - logdet        per row, D = prod(z.shape[1:])
    bits_per_dim=True:  nll / (D ln 2)

One reduction pass over the latent in place of the reference's square, sum, add and subtract
(Flow.log_prob and Flow.bits_per_dim use it when the base is StandardNormal). The compiled
(C++/CUDA) and Triton kernels run under one autograd.Function with an analytic backward
(dL/dz = g z, dL/d(logdet) = -g, divided by D ln 2 for bits); the "reference" backend runs
flowkern.reference.gaussian_nll_ref under autograd. The compiled ops are registered torch ops
with fake implementations, so torch.compile(fullgraph=True) traces through them.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from .. import _ext
from .._backend import kernel_dtype, kernel_inputs, resolve_op
from ..reference.gaussian_nll import gaussian_nll_ref
from . import _checks
from ._autograd import first_order_backward, needs_grad, under_functorch_or_forward_ad
from ._vmap import register_row_vmap


def _kernels(impl: str):
    if impl == "compiled":
        return torch.ops.flowkern.gaussian_nll_fwd, torch.ops.flowkern.gaussian_nll_bwd
    from ..triton import gaussian_nll as tk

    return tk.gaussian_nll_fwd, tk.gaussian_nll_bwd


def _run(z, logdet, bits, impl):
    return _kernels(impl)[0](z, logdet, bits)


def _save(ctx, inputs):
    z, logdet, bits, impl = inputs
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(z)
    ctx.config = (bits, impl)
    ctx.has_logdet = logdet is not None


@first_order_backward("GaussianNLLFunction")
def _backward(ctx, grad):
    (z,) = ctx.saved_tensors
    bits, impl = ctx.config
    if grad is None:
        return None, None, None, None
    grad = grad.contiguous()
    grad_z = _kernels(impl)[1](grad, z, bits) if ctx.needs_input_grad[0] else None
    grad_logdet = None
    if ctx.has_logdet and ctx.needs_input_grad[1]:
        grad_logdet = -grad / (math.prod(z.shape[1:]) * math.log(2.0)) if bits else -grad
    return grad_z, grad_logdet, None, None


# The everyday Function (ctx in forward: no per-call signature binding) and the one torch.func
# transforms need (setup_context, vmap through the kernel ops' rules); see ops/_autograd.py.
class GaussianNLLFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, *inputs):
        _save(ctx, inputs)
        return _run(*inputs)

    backward = staticmethod(_backward)


class GaussianNLLFunctionFunc(torch.autograd.Function):
    generate_vmap_rule = True

    @staticmethod
    def forward(*inputs):
        return _run(*inputs)

    @staticmethod
    def setup_context(ctx, inputs, output):
        _save(ctx, inputs)

    backward = staticmethod(_backward)


def gaussian_nll(z: torch.Tensor, logdet: Optional[torch.Tensor] = None, *,
                 bits_per_dim: bool = False) -> torch.Tensor:
    """Negative log-likelihood per row of data whose latent is z (B, ...) under N(0, I).

    nll = 0.5 sum z^2 + (D / 2) log(2 pi) - logdet, D = prod(z.shape[1:]); with
    bits_per_dim=True divided by D ln 2 (bits/dim when D counts the data's values, e.g. the
    pixels of a flow that starts with dequantization). logdet: the flow's log|det dz/dx|, (B,),
    optional (0). Returns (B,) float32 (float64 for float64 z; half z is summed in float32),
    differentiable in z and logdet: -gaussian_nll(z, logdet) is Flow.log_prob.
    """
    _checks.tensor("z", z)
    logdet = _checks.running_logdet(logdet, z)
    bits = _checks.flag("bits_per_dim", bits_per_dim)
    if bits and math.prod(z.shape[1:]) == 0:
        raise ValueError(f"bits_per_dim needs at least one element per row, got z of shape {tuple(z.shape)}")
    impl = resolve_op(z.device, z.dtype, "gaussian_nll_fwd")
    if impl == "reference":
        return gaussian_nll_ref(z, logdet, bits_per_dim=bits)
    z, = kernel_inputs(kernel_dtype(impl, z.device, z.dtype), z)
    inputs = (z, logdet, bits, impl)
    if under_functorch_or_forward_ad(z, logdet):
        return GaussianNLLFunctionFunc.apply(*inputs)
    if needs_grad(z, logdet):
        return GaussianNLLFunction.apply(*inputs)
    return _run(*inputs)  # inference: no autograd node, nothing saved


# Positions of the tensor arguments of the fwd / bwd kernel ops (compiled and Triton alike).
FWD_TENSOR_ARGS = (0, 1)
BWD_TENSOR_ARGS = (0, 1)


def _register_compiled() -> None:
    if not _ext.has_op("gaussian_nll_fwd"):
        return

    @torch.library.register_fake("flowkern::gaussian_nll_fwd")
    def _fwd_fake(z, logdet, bits):
        return z.new_empty((z.shape[0],), dtype=_checks.logdet_dtype(z.dtype))

    @torch.library.register_fake("flowkern::gaussian_nll_bwd")
    def _bwd_fake(grad, z, bits):
        return torch.empty_like(z)

    register_row_vmap("flowkern::gaussian_nll_fwd", FWD_TENSOR_ARGS)
    register_row_vmap("flowkern::gaussian_nll_bwd", BWD_TENSOR_ARGS)


_register_compiled()
