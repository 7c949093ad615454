"""flowkern.ops.dequantize: 8-bit pixels to continuous data (and back), and the logit transform.

    dequantize:  v = (x + u) / 256, u ~ U[0, 1)^D     logdet = -D log 256
    quantize:    x = clamp(floor(256 v), 0, 255)       logdet = +D log 256
    logit:       v' = alpha + (1 - 2 alpha) v, y = log v' - log(1 - v')
                 logdet = sum(log(1 - 2 alpha) - log v' - log(1 - v'));  inverse negates it
    dequantize_logit = logit(dequantize(x)), the whole preprocessing in one op

Pixels x in {0, ..., 255}; D = prod(x.shape[1:]). With these log-dets a flow's log_prob of uint8
data is the log-density of the dequantized data x + u on the pixel scale [0, 256)^D, whose
expectation over u is the Theis et al. (2016) lower bound on the discrete log P(x); bits/dim =
-log_prob / (D ln 2) (flowkern.nn.preprocess.bits_per_dim) is then the number papers report.

These ops check their arguments and run flowkern.reference.dequantize. Fused kernels (one pass:
uint8 in, noise drawn in the kernel from a seed or read, float out with the per-row log-det)
arrive later behind these same signatures; until then the backend switch does not change
these ops. Checks that read tensor values (integer pixels other than uint8 in [0, 255], noise in
[0, 1)) synchronize with a GPU; they are skipped while torch.compile traces.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from ..reference.dequantize import dequantize_logit_ref, dequantize_ref, logit_ref, quantize_ref
from . import _checks

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _tracing() -> bool:
    return torch.compiler.is_compiling()


def check_pixels(name: str, x) -> torch.Tensor:
    """An integer tensor (B, ...) of pixel values in [0, 255]; uint8 needs no value check."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of integer pixels, got {type(x).__name__}")
    if x.is_floating_point() or x.is_complex() or x.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor of pixel values in [0, 255] (uint8 preferred), "
                        f"got dtype {x.dtype}")
    if x.dim() < 1:
        raise ValueError(f"{name} must have a batch dimension (at least 1-D), got shape {tuple(x.shape)}")
    if x.dtype != torch.uint8 and x.numel() > 0 and not _tracing():
        lo, hi = int(x.min()), int(x.max())
        if lo < 0 or hi > 255:
            raise ValueError(f"{name} must hold pixel values in [0, 255], got values in [{lo}, {hi}]")
    return x


def check_noise(noise, x: torch.Tensor) -> Optional[torch.Tensor]:
    """None, or a floating tensor of x's shape on x's device with values in [0, 1)."""
    if noise is None:
        return None
    if not isinstance(noise, torch.Tensor):
        raise TypeError(f"noise must be a torch.Tensor or None, got {type(noise).__name__}")
    if not noise.is_floating_point():
        raise TypeError(f"noise must be a floating-point tensor, got dtype {noise.dtype}")
    if noise.shape != x.shape:
        raise ValueError(f"noise must have the shape of x_uint8 {tuple(x.shape)}, got {tuple(noise.shape)}")
    if noise.device != x.device:
        raise ValueError(f"noise is on {noise.device} but x_uint8 is on {x.device}")
    if noise.numel() > 0 and not _tracing():
        ok = bool(((noise >= 0) & (noise < 1)).all())  # NaN fails both comparisons
        if not ok:
            raise ValueError(f"noise must lie in [0, 1), got values in [{noise.min().item()}, {noise.max().item()}]"
                             + (" and NaN" if bool(noise.isnan().any()) else ""))
    return noise


def check_generator(generator, x: torch.Tensor) -> Optional[torch.Generator]:
    if generator is None:
        return None
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    gen_device = torch.device(generator.device)
    if gen_device.type != x.device.type or (gen_device.index is not None and x.device.index is not None
                                            and gen_device.index != x.device.index):
        raise ValueError(f"generator is on {gen_device} but x_uint8 is on {x.device}")
    return generator


def check_dtype(dtype) -> torch.dtype:
    if not isinstance(dtype, torch.dtype) or dtype not in FLOAT_DTYPES:
        raise TypeError(f"dtype must be one of {FLOAT_DTYPES}, got {dtype!r}")
    return dtype


def check_alpha(alpha) -> float:
    if isinstance(alpha, bool):
        raise TypeError("alpha must be a number, got bool")
    try:
        alpha = float(alpha)
    except (TypeError, ValueError):
        raise TypeError(f"alpha must be a number, got {type(alpha).__name__}") from None
    if not (0.0 <= alpha < 0.5):
        raise ValueError(f"alpha must lie in [0, 0.5), got {alpha}")
    return alpha


