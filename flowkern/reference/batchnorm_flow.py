"""Pure-PyTorch definition of the batch-norm flow transform: the ground truth for its kernels.

With given per-channel statistics mean, var (C,) and learned log_gamma, beta (C,):

    forward:  y = (x - mean) / sqrt(var + eps) * exp(log_gamma) + beta
    inverse:  x = (y - beta) * exp(-log_gamma) * sqrt(var + eps) + mean
    logdet  = +-spatial_size * sum_c (log_gamma[c] - 0.5 * log(var[c] + eps))

x is (B, C) or (B, C, *spatial); spatial_size is prod(x.shape[2:]). Given the statistics the
map is a per-channel affine one, y = (x - mean) * exp(a) + beta with a = log_gamma - 0.5 log(var + eps),
which is how it is computed here (and how a fused kernel computes it: a (C,) pre-pass, then one
elementwise pass). Which statistics to use (the batch's in training, the running averages in
eval) is the layer's business, flowkern.nn.norm.BatchNormFlow; batch_stats_ref gives the batch's,
and batchnorm_flow_train_ref is the training-mode composite of the two.
Gradients flow to mean and var too, so the batch statistics can be differentiated through.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from .actnorm import channel_view_shape, compute_dtype, constant_row_logdet


def batch_stats_ref(x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-channel (mean, biased variance) of x (B, C, *spatial) over the batch and spatial dims,
    in x's dtype (accumulated in float32 for half types). The biased variance is the one
    training-mode normalisation uses (the running average takes the unbiased one).
    An empty batch gives NaN (the layer refuses it before getting here)."""
    dims = (0,) + tuple(range(2, x.dim()))
    var, mean = torch.var_mean(x.to(compute_dtype(x.dtype)), dim=dims, correction=0)
    return mean.to(x.dtype), var.to(x.dtype)


def batchnorm_flow_ref(
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
    """Reference batch-norm flow with given statistics; same signature and result as
    flowkern.ops.batchnorm_flow."""
    dtype = compute_dtype(x.dtype)
    shape = channel_view_shape(x)
    # log of the per-channel scale: the log-det's summand and the elementwise factor.
    log_scale = log_gamma.to(dtype) - 0.5 * torch.log(var.to(dtype) + eps)
    s = log_scale.reshape(shape)
    m = mean.to(dtype).reshape(shape)
    b = beta.to(dtype).reshape(shape)
    xs = x.to(dtype)
    if inverse:
        out = (xs - b) * torch.exp(-s) + m
    else:
        out = (xs - m) * torch.exp(s) + b
    ld = constant_row_logdet(log_scale, x, -1.0 if inverse else 1.0, logdet)
    return out.to(x.dtype), ld


def batchnorm_flow_train_ref(
    x: torch.Tensor,
    log_gamma: torch.Tensor,
    beta: torch.Tensor,
    *,
    eps: float = 1e-5,
    logdet: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Reference training-mode batch-norm flow: x normalised by its own statistics,
    batchnorm_flow_ref(x, *batch_stats_ref(x), ...), differentiated through the statistics.
    Returns (out, logdet, mean, var) with mean and var detached; same signature and result as
    flowkern.ops.batchnorm_flow_train."""
    dims = (0,) + tuple(range(2, x.dim()))
    # One cast feeds both the statistics and the map, so x's two gradient paths meet in the
    # compute dtype: cast twice, each path's gradient was rounded to float16 on its own, where
    # the two large, cancelling terms of a small-spread channel overflow to inf - inf = NaN.
    xs = x.to(compute_dtype(x.dtype))
    var, mean = torch.var_mean(xs, dim=dims, correction=0)
    # The map uses the statistics rounded to x's dtype (batch_stats_ref's values), but the
    # gradient flows through them in the compute dtype: in float16, d/dvar = -1 / (2 (var + eps))
    # overflows for a constant channel (var = 0) and turned every input gradient into NaN.
    mean = mean + (mean.to(x.dtype).to(mean.dtype) - mean).detach()
    var = var + (var.to(x.dtype).to(var.dtype) - var).detach()
    out, ld = batchnorm_flow_ref(xs, mean, var, log_gamma, beta, eps=eps, logdet=logdet)
    return out.to(x.dtype), ld, mean.detach().to(x.dtype), var.detach().to(x.dtype)
