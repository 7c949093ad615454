"""Pure-PyTorch definitions of dequantization and the logit transform: the ground truth.

The convention (Theis et al. 2016, "A note on the evaluation of generative models"):
pixels x in {0, ..., 255}^D are made continuous by uniform noise u ~ U[0, 1)^D,

    dequantize:  v = (x + u) / 256                   in [x / 256, (x + 1) / 256) per pixel
                 logdet = -D * log(256)              per row (the 1/256 scaling)
    quantize:    x = clamp(floor(v * 256), 0, 255)   the sampling direction
                 logdet = +D * log(256)

so that a flow's log_prob of uint8 data is the log-density of the dequantized data x + u on the
pixel scale [0, 256)^D. Integrated over the unit cube of x that density is the discrete model's
P(x), so by Jensen E_u[log p(x + u)] <= log P(x): the log_prob is a lower bound on the discrete
log-likelihood, and bits/dim = -log_prob / (D * ln 2) is the number papers report.

    logit(alpha):  v' = alpha + (1 - 2 alpha) v,  y = log(v') - log(1 - v')
                   logdet = sum(log(1 - 2 alpha) - log(v') - log(1 - v'))
    inverse:       v = (sigmoid(y) - alpha) / (1 - 2 alpha),  logdet negated

alpha keeps v = 0 and v -> 1 away from the logit's poles. 1 - v' is computed as
alpha + (1 - 2 alpha)(1 - v) rather than by subtracting v' from 1: the same number, but it keeps
its relative precision for v near 1 (in float32, 1 - v' would carry only ~3 significant bits of
an alpha = 1e-6). Half-precision inputs compute in float32 and round once at the end.

D is the number of elements per row, prod(x.shape[1:]) (1 for 1-D x). Log-dets have shape
(batch,), float32 (float64 for float64 data), added to the running `logdet` when one is given.

The fused dequantize_logit draws its noise from a counter-based generator (counter_uniform):
u of each element is a hash of (seed, the element's flat index), so the compiled, CUDA and
Triton kernels generate it in place, all bit-identical to this module for the same seed.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch

from ._common import row_sum

LEVELS = 256  # 8-bit pixels
LOG_LEVELS = math.log(LEVELS)


# SplitMix64 (Steele, Lea & Flood 2014): the state advances by the golden-ratio increment, and
# each state is finalized by two xor-shift-multiply rounds.
_SPLITMIX_INCREMENT = 0x9E3779B97F4A7C15
_SPLITMIX_MIX1 = 0xBF58476D1CE4E5B9
_SPLITMIX_MIX2 = 0x94D049BB133111EB
_UINT64 = (1 << 64) - 1


def seed_as_int64(seed: int) -> int:
    """A 64-bit seed as the signed int64 with the same two's-complement bits (the kernels read
    it as uint64); seed may be given in [-2^63, 2^64)."""
    seed = int(seed) & _UINT64
    return seed - (1 << 64) if seed >= 1 << 63 else seed


def _shift_right(z: torch.Tensor, k: int) -> torch.Tensor:
    """Logical right shift of int64 tensors holding uint64 bits (>> alone is arithmetic)."""
    return (z >> k) & ((1 << (64 - k)) - 1)


def counter_uniform(shape, seed: int, dtype: torch.dtype = torch.float32,
                    device: Optional[torch.device] = None) -> torch.Tensor:
    """The counter-based uniform noise of the fused dequantize_logit, for a tensor of `shape`.

    Element i (flat, row-major) gets SplitMix64's output at step i + 1 from state `seed`:
        z = seed + (i + 1) * 0x9E3779B97F4A7C15                    (mod 2^64)
        z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9;  z = (z ^ (z >> 27)) * 0x94D049BB133111EB
        z = z ^ (z >> 31)
        u = (z >> 40) * 2^-24  (float32 arithmetic: also for the half types)
        u = (z >> 11) * 2^-53  (float64)
    so u = k 2^-p, exact, in [0, 1 - 2^-p]. Returned in the compute dtype of `dtype` (float32 for
    float16/bfloat16). Written with int64 torch ops (multiplication wraps around; the logical
    shifts are masked arithmetic ones), and bit-identical to the C++, CUDA and Triton kernels.
    """
    shape = tuple(int(s) for s in shape)
    compute = _compute_dtype(dtype)
    z = torch.arange(1, math.prod(shape) + 1, dtype=torch.int64, device=device)
    z = z * seed_as_int64(_SPLITMIX_INCREMENT) + seed_as_int64(seed)
    z = (z ^ _shift_right(z, 30)) * seed_as_int64(_SPLITMIX_MIX1)
    z = (z ^ _shift_right(z, 27)) * seed_as_int64(_SPLITMIX_MIX2)
    z = z ^ _shift_right(z, 31)
    if compute == torch.float64:
        u = _shift_right(z, 11).to(torch.float64) * 2.0 ** -53
    else:
        u = _shift_right(z, 40).to(torch.float32) * 2.0 ** -24
    return u.reshape(shape)


def draw_seed(generator: Optional[torch.Generator] = None) -> int:
    """A fresh seed for counter_uniform: one int64 from `generator`, or from torch's global CPU RNG
    (so torch.manual_seed makes it reproducible). A CPU generator costs no device sync; a CUDA
    generator's draw is read back to the host (a sync)."""
    device = generator.device if generator is not None else "cpu"
    return int(torch.randint(-2 ** 63, 2 ** 63 - 1, (), dtype=torch.int64, generator=generator, device=device))


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Half types hold too few mantissa bits for the arithmetic: compute in float32."""
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


def _logdet_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _per_pixel(like: torch.Tensor) -> int:
    return math.prod(like.shape[1:])


def _constant_logdet(value: float, batch: int, dtype: torch.dtype, device: torch.device,
                     logdet: Optional[torch.Tensor]) -> torch.Tensor:
    ld = torch.full((batch,), value, dtype=_logdet_dtype(dtype), device=device)
    return ld if logdet is None else logdet + ld


def _dequantize(x: torch.Tensor, noise: Optional[torch.Tensor], generator: Optional[torch.Generator],
                dtype: torch.dtype) -> torch.Tensor:
    """v = (x + u) / 256 in `dtype`, each pixel strictly inside [x/256, (x+1)/256)."""
    compute = _compute_dtype(dtype)
    if noise is None:
        noise = torch.rand(x.shape, generator=generator, dtype=compute, device=x.device)
    s = (x.to(compute) + noise.to(compute)).to(dtype)
    # x + u rounds up to x + 1 when u is within half an ulp(x) of 1 (float32: u > 1 - 2^-17 for
    # x >= 128, which a 100k-pixel batch hits about once): clamp to the largest value below x + 1
    # so quantize(dequantize(x)) == x always. Dividing by 256 is then exact. The clamp only
    # absorbs rounding: it keeps ds/du = 1 (as the kernels' analytic backward), not a clamp's 0.
    top = x.to(dtype) + 1
    clamped = torch.minimum(s, torch.nextafter(top, torch.zeros((), dtype=dtype, device=x.device)))
    s = s + (clamped - s).detach()
    return s / LEVELS


def dequantize_ref(
    x_uint8: torch.Tensor,
    noise: Optional[torch.Tensor] = None,
    *,
    generator: Optional[torch.Generator] = None,
    dtype: torch.dtype = torch.float32,
    logdet: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Reference dequantization: v = (x + u) / 256, logdet = -D log 256 (+ `logdet`).

    x_uint8: (B, ...) integer pixels in [0, 255]. noise: u of x's shape in [0, 1), or None to
    draw u ~ U[0, 1) with torch.rand (from `generator`, else torch's global RNG). v has `dtype`.
    A given noise stays in the graph (dv/du = 1/256), so a learned q(u | x) (variational
    dequantization) trains through it; its -log q(u | x) is the caller's to add.
    """
    v = _dequantize(x_uint8, noise, generator, dtype)
    return v, _constant_logdet(-_per_pixel(x_uint8) * LOG_LEVELS, x_uint8.shape[0], dtype, x_uint8.device, logdet)