def _running_logdet(logdet, x: torch.Tensor, dtype: torch.dtype) -> Optional[torch.Tensor]:
    """The running log-det of an op whose input x is integer and whose output has `dtype`."""
    # _checks.running_logdet casts to the log-det dtype of its reference: give it one of `dtype`.
    ref = torch.empty((), dtype=dtype, device=x.device).expand(x.shape[0])
    return _checks.running_logdet(logdet, ref)


def dequantize(
    x_uint8: torch.Tensor,
    noise: Optional[torch.Tensor] = None,
    *,
    generator: Optional[torch.Generator] = None,
    dtype: torch.dtype = torch.float32,
    logdet: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Dequantize 8-bit pixels: v = (x + u) / 256 in [x/256, (x+1)/256), per pixel.

    x_uint8: (B, ...) integer pixels in {0, ..., 255} (uint8 preferred; other integer dtypes
    are value-checked). noise: u, a floating tensor of x's shape in [0, 1), or None to draw
    u ~ U[0, 1)^D with torch.rand from `generator` (a torch.Generator on x's device, for
    reproducibility) or else torch's global RNG. dtype: v's floating dtype (float16/bfloat16
    compute in float32 and round once; bfloat16 has no bits left for the noise of x >= 128,
    use float32). Returns (v, logdet): logdet (B,) = -D log 256, float32 (float64 for
    dtype=float64), added to `logdet` when given; D = prod(x.shape[1:]).
    """
    check_pixels("x_uint8", x_uint8)
    noise = check_noise(noise, x_uint8)
    generator = check_generator(generator, x_uint8)
    dtype = check_dtype(dtype)
    logdet = _running_logdet(logdet, x_uint8, dtype)
    return dequantize_ref(x_uint8, noise, generator=generator, dtype=dtype, logdet=logdet)


def quantize(v: torch.Tensor, *, logdet: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Quantize continuous v back to pixel values (dequantize's sampling direction).

    x = clamp(floor(256 v), 0, 255), returned in v's floating dtype with integer values (the
    flow's inverse stays in the flow's dtype; call .to(torch.uint8) for an image). logdet (B,)
    = +D log 256 (float32, float64 for float64 v), added to `logdet` when given.
    """
    _checks.tensor("v", v)
    logdet = _checks.running_logdet(logdet, v)
    return quantize_ref(v, logdet=logdet)


def logit(
    v: torch.Tensor,
    *,
    alpha: float = 1e-6,
    inverse: bool = False,
    logdet: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Logit with alpha: v' = alpha + (1 - 2 alpha) v, y = log v' - log(1 - v').

    v: (B, ...) floating, meant to lie in [0, 1] (not checked: that would cost a sync; values
    outside give NaN). alpha in [0, 0.5): 0 is the plain logit (infinite at 0 and 1).
    Returns (y, logdet) with logdet (B,) = sum(log(1 - 2 alpha) - log v' - log(1 - v')),
    float32 (float64 for float64 v), added to `logdet` when given. inverse=True maps y back:
    v = (sigmoid(y) - alpha) / (1 - 2 alpha), with the negated log-det.
    """
    _checks.tensor("v", v)
    alpha = check_alpha(alpha)
    logdet = _checks.running_logdet(logdet, v)
    return logit_ref(v, alpha=alpha, inverse=bool(inverse), logdet=logdet)


def dequantize_logit(
    x_uint8: torch.Tensor,
    noise: Optional[torch.Tensor] = None,
    *,
    alpha: float = 1e-6,
    generator: Optional[torch.Generator] = None,
    dtype: torch.dtype = torch.float32,
    logdet: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """logit(dequantize(x)) in one op: uint8 pixels in, logits of `dtype` out.

    Arguments as dequantize and logit. logdet (B,) = -D log 256 + sum(log(1 - 2 alpha)
    - log v' - log(1 - v')), added to `logdet` when given. Its inverse (for sampling) is
    quantize(logit(y, alpha=alpha, inverse=True)).
    """
    check_pixels("x_uint8", x_uint8)
    noise = check_noise(noise, x_uint8)
    alpha = check_alpha(alpha)
    generator = check_generator(generator, x_uint8)
    dtype = check_dtype(dtype)
    logdet = _running_logdet(logdet, x_uint8, dtype)
    return dequantize_logit_ref(x_uint8, noise, alpha=alpha, generator=generator, dtype=dtype, logdet=logdet)

