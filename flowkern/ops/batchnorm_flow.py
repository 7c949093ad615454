"""flowkern.ops.batchnorm_flow: batch normalisation as an invertible map, with its log-det.

With given per-channel statistics mean, var (C,) and learned log_gamma, beta (C,):

    forward:  y = (x - mean) / sqrt(var + eps) * exp(log_gamma) + beta
    inverse:  x = (y - beta) * exp(-log_gamma) * sqrt(var + eps) + mean
    logdet  = +-spatial_size * sum_c (log_gamma[c] - 0.5 * log(var[c] + eps))

x is (B, C) or (B, C, *spatial); spatial_size = prod(x.shape[2:]). The op applies the statistics
it is given; batch_stats(x) computes a batch's (mean, biased variance), differentiably, for
training-mode normalisation. The layer, flowkern.nn.norm.BatchNormFlow, chooses between batch
and running statistics. var must be >= 0 (not checked: that would cost a device sync).

Implementation status: for now every backend runs the pure-PyTorch reference
(flowkern.reference.batchnorm_flow; autograd does the backward, including the gradients to mean
and var), so the backend switch does not change these ops yet. Fused C++/CUDA/Triton kernels
arrive later behind these same signatures: a (C,) pre-pass for the per-channel scale, one
elementwise pass over x, and the per-row log-det added into the caller's running `logdet`.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch

from ..reference.batchnorm_flow import batch_stats_ref, batchnorm_flow_ref
from . import _checks


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
    inverse=True applies the inverse map with the negated log-det.
    """
    _checks.channel_input(x)
    _checks.per_channel("mean", mean, x)
    _checks.per_channel("var", var, x)
    _checks.per_channel("log_gamma", log_gamma, x)
    _checks.per_channel("beta", beta, x)
    eps = _checks.positive("eps", eps)
    logdet = _checks.running_logdet(logdet, x)
    return batchnorm_flow_ref(x, mean, var, log_gamma, beta, eps=eps, inverse=bool(inverse), logdet=logdet)


def batch_stats(x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-channel (mean, biased variance) of x (B, C, *spatial) over the batch and spatial
    dims, both (C,) in x's dtype, differentiable. x needs at least one value per channel."""
    _checks.channel_input(x)
    if x.shape[0] * math.prod(x.shape[2:]) == 0:
        raise ValueError(f"x must have at least one value per channel to take statistics, got shape {tuple(x.shape)}")
    return batch_stats_ref(x)
