"""flowkern.ops.affine_coupling: the affine coupling transform with its log-det, fused.

    scale="exp":     m = exp(s)
    scale="sigmoid": m = sigmoid(s + 2) + 1e-3          (nflows / Glow)
    scale="tanh":    m = exp(clamp * tanh(s / clamp))   (soft-clamped exp)
    scale="softplus": m = softplus(s) + 1e-3             (nflows' MaskedAffineAutoregressiveTransform)
    scale="rational": m = exp(s / (1 + |s / clamp|))    (zuko's MonotonicAffineTransform, clamp = -log(slope))
    forward:  y = x * m + t,      logdet = sum over non-batch dims of log m
    inverse:  x = (y - t) / m,    logdet = -sum log m

One autograd.Function serves the compiled (C++/CUDA) and Triton kernels; the "reference"
backend runs flowkern.reference.affine_coupling_ref and lets autograd differentiate it.
The compiled ops are registered torch ops with fake implementations, so
torch.compile(fullgraph=True) traces through them.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch

from .. import _ext
from .._backend import kernel_dtype, kernel_inputs, resolve_op
from ..reference.affine_coupling import (SCALES, affine_coupling_merge_ref, affine_coupling_ref, merge_columns,
                                         merged_columns)
from . import _checks
from ._autograd import apply, contiguous_grads, kernel_functions, needs_grad, under_functorch_or_forward_ad
from ._vmap import register_row_vmap

SCALE_MODES = {name: i for i, name in enumerate(SCALES)}  # the kernels' mode numbers
# The modes whose backward can start from the saved factor (csrc/math/affine_coupling.h:
# affine_saves_factor); for softplus and rational the raw scale costs the backward no more.
FACTOR_MODES = frozenset(SCALE_MODES[name] for name in ("exp", "sigmoid", "tanh"))


def check_factor(mode: int, uses_factor: bool) -> None:
    if uses_factor and int(mode) not in FACTOR_MODES:
        raise ValueError(f"affine_coupling mode {mode} ({SCALES[int(mode)]}) saves no factor: "
                         "save_factor / is_factor must be False")


def _kernel(impl: str, name: str):
    """Kernel `name` of `impl`: the compiled op, or the Triton wrapper of the same name."""
    if impl == "compiled":
        return getattr(torch.ops.flowkern, name)
    from ..triton import affine_coupling as tk

    return getattr(tk, name)


# Where the forward saves the factor m (1/m going back) for the backward instead of the raw
# scale: on the CPU, exp/log dominate and the saved factor spares the backward its
# transcendentals; on a GPU the recompute is free and the extra tensor would cost bandwidth.
SAVE_FACTOR_ON = {"cpu"}


def _save_factor(device: torch.device, scale: str, clamp: float, *tensors) -> bool:
    """Whether the forward saves the factor for a backward (SAVE_FACTOR_ON). A saved tanh factor
    exp(+-clamp) over/underflows float32 past clamp ~ 87, and the backward takes log(factor):
    there, recompute from s. Below clamp 1 the backward's tanh = log(factor) / clamp carries an
    error of eps / clamp into 1 - tanh^2 (1e-4 at clamp 1e-3, for s where tanh saturates and the
    true gradient is 0): there too."""
    return (device.type in SAVE_FACTOR_ON and SCALE_MODES[scale] in FACTOR_MODES
            and not (scale == "tanh" and not 1.0 <= clamp <= 80.0)
            and (needs_grad(*tensors) or under_functorch_or_forward_ad(*tensors)))


def _run(x, shift, scale_raw, logdet, mode, clamp, inverse, impl, save_factor):
    return _kernel(impl, "affine_coupling_fwd")(x, shift, scale_raw, mode, clamp, inverse, logdet, save_factor)


def _save(ctx, inputs, outputs):
    x, _, scale_raw, logdet, mode, clamp, inverse, impl, save_factor = inputs
    out, _, factor = outputs
    # The backward needs x: the input going forward, the output going back.
    ctx.save_for_backward(out if inverse else x, factor if save_factor else scale_raw)
    ctx.config = (save_factor, mode, clamp, inverse, impl)
    ctx.has_logdet = logdet is not None


def _backward(ctx, grad_out, grad_logdet):
    saved, scale_or_factor = ctx.saved_tensors
    is_factor, mode, clamp, inverse, impl = ctx.config
    grad_out, grad_logdet = contiguous_grads(grad_out, grad_logdet, saved)
    grad_in, grad_s = _kernel(impl, "affine_coupling_bwd")(grad_out, grad_logdet, saved, scale_or_factor, is_factor, mode, clamp,
                                        inverse)
    grad_shift = -grad_in if inverse else grad_out
    return grad_in, grad_shift, grad_s, (grad_logdet if ctx.has_logdet else None), None, None, None, None, None


_FUNCTIONS = kernel_functions("AffineCouplingFunction", _run, _save, _backward)


def affine_coupling(
    x: torch.Tensor,
    shift: torch.Tensor,
    scale_raw: torch.Tensor,
    *,
    scale: str = "exp",
    clamp: float = 2.0,
    inverse: bool = False,
    logdet: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Affine coupling transform of x (B, ...) by shift and raw scale of the same shape.

    Returns (out, logdet): out has x's shape and dtype; logdet has shape (B,), float32
    (float64 for float64 input), summed over all non-batch dims and added to `logdet` when
    one is given. inverse=True applies the inverse map with the negated log-det.
    """
    _checks.tensor("x", x)
    _checks.like("shift", shift, "x", x)
    _checks.like("scale_raw", scale_raw, "x", x)
    _checks.choice("scale", scale, SCALES)
    clamp = _checks.positive("clamp", clamp)
    inverse = _checks.flag("inverse", inverse)
    logdet = _checks.running_logdet(logdet, x)
    impl = resolve_op(x.device, x.dtype, "affine_coupling_fwd")
    if impl == "reference":
        return affine_coupling_ref(x, shift, scale_raw, scale=scale, clamp=clamp, inverse=bool(inverse), logdet=logdet)
    dtype = x.dtype
    x, shift, scale_raw = kernel_inputs(kernel_dtype(impl, x.device, dtype), x, shift, scale_raw)
    mode, inverse = SCALE_MODES[scale], bool(inverse)
    save_factor = _save_factor(x.device, scale, clamp, x, shift, scale_raw)
    out, ld = apply(_FUNCTIONS, _run, (x, shift, scale_raw, logdet),
                    x, shift, scale_raw, logdet, mode, clamp, inverse, impl, save_factor)
    return out.to(dtype), ld


