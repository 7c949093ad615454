"""flowkern.ops.actnorm: Glow's activation normalisation, a per-channel affine map, with its log-det.

    forward:  y = (x + shift) * exp(log_scale)     logdet = spatial_size * sum_c log_scale[c]
    inverse:  x = y * exp(-log_scale) - shift      logdet = -spatial_size * sum_c log_scale[c]

(Glow's convention: shift, then scale.) x is (B, C) or (B, C, *spatial); shift and log_scale are
(C,); spatial_size = prod(x.shape[2:]).

Implementation status: for now every backend runs the pure-PyTorch reference
(flowkern.reference.actnorm.actnorm_ref; autograd does the backward), so the backend switch
does not change this op yet. Fused C++/CUDA/Triton kernels arrive later behind this same
signature: one elementwise pass over x, and the per-row log-det (the same for every row) added
into the caller's running `logdet` in that pass.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from ..reference.actnorm import actnorm_ref
from . import _checks


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
    is given. inverse=True applies the inverse map with the negated log-det.
    """
    _checks.channel_input(x)
    _checks.per_channel("shift", shift, x)
    _checks.per_channel("log_scale", log_scale, x)
    logdet = _checks.running_logdet(logdet, x)
    return actnorm_ref(x, shift, log_scale, inverse=bool(inverse), logdet=logdet)
