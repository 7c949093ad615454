"""flowkern.ops.additive_coupling: the NICE coupling y = x + t (inverse x = y - t), log-det 0.

There is nothing to fuse beyond PyTorch's own add (no transcendental, no reduction), so every
backend runs the reference; the op exists so that layers call one API and the arguments are
checked like every other op's.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from ..reference.additive_coupling import additive_coupling_ref
from . import _checks


def additive_coupling(
    x: torch.Tensor,
    shift: torch.Tensor,
    *,
    inverse: bool = False,
    logdet: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Additive coupling of x (B, ...) by shift of the same shape. Returns (out, logdet), where
    logdet is the running `logdet` unchanged, or zeros (B,) (float32, float64 for float64 x)."""
    _checks.tensor("x", x)
    _checks.like("shift", shift, "x", x)
    logdet = _checks.running_logdet(logdet, x)
    return additive_coupling_ref(x, shift, inverse=_checks.flag("inverse", inverse), logdet=logdet)
