"""flowkern.ops.dequantize: 8-bit pixels to continuous data (and back), and the logit transform.

    dequantize:  v = (x + u) / 256, u ~ U[0, 1)^D     logdet = -D log 256
    quantize:    x = clamp(floor(256 v), 0, 255)       logdet = +D log 256
    logit:       v' = alpha + (1 - 2 alpha) v, y = log v' - log(1 - v')
                 logdet = sum(log(1 - 2 alpha) - log v' - log(1 - v'));  inverse negates it
    dequantize_logit = logit(dequantize(x)), the whole preprocessing in one fused op
    dequantize_logit_inverse = quantize(logit^-1(y)), its sampling direction, fused

Pixels x in {0, ..., 255}; D = prod(x.shape[1:]). With these log-dets a flow's log_prob of uint8
data is the log-density of the dequantized data x + u on the pixel scale [0, 256)^D, whose
expectation over u is the Theis et al. (2016) lower bound on the discrete log P(x); bits/dim =
-log_prob / (D ln 2) (flowkern.nn.preprocess.bits_per_dim) is then the number papers report.

dequantize_logit and dequantize_logit_inverse run fused kernels behind the backend switch (the
compiled C++/CUDA ops, Triton, or the reference): one pass, uint8 in (one byte per pixel read),
logits out with the per-row log-det. Their noise, when not given, is counter-based
(flowkern.reference.dequantize.counter_uniform): a hash of (seed, element index) that every
backend computes in place, bit-identical, so the same seed gives the same u everywhere and
the noise costs no memory traffic. dequantize, quantize and logit are reference ops. Checks that
read tensor values (integer pixels other than uint8 in [0, 255], noise in [0, 1)) synchronize
with a GPU; they are skipped while torch.compile traces and inside torch.func transforms.
"""
from __future__ import annotations

import numbers
from typing import Optional, Tuple

import torch

from .. import _ext
from .._backend import kernel_dtype, kernel_inputs, resolve_op
from ..reference.dequantize import (counter_uniform, dequantize_logit_inverse_ref, dequantize_logit_ref, dequantize_ref,
                                    draw_seed, logit_ref, quantize_ref, seed_as_int64)
from . import _checks
from ._autograd import apply, functorch_wrapped, kernel_functions
from ._vmap import register_row_vmap

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _tracing() -> bool:
    return torch.compiler.is_compiling()


def _values_readable(t: torch.Tensor) -> bool:
    """Whether a value check may read t: not while torch.compile traces, and not on a torch.func
    (vmap/jacrev) wrapper, whose values are per-sample."""
    return not _tracing() and not functorch_wrapped(t)


def check_pixels(name: str, x) -> torch.Tensor:
    """An integer tensor (B, ...) of pixel values in [0, 255]; uint8 needs no value check."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of integer pixels, got {type(x).__name__}")
    if x.is_floating_point() or x.is_complex() or x.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor of pixel values in [0, 255] (uint8 preferred), "
                        f"got dtype {x.dtype}")
    if x.dim() < 1:
        raise ValueError(f"{name} must have a batch dimension (at least 1-D), got shape {tuple(x.shape)}")
    if x.dtype != torch.uint8 and x.numel() > 0 and _values_readable(x):
        # On an int64 copy: min/max are not implemented for uint16/uint32/uint64 (PyTorch 2.x),
        # and int64 holds all of their values but uint64's above 2^63 (negative: out of range too).
        lo, hi = (int(v) for v in torch.aminmax(x.to(torch.int64)))
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
    if noise.numel() > 0 and _values_readable(noise):
        lo, hi = torch.aminmax(noise)  # one pass; NaN propagates and fails both comparisons
        if not bool((lo >= 0) & (hi < 1)):
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


def check_seed_generator(generator) -> Optional[torch.Generator]:
    """A generator that only draws the counter noise's seed: any device (a CPU one needs no sync)."""
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    return generator


def check_seed(seed) -> Optional[int]:
    """None, or an integer seed in [-2^63, 2^64), returned as the int64 with its 64 bits."""
    if seed is None:
        return None
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise TypeError(f"seed must be an int or None, got {type(seed).__name__}")
    if not -(2 ** 63) <= int(seed) < 2 ** 64:
        raise ValueError(f"seed must fit in 64 bits, in [-2**63, 2**64), got {seed}")
    return seed_as_int64(seed)


def check_dtype(dtype) -> torch.dtype:
    if not isinstance(dtype, torch.dtype) or dtype not in FLOAT_DTYPES:
        raise TypeError(f"dtype must be one of {FLOAT_DTYPES}, got {dtype!r}")
    return dtype


