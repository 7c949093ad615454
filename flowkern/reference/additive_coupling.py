"""Pure-PyTorch definition of the additive (NICE) coupling transform: the ground truth.

    forward:  y = x + t,   inverse:  x = y - t,   log-det 0 (volume preserving)
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from ._common import row_sum


def additive_coupling_ref(
    x: torch.Tensor,
    shift: torch.Tensor,
    *,
    inverse: bool = False,
    logdet: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Reference additive coupling; same signature and result as flowkern.ops.additive_coupling."""
    out = x - shift if inverse else x + shift
    # A new tensor as every op returns, never the caller's running log-det itself.
    ld = row_sum(x.new_zeros((x.shape[0],))) if logdet is None else logdet.clone()
    return out, ld
