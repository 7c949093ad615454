"""Pure-PyTorch definition of the affine coupling transform: the ground truth.

Every other implementation (the csrc math header compiled for CPU and CUDA, the
Triton kernels) is tested against this function run in float64. Its backward is
PyTorch's autograd of these few lines.

    scale="exp":     m = exp(s)                          log m = s
    scale="sigmoid": m = sigmoid(s + 2) + 1e-3           log m = log(m)
    scale="tanh":    s' = clamp * tanh(s / clamp), m = exp(s'), log m = s'
    scale="softplus": m = softplus(s) + 1e-3             log m = log(m)   (nflows' MAF)
    scale="rational": s' = s / (1 + |s / clamp|), m = exp(s'), log m = s'
                      (zuko's MonotonicAffineTransform, clamp = -log(slope))

    forward:  y = x * m + t,      logdet = sum_{non-batch} log m
    inverse:  x = (y - t) / m,    logdet = -sum_{non-batch} log m
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch

from ._common import row_sum

SCALES = ("exp", "sigmoid", "tanh", "softplus", "rational")
SIGMOID_OFFSET = 2.0
SIGMOID_EPS = 1e-3
HALF_DTYPES = (torch.float16, torch.bfloat16)  # computed in float32


def identity_scale_raw(scale: str) -> float:
    """The raw scale s at which m = 1 (the identity): 0 for "exp"/"tanh", and for "sigmoid"
    the s with sigmoid(s + 2) + 1e-3 = 1, i.e. logit(1 - 1e-3) - 2; for "softplus" the s with
    softplus(s) = 1 - 1e-3, i.e. log(expm1(1 - 1e-3))."""
    if scale == "sigmoid":
        return math.log((1.0 - SIGMOID_EPS) / SIGMOID_EPS) - SIGMOID_OFFSET
    if scale == "softplus":
        return math.log(math.expm1(1.0 - SIGMOID_EPS))
    return 0.0


def log_scale_ref(scale_raw: torch.Tensor, scale: str, clamp: float) -> torch.Tensor:
    """log m as a function of the raw conditioner output s."""
    if scale == "exp":
        return scale_raw
    if scale == "tanh":
        return clamp * torch.tanh(scale_raw / clamp)
    if scale == "sigmoid":
        return torch.log(torch.sigmoid(scale_raw + SIGMOID_OFFSET) + SIGMOID_EPS)
    if scale == "softplus":
        return torch.log(torch.nn.functional.softplus(scale_raw) + SIGMOID_EPS)
    if scale == "rational":
        return scale_raw / (1 + torch.abs(scale_raw / clamp))
    raise ValueError(f"scale must be one of {SCALES}, got {scale!r}")


def affine_coupling_ref(
    x: torch.Tensor,
    shift: torch.Tensor,
    scale_raw: torch.Tensor,
    *,
    scale: str = "exp",
    clamp: float = 2.0,
    inverse: bool = False,
    logdet: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Reference affine coupling; same signature and result as flowkern.ops.affine_coupling.
    float16/bfloat16 inputs compute in float32 (as the kernels) and the output is rounded once."""
    dtype = x.dtype
    if dtype in HALF_DTYPES:  # log m in half precision would be off by nats in the log-det's sum
        x, shift, scale_raw = x.float(), shift.float(), scale_raw.float()
    logm = log_scale_ref(scale_raw, scale, clamp)
    if inverse:
        out = (x - shift) * torch.exp(-logm) if scale not in ("sigmoid", "softplus") else (x - shift) / torch.exp(logm)
        sign = -1.0
    else:
        out = x * torch.exp(logm) + shift
        sign = 1.0
    ld = sign * row_sum(logm)
    if logdet is not None:
        ld = logdet + ld
    return out.to(dtype), ld


def affine_coupling_merge_ref(
    kept: torch.Tensor,
    x: torch.Tensor,
    params: torch.Tensor,
    *,
    kept_first: bool = True,
    scale: str = "exp",
    clamp: float = 2.0,
    inverse: bool = False,
    logdet: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """A coupling layer's transform and merge: x transformed by params = [shift | raw scale]
    (split in two along dim 1), concatenated with kept along dim 1 (kept first or last).
    Same result as flowkern.ops.affine_coupling_merge."""
    shift, scale_raw = params.chunk(2, dim=1)
    out, ld = affine_coupling_ref(x, shift, scale_raw, scale=scale, clamp=clamp, inverse=inverse, logdet=logdet)
    return merge_columns(kept, out, kept_first), ld


def merge_columns(kept: torch.Tensor, moved: torch.Tensor, kept_first: bool) -> torch.Tensor:
    """The merged layout of a coupling layer's row: cat([kept, moved]) along dim 1 when
    kept_first, else cat([moved, kept])."""
    return torch.cat([kept, moved] if kept_first else [moved, kept], dim=1)


def merged_columns(t: torch.Tensor, k: int, kept_first: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """(kept, moved) views of a merged tensor (merge_columns' layout) with k kept columns."""
    if kept_first:
        return t[:, :k], t[:, k:]
    return t[:, t.shape[1] - k:], t[:, :t.shape[1] - k]
