"""Pure-PyTorch definition of ActNorm's transform: the ground truth for its kernels.

Glow's activation normalisation is a per-channel affine map with a learned shift and log-scale.
Following Glow, the shift is applied first, then the scale:

    forward:  y = (x + shift) * exp(log_scale)     logdet = spatial_size * sum_c log_scale[c]
    inverse:  x = y * exp(-log_scale) - shift      logdet = -spatial_size * sum_c log_scale[c]

x is (B, C) or (B, C, *spatial); shift and log_scale are (C,) and broadcast over the batch and
spatial dims. spatial_size is prod(x.shape[2:]) (1 for 2-D x), so every row has the same log-det.
Half-precision inputs are computed in float32 and rounded once (the kernels' contract);
its backward is PyTorch's autograd of these few lines.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the arithmetic runs in: float32 for half types, else the input's own."""
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


def channel_view_shape(x: torch.Tensor) -> Tuple[int, ...]:
    """The shape that makes a (C,) vector broadcast over x's batch and spatial dims."""
    return (1, x.shape[1]) + (1,) * (x.dim() - 2)


def spatial_size(x: torch.Tensor) -> int:
    """How many positions share one channel's parameters in a row: prod(x.shape[2:])."""
    return math.prod(x.shape[2:])


def constant_row_logdet(log_scale_per_channel: torch.Tensor, x: torch.Tensor, sign: float,
                        logdet: Optional[torch.Tensor]) -> torch.Tensor:
    """sign * spatial_size * sum(log_scale) for every row of x, shape (B,), float32 (float64 for
    float64 x), added to the running `logdet` when one is given."""
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    total = log_scale_per_channel.to(acc).sum() * (sign * spatial_size(x))
    if logdet is not None:
        return logdet + total
    # A real (B,) tensor, not a stride-0 view: callers may add into it in place.
    return total.expand(x.shape[0]).contiguous()


def actnorm_ref(
    x: torch.Tensor,
    shift: torch.Tensor,
    log_scale: torch.Tensor,
    *,
    inverse: bool = False,
    logdet: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Reference ActNorm (shift, then scale); same signature and result as flowkern.ops.actnorm."""
    dtype = compute_dtype(x.dtype)
    shape = channel_view_shape(x)
    xs = x.to(dtype)
    t = shift.to(dtype).reshape(shape)
    s = log_scale.to(dtype).reshape(shape)
    if inverse:
        out = xs * torch.exp(-s) - t
    else:
        out = (xs + t) * torch.exp(s)
    ld = constant_row_logdet(log_scale, x, -1.0 if inverse else 1.0, logdet)
    return out.to(x.dtype), ld
