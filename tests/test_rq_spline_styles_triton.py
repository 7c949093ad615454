"""The Triton spline kernels' knot styles against the float64 reference (flowkern.reference.rq_spline).

Calls flowkern.triton.rq_spline's launchers directly (through a small autograd.Function), so
the styles are tested on the kernels whatever the op layer passes: forward and inverse, the
outputs, log-dets and the backward launcher's gradients of x, params and the running log-det,
within tolerances.check_finite_and_agree's conditioned bound (2x the float32 reference's own
error, plus what perturbing every input by a few ulps moves the float64 answer, plus the knots'
rounding), the reference run with the same style keywords. The Triton interpreter is slow:
tiny shapes only. Run on the CPU with TRITON_INTERPRET=1 set before Python starts.
"""
from __future__ import annotations

import inspect
import math

import pytest
import torch

import flowkern
from flowkern.reference.rq_spline import rq_spline_ref, spline_knots

from spline_launchers import DEVICE, LAUNCHER_OP, TRITON, launch_style, tk
from tolerances import check_finite_and_agree, make_case


pytestmark = TRITON

BOUND = 3.0

# Reference keywords per style.
STYLES = {
    "default": {},
    "mins": dict(min_width=0.01, min_height=0.02, min_derivative=0.05),
    "zuko": dict(min_width=0.0, min_height=0.0, min_derivative=0.0, derivative="exp", slope=1e-3),
    "slope-softplus": dict(slope=1e-2),
}


def make(shape, bins, p_scale=1.0, x_scale=2.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64) * x_scale
    params = torch.randn(*shape, 3 * bins - 1, generator=g, dtype=torch.float64) * p_scale
    logdet = torch.randn(shape[0], generator=g, dtype=torch.float64)
    return x, params, logdet


def agree(x, params, logdet, bins, inverse, style, seed=0):
    case = make_case("rq_spline", dict(x=x, params=params, logdet=logdet),
                     dict(bins=bins, bound=BOUND, inverse=inverse, **style), seed=seed)
    check_finite_and_agree(LAUNCHER_OP, case, "triton", DEVICE)


def launch(x, params, bins, inverse, style, logdet=None, grad_out=None, grad_logdet=None):
    """(out, logdet, grad_x, grad_params) of the launchers on float32 copies on DEVICE."""
    dev = lambda t: None if t is None else t.to(DEVICE, torch.float32).contiguous()  # noqa: E731
    x, params = dev(x), dev(params)
    a = launch_style(style)
    out, ld = tk().rq_spline_fwd(x, params, bins, -BOUND, BOUND, inverse, dev(logdet), *a)
    g = dev(grad_out) if grad_out is not None else torch.ones_like(x)
    gx, gp = tk().rq_spline_bwd(g, dev(grad_logdet), x, params, bins, -BOUND, BOUND, inverse, *a)
    return tuple(t.cpu() for t in (out, ld, gx, gp))


@pytest.mark.parametrize("style", list(STYLES), ids=list(STYLES))
@pytest.mark.parametrize("bins", [1, 3, 8])
@pytest.mark.parametrize("inverse", [False, True], ids=["fwd", "inv"])
def test_styles_match_reference(style, bins, inverse):
    x, params, logdet = make((3, 7), bins, seed=bins)
    x[0, :3] = torch.tensor([4.5, -1e3, BOUND])  # outside (identity) and exactly at +bound
    agree(x, params, logdet, bins, inverse, STYLES[style], seed=bins)


@pytest.mark.parametrize("style", ["mins", "zuko"])
@pytest.mark.parametrize("inverse", [False, True], ids=["fwd", "inv"])
def test_styles_at_knots_bounds_and_outside(style, inverse):
    bins = 4
    x, params, logdet = make((3, 6), bins, seed=3)
    xk, yk, _ = spline_knots(params, bins, BOUND, **STYLES[style])
    knots = yk if inverse else xk
    x = knots[..., 1].clone()  # the first interior knot of each element
    x[:, 0], x[:, 1], x[:, 2], x[:, 3] = -BOUND, BOUND, 50.0, -1e6
    x[:, 4] = knots[:, 4, 2]
    x[:, 5] = knots[:, 5, 3]
    agree(x, params, logdet, bins, inverse, STYLES[style], seed=3)


