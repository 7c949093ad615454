"""flowkern.ops.batchnorm_flow: batch normalisation as an invertible map, with its log-det.

With given per-channel statistics mean, var (C,) and learned log_gamma, beta (C,):

    forward:  y = (x - mean) / sqrt(var + eps) * exp(log_gamma) + beta
    inverse:  x = (y - beta) * exp(-log_gamma) * sqrt(var + eps) + mean
    logdet  = +-spatial_size * sum_c (log_gamma[c] - 0.5 * log(var[c] + eps))

x is (B, C) or (B, C, *spatial); spatial_size = prod(x.shape[2:]). var must be >= 0 (not
checked: that would cost a device sync).

- batchnorm_flow applies the statistics it is given; gradients flow to all of x, mean, var,
  log_gamma, beta (and the running logdet), so statistics computed differentiably elsewhere
  can be trained through.
- batchnorm_flow_train is the training-mode forward: the batch's own statistics (biased
  variance) and the map in one kernel pair (batch_stats, then the map) under ONE autograd node,
  whose backward includes the paths through the statistics (the gradient of
  batchnorm_flow(x, *batch_stats(x), ...)); it also returns the statistics, detached, for the
  running averages.
- batch_stats gives a batch's (mean, biased variance): the kernel when no gradient is needed,
  the differentiable reference otherwise.

The layer, flowkern.nn.norm.BatchNormFlow, chooses between batch and running statistics.

Backends: the compiled kernels (csrc/math/channel_affine.h for CPU and CUDA) and the Triton
kernels (flowkern/triton/channel_affine.py): a (C,) pre-pass for the per-channel scale, one
elementwise pass over x with the per-row log-det added into the caller's running `logdet`, a
backward from the op's output with deterministic per-channel reductions (bit-identical run to
run). The "reference" backend runs flowkern.reference.batchnorm_flow under autograd.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch

from .. import _ext
from .._backend import kernel_dtype, kernel_inputs, resolve_op
from ..reference.batchnorm_flow import batch_stats_ref, batchnorm_flow_ref, batchnorm_flow_train_ref
from . import _checks
from ._autograd import apply, contiguous_grads, kernel_functions, needs_grad, under_functorch_or_forward_ad
from .actnorm import register_channel_vmap


def _kernels(impl: str):
    if impl == "compiled":
        return torch.ops.flowkern.batchnorm_flow_fwd, torch.ops.flowkern.batchnorm_flow_bwd
    from ..triton import channel_affine as tk

    return tk.batchnorm_flow_fwd, tk.batchnorm_flow_bwd


def _stats_kernel(impl: str):
    if impl == "compiled":
        return torch.ops.flowkern.batch_stats
    from ..triton import channel_affine as tk

    return tk.batch_stats


# --- given statistics ----------------------------------------------------------------------------

def _run(x, mean, var, log_gamma, beta, logdet, eps, inverse, impl):
    return _kernels(impl)[0](x, mean, var, log_gamma, beta, eps, inverse, logdet)


def _save(ctx, inputs, outputs):
    _, mean, var, log_gamma, beta, logdet, eps, inverse, impl = inputs
    ctx.save_for_backward(outputs[0], mean, var, log_gamma, beta)  # the output: see ops.actnorm
    ctx.config = (eps, inverse, impl)
    ctx.has_logdet = logdet is not None


def _backward(ctx, grad_out, grad_logdet):
    out, mean, var, log_gamma, beta = ctx.saved_tensors
    eps, inverse, impl = ctx.config
    grad_out, grad_logdet = contiguous_grads(grad_out, grad_logdet, out)
    grads = _kernels(impl)[1](grad_out, grad_logdet, out, mean, var, log_gamma, beta, eps, inverse, False)
    return (*grads, (grad_logdet if ctx.has_logdet else None), None, None, None)


_FUNCTIONS = kernel_functions("BatchNormFlowFunction", _run, _save, _backward)


# --- training mode: batch statistics --------------------------------------------------------------

def _run_train(x, mean, var, log_gamma, beta, logdet, eps, impl):
    return _kernels(impl)[0](x, mean, var, log_gamma, beta, eps, False, logdet)


def _save_train(ctx, inputs, outputs):
    _, mean, var, log_gamma, beta, logdet, eps, impl = inputs
    ctx.save_for_backward(outputs[0], mean, var, log_gamma, beta)
    ctx.config = (eps, impl)
    ctx.has_logdet = logdet is not None


def _backward_train(ctx, grad_out, grad_logdet):
    out, mean, var, log_gamma, beta = ctx.saved_tensors
    eps, impl = ctx.config
    grad_out, grad_logdet = contiguous_grads(grad_out, grad_logdet, out)
    grad_x, _, _, grad_log_gamma, grad_beta = _kernels(impl)[1](grad_out, grad_logdet, out, mean, var, log_gamma,
                                                                beta, eps, False, True)
    # mean and var are x's statistics: their paths are in grad_x, they get no gradient of their own.
    return (grad_x, None, None, grad_log_gamma, grad_beta, (grad_logdet if ctx.has_logdet else None), None, None)


_TRAIN_FUNCTIONS = kernel_functions("BatchNormFlowTrainFunction", _run_train, _save_train, _backward_train)


def _check_params(x, **params) -> None:
    for name, value in params.items():
        _checks.per_channel(name, value, x)


def _check_values_per_channel(x: torch.Tensor) -> None:
    if x.shape[0] * math.prod(x.shape[2:]) == 0:
        raise ValueError(f"x must have at least one value per channel to take statistics, got shape {tuple(x.shape)}")


def batchnorm_flow(
    x: torch.Tensor,
    mean: torch.Tensor,
    var: torch.Tensor,
    log_gamma: torch.Tensor,
    beta: torch.Tensor,
    *,
    eps: float = 1e-5,
    inverse: bool = False,
    logdet: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Batch-norm flow of x (B, C, *spatial) with the given statistics and parameters (all (C,)).

    Returns (out, logdet): out has x's shape and dtype; logdet has shape (B,), float32 (float64
    for float64 input), the same for every row, added to `logdet` when one is given.
    inverse=True applies the inverse map with the negated log-det. Gradients flow to x, mean,
    var, log_gamma, beta and the running logdet.
    """
    _checks.channel_input(x)
    _check_params(x, mean=mean, var=var, log_gamma=log_gamma, beta=beta)
    eps = _checks.positive("eps", eps)
    logdet = _checks.running_logdet(logdet, x)
    inverse = _checks.flag("inverse", inverse)
    impl = resolve_op(x.device, x.dtype, "batchnorm_flow_fwd")
    if impl == "reference":
        return batchnorm_flow_ref(x, mean, var, log_gamma, beta, eps=eps, inverse=inverse, logdet=logdet)
    dtype = x.dtype
    x, mean, var, log_gamma, beta = kernel_inputs(kernel_dtype(impl, x.device, x.dtype), x, mean, var, log_gamma, beta)
    out, ld = apply(_FUNCTIONS, _run, (x, mean, var, log_gamma, beta, logdet),
                    x, mean, var, log_gamma, beta, logdet, eps, inverse, impl)
    return (out if out.dtype == dtype else out.to(dtype)), ld


