"""The Triton spline launchers called directly, for the Triton spline tests
(test_rq_spline_styles_triton.py, test_rq_spline_tails_triton.py): a small autograd.Function
that differentiates the fwd launcher by the bwd launcher (what the op layer wires up), and the
repository's spline op definition (tolerances.OPS) calling it."""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch

import flowkern
from flowkern.reference.rq_spline import interval, rq_spline_ref

from tolerances import OPS


def _device():
    if "triton" not in flowkern.available_backends():
        return None
    return "cuda" if torch.cuda.is_available() else "cpu"


DEVICE = _device()
TRITON = [pytest.mark.triton,
          pytest.mark.skipif(DEVICE is None, reason="Triton needs a CUDA device or TRITON_INTERPRET=1")]
STYLE_KEYS = ("min_width", "min_height", "min_derivative", "derivative", "slope", "tails")


def tk():
    from flowkern.triton import rq_spline

    return rq_spline


def launch_style(style: dict) -> tuple:
    """The launchers' (min_width, min_height, min_derivative, exp_derivative, log_slope, learned_ends)."""
    slope = style.get("slope")
    return (style.get("min_width", 1e-3), style.get("min_height", 1e-3), style.get("min_derivative", 1e-3),
            style.get("derivative", "softplus") == "exp", 0.0 if slope is None else math.log(slope),
            style.get("tails", "linear") is None)


class _Launchers(torch.autograd.Function):
    """The fwd launcher, differentiated by the bwd launcher (what the op layer wires up)."""

    @staticmethod
    def forward(ctx, x, params, logdet, bins, lo, hi, inverse, style):
        out, ld = tk().rq_spline_fwd(x, params, bins, lo, hi, inverse, logdet, *style)
        ctx.save_for_backward(x, params)
        ctx.config = (bins, lo, hi, inverse, style, logdet is not None)
        return out, ld

    @staticmethod
    def backward(ctx, grad_out, grad_logdet):
        x, params = ctx.saved_tensors
        bins, lo, hi, inverse, style, has_logdet = ctx.config
        grad_out = torch.zeros_like(x) if grad_out is None else grad_out.contiguous()
        gx, gp = tk().rq_spline_bwd(grad_out, grad_logdet, x, params, bins, lo, hi, inverse, *style)
        return gx, gp, (grad_logdet if has_logdet else None), None, None, None, None, None


def launcher_call(t, kw, reference):
    if reference:
        return rq_spline_ref(t["x"], t["params"], logdet=t.get("logdet"), **kw)
    style = launch_style({k: v for k, v in kw.items() if k in STYLE_KEYS})
    lo, hi = interval(kw["bound"])
    return _Launchers.apply(t["x"].contiguous(), t["params"].contiguous(), t.get("logdet"), kw["bins"],
                            lo, hi, kw["inverse"], style)


# The repository's spline op definition (tolerances.OPS: conditioning, extra terms, parameter
# perturbation, round trip bound; all interval- and tails-aware), calling the launchers.
LAUNCHER_OP = dataclasses.replace(OPS["rq_spline"], call=launcher_call)