@pytest.mark.parametrize("style", list(STYLES), ids=list(STYLES))
@pytest.mark.parametrize("inverse", [False, True], ids=["fwd", "inv"])
def test_outside_the_bound_is_the_identity(style, inverse):
    bins = 3
    _, params, _ = make((2, 5), bins, seed=4)
    x = torch.tensor([[3.0000002, -3.5, 1e30, -7.0, 0.5], [-1e6, 8.0, 0.25, 1e4, -3.0000002]],
                     dtype=torch.float64)
    g = torch.randn(2, 5, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    gl = torch.tensor([0.7, -1.3], dtype=torch.float64)
    out, ld, gx, gp = launch(x, params, bins, inverse, STYLES[style], grad_out=g, grad_logdet=gl)
    xf = x.float()
    outside = xf.abs() > BOUND
    assert torch.equal(out[outside], xf[outside])  # the input itself, exactly
    assert torch.equal(gx[outside], g.float()[outside])
    assert torch.equal(gp[outside], torch.zeros_like(gp[outside]))
    # the log-det holds only the inside elements' terms: the reference's, and 0 for the outside
    y_ref, ld_ref = rq_spline_ref(xf.double(), params.float().double(), bins=bins, bound=BOUND, inverse=inverse,
                                  **STYLES[style])
    torch.testing.assert_close(out.double(), y_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ld.double(), ld_ref, rtol=1e-4, atol=1e-5)


def test_styles_change_the_spline():
    """Each style's knots differ from the default's: the style arguments reach the kernels."""
    bins = 3
    x, params, _ = make((2, 5), bins, x_scale=1.0, seed=5)
    base = launch(x, params, bins, False, STYLES["default"])
    for name in ("mins", "zuko", "slope-softplus"):
        other = launch(x, params, bins, False, STYLES[name])
        for a, b in zip(base, other):
            assert not torch.allclose(a, b, rtol=1e-3, atol=1e-4), name


@pytest.mark.parametrize("inverse", [False, True], ids=["fwd", "inv"])
def test_soft_clamp_keeps_huge_params_finite(inverse):
    """zuko's style clamps every raw param into (-|log slope|, |log slope|): exp derivatives and
    zero minimal sizes stay finite for params of 1e4 (which would overflow exp unclamped)."""
    bins = 8
    x, params, logdet = make((2, 5), bins, p_scale=1e4, seed=6)
    out, ld, gx, gp = launch(x, params, bins, inverse, STYLES["zuko"], logdet=logdet, grad_logdet=torch.ones(2))
    for t in (out, ld, gx, gp):
        assert torch.isfinite(t).all()
    y_ref, ld_ref = rq_spline_ref(x.float().double(), params.float().double(), bins=bins, bound=BOUND,
                                  inverse=inverse, logdet=logdet.float().double(), **STYLES["zuko"])
    torch.testing.assert_close(out.double(), y_ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ld.double(), ld_ref, rtol=1e-4, atol=1e-3)


def test_vmap_and_fake_tensors_take_the_style():
    """The ops' vmap rules and shape-only fakes forward the new arguments."""
    bins = 3
    style = launch_style(STYLES["zuko"])
    x, params, _ = make((2, 3, 4), bins, seed=7)
    x, params = x.to(DEVICE, torch.float32), params.to(DEVICE, torch.float32)
    fn = lambda a, p: tk().rq_spline_fwd(a, p, bins, -BOUND, BOUND, False, None, *style)  # noqa: E731
    out, ld = torch.func.vmap(fn)(x, params)
    for i in range(2):
        o, l = tk().rq_spline_fwd(x[i].contiguous(), params[i].contiguous(), bins, -BOUND, BOUND, False, None, *style)
        torch.testing.assert_close(out[i], o, rtol=0, atol=0)
        torch.testing.assert_close(ld[i], l, rtol=0, atol=0)
    from torch._subclasses.fake_tensor import FakeTensorMode

    x0, p0 = x[0].contiguous(), params[0].contiguous()
    with FakeTensorMode() as mode:
        fx, fp = mode.from_tensor(x0), mode.from_tensor(p0)
        o, l = torch.ops.flowkern.rq_spline_fwd_triton(fx, fp, bins, -BOUND, BOUND, True, None, *style)
        gx, gp = torch.ops.flowkern.rq_spline_bwd_triton(o, l, fx, fp, bins, -BOUND, BOUND, True, *style)
    assert o.shape == fx.shape and l.shape == (3,) and gx.shape == fx.shape and gp.shape == fp.shape


def test_style_values_are_runtime_arguments():
    """The minima and log_slope are runtime kernel arguments (no recompile per value); only the
    two flags are compile-time."""
    import triton.language as tl

    for kernel in (tk()._rq_spline_fwd_kernel, tk()._rq_spline_bwd_kernel):
        params = inspect.signature(kernel.fn).parameters
        for name in ("min_width", "min_height", "min_derivative", "log_slope"):
            assert params[name].annotation is not tl.constexpr, name
        for name in ("EXP_D", "CLAMP"):
            assert params[name].annotation is tl.constexpr, name


@pytest.mark.parametrize("bad, match", [
    (dict(min_width=0.5), "min_width"),
    (dict(min_height=-1e-3), "min_height"),
    (dict(min_derivative=-1.0), "min_derivative"),
    (dict(log_slope=0.5), "log_slope"),
    (dict(log_slope=math.nan), "log_slope"),
])
def test_bad_styles_are_rejected(bad, match):
    bins = 3
    x, params, _ = make((2, 2), bins)
    x, params = x.to(DEVICE, torch.float32), params.to(DEVICE, torch.float32)
    style = dict(zip(("min_width", "min_height", "min_derivative", "exp_derivative", "log_slope", "learned_ends"),
                     launch_style({})))
    style.update(bad)
    with pytest.raises(ValueError, match=match):
        tk().rq_spline_fwd(x, params, bins, -BOUND, BOUND, False, None, *style.values())
    with pytest.raises(ValueError, match=match):
        tk().rq_spline_bwd(x, None, x, params, bins, -BOUND, BOUND, False, *style.values())