def quantize_ref(v: torch.Tensor, *, logdet: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Reference quantization (dequantize's sampling direction): x = clamp(floor(v * 256), 0, 255).

    x is returned in v's floating dtype, holding integer values: the flow's inverse stays in the
    flow's dtype (and differentiable, with zero gradient, like any layer's inverse); call
    .to(torch.uint8) for an image. logdet = +D log 256 (+ `logdet`). NaN stays NaN.
    """
    x = torch.clamp(torch.floor(v * LEVELS), 0, LEVELS - 1)
    return x, _constant_logdet(_per_pixel(v) * LOG_LEVELS, v.shape[0], v.dtype, v.device, logdet)


def logit_ref(
    v: torch.Tensor,
    *,
    alpha: float = 1e-6,
    inverse: bool = False,
    logdet: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Reference logit with alpha; same signature and result as flowkern.ops.logit.

    forward (v in [0, 1] -> y): v' = alpha + (1 - 2 alpha) v, y = log v' - log(1 - v'),
    logdet = sum(log(1 - 2 alpha) - log v' - log(1 - v')). inverse (y -> v):
    v = (sigmoid(y) - alpha) / (1 - 2 alpha) with the negated log-det; no clamping, so y beyond
    logit(1 - alpha) maps slightly outside [0, 1] (quantize clamps).
    """
    dtype = v.dtype
    t = v.to(_compute_dtype(dtype))
    scale = 1.0 - 2.0 * alpha
    log_scale = math.log(scale)
    if inverse:
        out = (torch.sigmoid(t) - alpha) / scale
        # log v' = logsigmoid(y), log(1 - v') = logsigmoid(-y): exact far into both tails.
        ld = row_sum(torch.nn.functional.logsigmoid(t) + torch.nn.functional.logsigmoid(-t) - log_scale)
    else:
        log_lo = torch.log(alpha + scale * t)          # log v'
        log_hi = torch.log(alpha + scale * (1.0 - t))  # log(1 - v')
        out = log_lo - log_hi
        ld = row_sum(log_scale - log_lo - log_hi)
    if logdet is not None:
        ld = logdet + ld
    return out.to(dtype), ld


def dequantize_logit_ref(
    x_uint8: torch.Tensor,
    noise: Optional[torch.Tensor] = None,
    *,
    alpha: float = 1e-6,
    generator: Optional[torch.Generator] = None,
    seed: Optional[int] = None,
    dtype: torch.dtype = torch.float32,
    logdet: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Reference of the fused dequantize + logit: y = logit_alpha((x + u) / 256).

    logdet = -D log 256 + sum(log(1 - 2 alpha) - log v' - log(1 - v')) (+ `logdet`). u is the
    given noise, else counter_uniform(x.shape, seed) (the kernels' noise, bit for bit), with seed
    drawn by draw_seed(generator) when None. The intermediate v stays in the compute dtype
    (float32 for half types), as in a fused kernel; for float32/float64 this equals
    logit_ref(*dequantize_ref(...)) exactly, given the same noise. The inverse is
    dequantize_logit_inverse_ref (= quantize_ref(logit_ref(y, inverse=True)) for float32/64).
    """
    compute = _compute_dtype(dtype)
    if noise is None:
        seed = draw_seed(generator) if seed is None else seed
        noise = counter_uniform(x_uint8.shape, seed, compute, x_uint8.device)
    v, ld = dequantize_ref(x_uint8, noise, dtype=compute, logdet=logdet)
    y, ld = logit_ref(v, alpha=alpha, logdet=ld)
    return y.to(dtype), ld


def dequantize_logit_inverse_ref(
    y: torch.Tensor,
    *,
    alpha: float = 1e-6,
    logdet: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Reference of the fused inverse (sampling): logits y -> pixel values, as one op.

    v = (sigmoid(y) - alpha) / (1 - 2 alpha), pixels = clamp(floor(256 v), 0, 255) in y's dtype,
    logdet = sum(logsigmoid(y) + logsigmoid(-y) - log(1 - 2 alpha)) + D log 256 (+ `logdet`):
    the negated forward log-det. Computed in float32 for half y and rounded once (v is not
    rounded to y's dtype in between); for float32/float64 it equals
    quantize_ref(*logit_ref(y, alpha=alpha, inverse=True, logdet=logdet)).
    """
    dtype = y.dtype
    t = y.to(_compute_dtype(dtype))
    scale = 1.0 - 2.0 * alpha
    v = (torch.sigmoid(t) - alpha) / scale
    pixels = torch.clamp(torch.floor(v * LEVELS), 0, LEVELS - 1)
    ld = row_sum(torch.nn.functional.logsigmoid(t) + torch.nn.functional.logsigmoid(-t) - math.log(scale))
    if logdet is not None:
        ld = logdet + ld
    ld = _constant_logdet(_per_pixel(y) * LOG_LEVELS, y.shape[0], dtype, y.device, ld)
    return pixels.to(dtype), ld