def check_alpha(alpha) -> float:
    if isinstance(alpha, (bool, str, bytes)):  # float("0.1") would parse
        raise TypeError(f"alpha must be a number, got {type(alpha).__name__}")
    try:
        alpha = float(alpha)
    except OverflowError:  # an int such as 10**400
        raise ValueError("alpha must lie in [0, 0.5), got a number too large for a float") from None
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
    return logit_ref(v, alpha=alpha, inverse=_checks.flag("inverse", inverse), logdet=logdet)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


def _kernels(impl: str):
    if impl == "compiled":
        ops = torch.ops.flowkern
        return ops.dequantize_logit_fwd, ops.dequantize_logit_bwd, ops.dequantize_logit_inv
    from ..triton import dequantize_logit as tk

    return tk.dequantize_logit_fwd, tk.dequantize_logit_bwd, tk.dequantize_logit_inv


def _fwd_run(x, noise, logdet, seed, alpha, dtype, impl):
    return _kernels(impl)[0](x, noise, seed, alpha, dtype, logdet)


def _fwd_save(ctx, inputs, outputs):
    x, noise, logdet, seed, alpha, dtype, impl = inputs
    # The backward recomputes v' from the pixels and the noise: nothing else is kept.
    ctx.save_for_backward(x, noise)
    ctx.config = (alpha, dtype, impl)
    ctx.has_logdet = logdet is not None


def _fwd_backward(ctx, grad_out, grad_logdet):
    x, noise = ctx.saved_tensors
    alpha, dtype, impl = ctx.config
    grad_noise = None
    if noise is not None and ctx.needs_input_grad[1]:
        # y unused: a zero gradient of the kernel's output dtype (grad_out of a .sum() is expanded).
        grad_out = torch.zeros(x.shape, dtype=dtype, device=x.device) if grad_out is None else grad_out.contiguous()
        grad_ld = None if grad_logdet is None else grad_logdet.contiguous()
        grad_noise = _kernels(impl)[1](grad_out, grad_ld, x, noise, alpha)
    return None, grad_noise, (grad_logdet if ctx.has_logdet else None), None, None, None, None


def _inv_run(y, logdet, alpha, impl):
    return _kernels(impl)[2](y, alpha, logdet)


def _inv_save(ctx, inputs, outputs):
    y, logdet, alpha, impl = inputs
    ctx.save_for_backward(y)
    ctx.has_logdet = logdet is not None


def _inv_backward(ctx, grad_out, grad_logdet):
    (y,) = ctx.saved_tensors
    grad_y = None
    if ctx.needs_input_grad[0]:
        # The pixels are a floor: zero gradient. The log-det's, d/dy (logsigmoid(y) + logsigmoid(-y)),
        # is 1 - 2 sigmoid(y) per element; plain torch, as sampling rarely differentiates.
        if grad_logdet is None:
            grad_y = torch.zeros_like(y)
        else:
            t = y.to(_compute_dtype(y.dtype))
            gld = grad_logdet.reshape(-1, *([1] * (y.dim() - 1)))
            grad_y = (gld * (1 - 2 * torch.sigmoid(t))).to(y.dtype)
    return grad_y, (grad_logdet if ctx.has_logdet else None), None, None


_FWD_FUNCTIONS = kernel_functions("DequantizeLogitFunction", _fwd_run, _fwd_save, _fwd_backward)
_INV_FUNCTIONS = kernel_functions("DequantizeLogitInverseFunction", _inv_run, _inv_save, _inv_backward)


