"""Pure-PyTorch definition of the standard-normal negative log-likelihood: the ground truth.

A flow with a N(0, I) base scores data x through its latent z = f(x) and log-det:

    nll(x) = -log p(x) = 0.5 sum z^2 + (D / 2) log(2 pi) - log|det df/dx|,   D = prod(z.shape[1:])
    bits/dim = nll / (D ln 2)

For a flow over 8-bit images that starts with dequantization, D is the number of pixel values
and bits/dim is the number papers report. Sums run in float32 (float64 for float64 z), also for
half z, whose squares would overflow float16.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from ._common import row_sum

HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)


def gaussian_nll_ref(z: torch.Tensor, logdet: Optional[torch.Tensor] = None, *,
                     bits_per_dim: bool = False) -> torch.Tensor:
    """Reference NLL per row, shape (B,): 0.5 sum z^2 + D/2 log(2 pi) - logdet (logdet optional),
    divided by D ln 2 when bits_per_dim; float32 (float64 for float64 z)."""
    dims = math.prod(z.shape[1:])
    t = z.to(torch.float64 if z.dtype == torch.float64 else torch.float32)
    nll = 0.5 * row_sum(t * t) + dims * HALF_LOG_2PI
    if logdet is not None:
        nll = nll - logdet
    if bits_per_dim:
        nll = nll / (dims * math.log(2.0))
    return nll