def _run_merge(kept, x, params, logdet, mode, clamp, inverse, impl, save_factor, kept_first):
    return _kernel(impl, "affine_coupling_merge_fwd")(kept, x, params, mode, clamp, inverse, logdet, save_factor,
                                                      kept_first)


def _save_merge(ctx, inputs, outputs):
    kept, x, params, logdet, mode, clamp, inverse, impl, save_factor, kept_first = inputs
    out, _, factor = outputs
    n = x.shape[1]
    # The backward needs x: the input going forward, the transformed part of the output going
    # back. The output itself is saved and sliced in the backward: a slice made here would be a
    # view of the node's own output, a reference cycle that kept the node alive (a leak).
    ctx.save_for_backward(out if inverse else x, factor if save_factor else params)
    ctx.config = (save_factor, mode, clamp, inverse, impl, kept_first, kept.shape[1])
    ctx.has_logdet = logdet is not None


def _backward_merge(ctx, grad_out, grad_logdet):
    saved, scale_or_factor = ctx.saved_tensors
    is_factor, mode, clamp, inverse, impl, kept_first, k = ctx.config
    if inverse:  # the whole output: its transformed columns
        saved = merged_columns(saved, k, kept_first)[1]
    if not is_factor:  # the whole params: the raw scale half
        scale_or_factor = scale_or_factor[:, scale_or_factor.shape[1] // 2:]
    saved, scale_or_factor = _rows(saved), _rows(scale_or_factor)  # views, but for an empty batch
    # The kernel takes grad_out at any row stride; zeros for an unused output.
    grad_out = saved.new_zeros((saved.shape[0], k + saved.shape[1])) if grad_out is None else _rows(grad_out)
    grad_logdet = None if grad_logdet is None else grad_logdet.contiguous()
    grad_x, grad_params = _kernel(impl, "affine_coupling_merge_bwd")(grad_out, grad_logdet, saved, scale_or_factor,
                                                                     is_factor, mode, clamp, inverse, kept_first)
    # kept passes through unchanged: its gradient is grad_out's kept columns, a view.
    grad_kept = merged_columns(grad_out, k, kept_first)[0]
    return (grad_kept, grad_x, grad_params, (grad_logdet if ctx.has_logdet else None), None, None, None, None, None,
            None)


_MERGE_FUNCTIONS = kernel_functions("AffineCouplingMergeFunction", _run_merge, _save_merge, _backward_merge)


def _rows(t: torch.Tensor) -> torch.Tensor:
    """t as (B, N) with contiguous rows (a view when t's layout allows, as for a slice of dim 1
    of a contiguous tensor), which the merge kernels take at any row stride. An empty t counts
    as contiguous whatever its strides (.contiguous() returns it as it is, an expanded .sum()
    gradient with strides (0, 0) too): it is cloned to fresh strides, in the graph."""
    t = t.reshape(t.shape[0], math.prod(t.shape[1:]))
    if t.numel() == 0:
        return t.clone(memory_format=torch.contiguous_format)
    return t if t.shape[1] <= 1 or t.stride(1) == 1 else t.contiguous()


def affine_coupling_merge(
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
    """A coupling layer's transform and merge in one fused pass.

    x (B, C, ...) is transformed by params (B, 2C, ...) = [shift | raw scale] along dim 1 (a
    conditioner's output as it comes: no split, no copies) and concatenated along dim 1 with
    kept (B, K, ...), which passes through unchanged: out = cat([kept, y]) (kept_first) or
    cat([y, kept]). kept, x and params may be views (e.g. the two halves of a row). Returns
    (out (B, K + C, ...), logdet (B,)) with affine_coupling's scale, clamp, inverse and logdet
    semantics. The backward writes the gradients of shift and raw scale into one (B, 2C, ...)
    tensor and hands kept the matching columns of the incoming gradient as a view.
    """
    _checks.tensor("x", x)
    _checks.tensor("kept", kept)
    _checks.tensor("params", params)
    for name, t in (("kept", kept), ("params", params)):
        if t.dtype != x.dtype:
            raise TypeError(f"{name} must have the dtype of x ({x.dtype}), got {t.dtype}")
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}")
    if x.dim() < 2 or kept.dim() != x.dim() or kept.shape[0] != x.shape[0] or kept.shape[2:] != x.shape[2:]:
        raise ValueError(f"kept must have x's shape {tuple(x.shape)} except in dim 1, got {tuple(kept.shape)}")
    if params.shape != (x.shape[0], 2 * x.shape[1], *x.shape[2:]):
        raise ValueError(f"params must have shape {(x.shape[0], 2 * x.shape[1], *x.shape[2:])} ([shift | raw scale] "
                         f"along dim 1), got {tuple(params.shape)}")
    _checks.choice("scale", scale, SCALES)
    clamp = _checks.positive("clamp", clamp)
    logdet = _checks.running_logdet(logdet, x)
    kept_first, inverse = _checks.flag("kept_first", kept_first), _checks.flag("inverse", inverse)
    impl = resolve_op(x.device, x.dtype, "affine_coupling_merge_fwd")
    if impl == "reference":
        return affine_coupling_merge_ref(kept, x, params, kept_first=kept_first, scale=scale, clamp=clamp,
                                         inverse=inverse, logdet=logdet)
    dtype, shape = x.dtype, (x.shape[0], kept.shape[1] + x.shape[1], *x.shape[2:])
    compute = kernel_dtype(impl, x.device, dtype)
    kept, x, params = _rows(kept.to(compute)), _rows(x.to(compute)), _rows(params.to(compute))
    save_factor = _save_factor(x.device, scale, clamp, kept, x, params)
    out, ld = apply(_MERGE_FUNCTIONS, _run_merge, (kept, x, params, logdet),
                    kept, x, params, logdet, SCALE_MODES[scale], clamp, inverse, impl, save_factor, kept_first)
    return out.view(shape).to(dtype), ld


def affine_coupling_merge_backward_from_output(
    grad_out: Optional[torch.Tensor],
    grad_logdet: Optional[torch.Tensor],
    out: torch.Tensor,
    params: torch.Tensor,
    *,
    kept: int,
    kept_first: bool = True,
    scale: str = "exp",
    clamp: float = 2.0,
    inverse: bool = False,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """affine_coupling_merge's backward from its OUTPUT alone, for memory-saving backprop (which
    keeps no input): one kernel pass rebuilds the op's input from `out` and computes the gradients.

    out (B, K + C, ...) is the op's output with `kept` = K kept channels (first or last), params
    (B, 2C, ...) the conditioner's output, grad_out (like out, or None: zero) and grad_logdet
    ((B,) or None) the incoming gradients. Returns (the op's input (B, K + C, ...): out's kept part
    and the rebuilt transformed part; the gradient w.r.t. that input through the transform, kept
    part = grad_out's; the gradient w.r.t. params), no autograd graph. The rebuilt input matches
    affine_coupling_merge's inverse to rounding (1 / m is a division here).
    """
    _checks.tensor("out", out)
    _checks.tensor("params", params)
    n_channels = params.shape[1] // 2 if params.dim() >= 2 else 0
    if params.dim() < 2 or params.shape != (out.shape[0], 2 * n_channels, *out.shape[2:]) or not (
            0 < n_channels and 0 <= kept and kept + n_channels == out.shape[1]):
        raise ValueError(f"params {tuple(params.shape)} and kept={kept} do not fit out {tuple(out.shape)}")
    if grad_out is not None:
        _checks.like("grad_out", grad_out, "out", out)
    _checks.choice("scale", scale, SCALES)
    clamp = _checks.positive("clamp", clamp)
    kept_first, inverse = _checks.flag("kept_first", kept_first), _checks.flag("inverse", inverse)
    grad_logdet = None if grad_logdet is None else _checks.running_logdet(grad_logdet, out)
    impl = resolve_op(out.device, out.dtype, "affine_coupling_merge_bwd_out")
    if grad_out is None:
        grad_out = torch.zeros_like(out)
    if impl == "reference":
        rebuilt, grad_x, grad_params = affine_coupling_merge_bwd_out_ref(
            grad_out, grad_logdet, out, params, kept=kept, kept_first=kept_first, scale=scale, clamp=clamp,
            inverse=inverse)
    else:
        dtype = out.dtype
        compute = kernel_dtype(impl, out.device, dtype)
        rebuilt, grad_x, grad_params = _kernel(impl, "affine_coupling_merge_bwd_out")(
            _rows(grad_out.to(compute)), grad_logdet, _rows(out.to(compute)), _rows(params.to(compute)),
            SCALE_MODES[scale], clamp, inverse, kept_first)
        shape = (out.shape[0], n_channels, *out.shape[2:])
        rebuilt, grad_x = rebuilt.view(shape).to(dtype), grad_x.view(shape).to(dtype)
        grad_params = grad_params.view(params.shape).to(dtype)
    kept_out, kept_grad = merged_columns(out, kept, kept_first)[0], merged_columns(grad_out, kept, kept_first)[0]
    return (merge_columns(kept_out, rebuilt, kept_first), merge_columns(kept_grad, grad_x, kept_first), grad_params)


def affine_coupling_merge_bwd_out_ref(grad_out, grad_logdet, out, params, *, kept, kept_first, scale, clamp, inverse):
    """The reference of the backward from the output: the input rebuilt with the op's inverse,
    the gradients by autograd through the reference op. Returns (rebuilt transformed part,
    its gradient, the params' gradient)."""
    n = params.shape[1] // 2
    moved, g = merged_columns(out, kept, kept_first)[1], merged_columns(grad_out, kept, kept_first)[1]
    shift, raw = params[:, :n], params[:, n:]
    with torch.no_grad():
        rebuilt, _ = affine_coupling_ref(moved, shift, raw, scale=scale, clamp=clamp, inverse=not inverse)
    with torch.enable_grad():
        x = rebuilt.detach().requires_grad_(True)
        p = params.detach().requires_grad_(True)
        y, ld = affine_coupling_ref(x, p[:, :n], p[:, n:], scale=scale, clamp=clamp, inverse=inverse)
        outputs, grads = [y], [g]
        if grad_logdet is not None:
            outputs.append(ld)
            grads.append(grad_logdet.to(ld.dtype))
        grad_x, grad_params = torch.autograd.grad(outputs, [x, p], grads)
    return rebuilt, grad_x, grad_params


# Positions of the tensor arguments of the fwd / bwd kernel ops (both the compiled and the
# Triton ones share these schemas), for their vmap rules.
FWD_TENSOR_ARGS = (0, 1, 2, 6)
BWD_TENSOR_ARGS = (0, 1, 2, 3)
MERGE_FWD_TENSOR_ARGS = (0, 1, 2, 6)
MERGE_BWD_TENSOR_ARGS = (0, 1, 2, 3)


def _register_fakes() -> None:
    if not _ext.available():
        return
    register_row_vmap("flowkern::affine_coupling_fwd", FWD_TENSOR_ARGS)
    register_row_vmap("flowkern::affine_coupling_bwd", BWD_TENSOR_ARGS)

    @torch.library.register_fake("flowkern::affine_coupling_fwd")
    def _fwd_fake(x, shift, scale_raw, mode, clamp, inverse, logdet, save_factor):
        factor = torch.empty_like(x) if save_factor else x.new_empty((0,))
        return torch.empty_like(x), x.new_empty((x.shape[0],), dtype=_checks.logdet_dtype(x.dtype)), factor

    @torch.library.register_fake("flowkern::affine_coupling_bwd")
    def _bwd_fake(grad_out, grad_logdet, saved, scale_or_factor, is_factor, mode, clamp, inverse):
        return torch.empty_like(saved), torch.empty_like(saved)

    if not _ext.has_op("affine_coupling_merge_fwd"):
        return
    register_row_vmap("flowkern::affine_coupling_merge_fwd", MERGE_FWD_TENSOR_ARGS)
    register_row_vmap("flowkern::affine_coupling_merge_bwd", MERGE_BWD_TENSOR_ARGS)

    @torch.library.register_fake("flowkern::affine_coupling_merge_fwd")
    def _merge_fwd_fake(kept, x, params, mode, clamp, inverse, logdet, save_factor, kept_first):
        factor = x.new_empty(x.shape) if save_factor else x.new_empty((0,))
        out = x.new_empty((x.shape[0], kept.shape[1] + x.shape[1]))
        return out, x.new_empty((x.shape[0],), dtype=_checks.logdet_dtype(x.dtype)), factor

    if _ext.has_op("affine_coupling_merge_bwd_out"):
        @torch.library.register_fake("flowkern::affine_coupling_merge_bwd_out")
        def _merge_bwd_out_fake(grad_out, grad_logdet, out, params, mode, clamp, inverse, kept_first):
            n = params.shape[1] // 2
            return out.new_empty((out.shape[0], n)), out.new_empty((out.shape[0], n)), params.new_empty(params.shape)

    @torch.library.register_fake("flowkern::affine_coupling_merge_bwd")
    def _merge_bwd_fake(grad_out, grad_logdet, saved, scale_or_factor, is_factor, mode, clamp, inverse, kept_first):
        return saved.new_empty(saved.shape), saved.new_empty((saved.shape[0], 2 * saved.shape[1]))


_register_fakes()