def dequantize_logit(
    x_uint8: torch.Tensor,
    noise: Optional[torch.Tensor] = None,
    *,
    alpha: float = 1e-6,
    generator: Optional[torch.Generator] = None,
    seed: Optional[int] = None,
    dtype: torch.dtype = torch.float32,
    logdet: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """logit(dequantize(x)) fused: uint8 pixels in, logits of `dtype` out, in one pass.

        v = (x + u) / 256 (kept below (x + 1) / 256),  v' = alpha + (1 - 2 alpha) v,
        y = log v' - log(1 - v'),
        logdet = -D log 256 + sum(log(1 - 2 alpha) - log v' - log(1 - v'))   (+ `logdet`)

    x_uint8: (B, ...) integer pixels in [0, 255] (uint8 preferred; other integer dtypes are
    value-checked). noise: u, a floating tensor of x's shape in [0, 1), differentiable (dL/du
    flows back: variational dequantization trains through it), or None for the counter-based
    noise of `seed` (flowkern.reference.dequantize.counter_uniform: the same u on every backend
    for the same seed). seed None draws one int64 from `generator` (a torch.Generator; a CPU one
    costs no device sync) or from torch's global CPU RNG, so torch.manual_seed makes it
    reproducible. Under torch.compile tracing, noise and seed both None draw u with torch.rand
    instead (reading a seed back would break the graph). dtype: y's dtype; float16/bfloat16
    compute in float32 and round once. Returns (y, logdet (B,), float32, float64 for float64).
    The inverse (sampling) is dequantize_logit_inverse.
    """
    check_pixels("x_uint8", x_uint8)
    noise = check_noise(noise, x_uint8)
    alpha = check_alpha(alpha)
    generator = check_seed_generator(generator)
    seed = check_seed(seed)
    dtype = check_dtype(dtype)
    logdet = _running_logdet(logdet, x_uint8, dtype)
    if noise is not None and seed is not None:
        raise ValueError("pass noise or seed, not both (seed chooses the noise when noise is None)")
    compute = _compute_dtype(dtype)
    if noise is None and seed is None:
        if _tracing():
            device = generator.device if generator is not None else x_uint8.device
            noise = torch.rand(x_uint8.shape, generator=generator, dtype=compute, device=device).to(x_uint8.device)
        else:
            seed = draw_seed(generator)
    impl = resolve_op(x_uint8.device, dtype, "dequantize_logit_fwd")
    if impl == "reference":
        return dequantize_logit_ref(x_uint8, noise, alpha=alpha, seed=seed, dtype=dtype, logdet=logdet)
    if noise is None and functorch_wrapped(x_uint8, logdet):
        # vmap folds its dim into the kernel's rows, and the kernel numbers its counter noise
        # across all of them: each slice would get other noise than the call on that slice alone.
        # counter_uniform of the slice's shape is that noise, bit for bit (as in the reference).
        noise = counter_uniform(x_uint8.shape, seed, compute, x_uint8.device)
    x = x_uint8.to(torch.uint8).contiguous()  # the kernels read one byte per pixel
    if noise is not None:
        noise = noise.to(compute).contiguous()  # as the reference: u in the compute dtype
    # Half outputs of the CPU kernels are rounded from float32 here.
    y, ld = apply(_FWD_FUNCTIONS, _fwd_run, (x, noise, logdet),
                  x, noise, logdet, 0 if seed is None else seed, alpha, kernel_dtype(impl, x.device, dtype), impl)
    return y.to(dtype), ld


def dequantize_logit_inverse(
    y: torch.Tensor,
    *,
    alpha: float = 1e-6,
    logdet: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """dequantize_logit's sampling direction, fused: logits y (B, ...) -> pixel values.

        v = (sigmoid(y) - alpha) / (1 - 2 alpha),   pixels = clamp(floor(256 v), 0, 255)
        logdet = sum(logsigmoid(y) + logsigmoid(-y) - log(1 - 2 alpha)) + D log 256   (+ `logdet`)

    the negated forward log-det at the same point (= quantize(logit(y, inverse=True)) for
    float32/float64; half y computes in float32). Pixels come back in y's floating dtype with
    integer values (.to(torch.uint8) for an image); NaN stays NaN. Gradient: none through the
    pixels (a floor); the log-det's is (1 - 2 sigmoid(y)) per element. logdet (B,) is float32
    (float64 for float64 y).
    """
    _checks.tensor("y", y)
    alpha = check_alpha(alpha)
    logdet = _checks.running_logdet(logdet, y)
    impl = resolve_op(y.device, y.dtype, "dequantize_logit_fwd")
    if impl == "reference":
        return dequantize_logit_inverse_ref(y, alpha=alpha, logdet=logdet)
    dtype = y.dtype
    y, = kernel_inputs(kernel_dtype(impl, y.device, dtype), y)
    pixels, ld = apply(_INV_FUNCTIONS, _inv_run, (y, logdet), y, logdet, alpha, impl)
    return pixels.to(dtype), ld


# Positions of the tensor arguments of the kernel ops (compiled and Triton share the schemas),
# for their vmap rules: every one has rows in dim 0.
FWD_TENSOR_ARGS = (0, 1, 5)
BWD_TENSOR_ARGS = (0, 1, 2, 3)
INV_TENSOR_ARGS = (0, 2)


def _register_compiled() -> None:
    if not _ext.has_op("dequantize_logit_fwd"):
        return

    @torch.library.register_fake("flowkern::dequantize_logit_fwd")
    def _fwd_fake(x, noise, seed, alpha, dtype, logdet):
        return x.new_empty(x.shape, dtype=dtype), x.new_empty((x.shape[0],), dtype=_checks.logdet_dtype(dtype))

    @torch.library.register_fake("flowkern::dequantize_logit_bwd")
    def _bwd_fake(grad_out, grad_logdet, x, noise, alpha):
        return torch.empty_like(noise)

    @torch.library.register_fake("flowkern::dequantize_logit_inv")
    def _inv_fake(y, alpha, logdet):
        return torch.empty_like(y), y.new_empty((y.shape[0],), dtype=_checks.logdet_dtype(y.dtype))

    register_row_vmap("flowkern::dequantize_logit_fwd", FWD_TENSOR_ARGS)
    register_row_vmap("flowkern::dequantize_logit_bwd", BWD_TENSOR_ARGS)
    register_row_vmap("flowkern::dequantize_logit_inv", INV_TENSOR_ARGS)


_register_compiled()