def batchnorm_flow_train(
    x: torch.Tensor,
    log_gamma: torch.Tensor,
    beta: torch.Tensor,
    *,
    eps: float = 1e-5,
    logdet: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Training-mode batch-norm flow of x (B, C, *spatial): normalised by its own statistics.

    Returns (out, logdet, mean, var): out and logdet as batchnorm_flow(x, mean, var, log_gamma,
    beta) with (mean, var) = batch_stats(x), the biased statistics, and its gradient (to x,
    log_gamma, beta and the running logdet) is that composite's, through the statistics; mean
    and var (C,), in x's dtype, are returned detached, for the running averages. x needs at
    least one value per channel (batch * spatial size >= 1).
    """
    _checks.channel_input(x)
    _check_params(x, log_gamma=log_gamma, beta=beta)
    eps = _checks.positive("eps", eps)
    logdet = _checks.running_logdet(logdet, x)
    _check_values_per_channel(x)
    impl = resolve_op(x.device, x.dtype, "batchnorm_flow_fwd")
    if impl == "reference":
        return batchnorm_flow_train_ref(x, log_gamma, beta, eps=eps, logdet=logdet)
    dtype = x.dtype
    x, log_gamma, beta = kernel_inputs(kernel_dtype(impl, x.device, x.dtype), x, log_gamma, beta)
    with torch.no_grad():
        mean, var = _stats_kernel(impl)(x.detach())
    out, ld = apply(_TRAIN_FUNCTIONS, _run_train, (x, log_gamma, beta, logdet),
                    x, mean, var, log_gamma, beta, logdet, eps, impl)
    if out.dtype != dtype:
        out, mean, var = out.to(dtype), mean.to(dtype), var.to(dtype)
    return out, ld, mean, var


def batch_stats(x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-channel (mean, biased variance) of x (B, C, *spatial) over the batch and spatial
    dims, both (C,) in x's dtype (accumulated in float32 or wider for half types), differentiable.
    x needs at least one value per channel.

    Without a gradient to carry (no_grad, or x not requiring grad) the deterministic kernel runs
    (two passes, float64 partial sums); otherwise the reference, which autograd differentiates."""
    _checks.channel_input(x)
    _check_values_per_channel(x)
    if needs_grad(x) or under_functorch_or_forward_ad(x):
        return batch_stats_ref(x)
    impl = resolve_op(x.device, x.dtype, "batch_stats")
    if impl == "reference":
        return batch_stats_ref(x)
    mean, var = _stats_kernel(impl)(*kernel_inputs(kernel_dtype(impl, x.device, x.dtype), x))
    return (mean, var) if mean.dtype == x.dtype else (mean.to(x.dtype), var.to(x.dtype))


# Positions of the tensor arguments of the kernel ops (compiled and Triton alike).
FWD_TENSOR_ARGS, FWD_ROW_ARGS = (0, 1, 2, 3, 4, 7), (0, 7)
BWD_TENSOR_ARGS = (0, 1, 2, 3, 4, 5, 6)
STATS_TENSOR_ARGS = (0,)


def _register_compiled() -> None:
    if not _ext.has_op("batchnorm_flow_fwd"):
        return

    @torch.library.register_fake("flowkern::batch_stats")
    def _stats_fake(x):
        return x.new_empty((x.shape[1],)), x.new_empty((x.shape[1],))

    @torch.library.register_fake("flowkern::batchnorm_flow_fwd")
    def _fwd_fake(x, mean, var, log_gamma, beta, eps, inverse, logdet):
        return torch.empty_like(x), x.new_empty((x.shape[0],), dtype=_checks.logdet_dtype(x.dtype))

    @torch.library.register_fake("flowkern::batchnorm_flow_bwd")
    def _bwd_fake(grad_out, grad_logdet, out, mean, var, log_gamma, beta, eps, inverse, batch_stats):
        stat_grad = (lambda t: t.new_empty((0,))) if batch_stats else torch.empty_like
        return (torch.empty_like(out), stat_grad(mean), stat_grad(var), torch.empty_like(log_gamma),
                torch.empty_like(beta))

    register_channel_vmap("flowkern::batch_stats", STATS_TENSOR_ARGS)
    register_channel_vmap("flowkern::batchnorm_flow_fwd", FWD_TENSOR_ARGS, FWD_ROW_ARGS)
    register_channel_vmap("flowkern::batchnorm_flow_bwd", BWD_TENSOR_ARGS)


_register_compiled()
