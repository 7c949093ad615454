"""The Triton spline kernels on a general interval [lo, hi] and with learned end derivatives
(tails=None, nflows' rational_quadratic_spline) against the float64 reference.

Calls flowkern.triton.rq_spline's launchers directly (through a small autograd.Function), as
tests/test_rq_spline_styles_triton.py does: forward and inverse, outputs, log-dets and the
backward launcher's gradients of x, params and the running log-det, within
tolerances.check_finite_and_agree's conditioned bound (2x the float32 reference's own error,
plus what perturbing every input by a few ulps moves the float64 answer, plus the knots'
rounding); round trips within tolerances.check_roundtrip's bound. The Triton interpreter is
slow: tiny shapes only. Run on the CPU with TRITON_INTERPRET=1 set before Python starts.
"""
from __future__ import annotations

import inspect
import math

import pytest
import torch

import flowkern
from flowkern.reference.rq_spline import interval, params_per_element, rq_spline_ref, spline_knots

from spline_launchers import DEVICE, LAUNCHER_OP, TRITON, launch_style, tk
from tolerances import check_finite_and_agree, check_roundtrip, make_case


pytestmark = TRITON

# Reference keywords per style (each with its tails).
STYLES = {
    "nflows-learned": dict(tails=None),
    "zuko-learned": dict(min_width=0.0, min_height=0.0, min_derivative=0.0, derivative="exp", slope=1e-3,
                         tails=None),
    "linear": dict(tails="linear"),
}
UNIT = (0.0, 1.0)  # nflows' rational_quadratic_spline's interval
ASYM = (-1.0, 2.5)


def make(shape, bins, tails, lohi, p_scale=1.0, seed=0, outside=0.2):
    """x mostly inside [lo, hi] (uniform, a margin of `outside` of the width either side), params
    and a running log-det, float64."""
    g = torch.Generator().manual_seed(seed)
    lo, hi = lohi
    span = hi - lo
    x = lo - outside * span + (1 + 2 * outside) * span * torch.rand(shape, generator=g, dtype=torch.float64)
    params = torch.randn(*shape, params_per_element(bins, tails), generator=g, dtype=torch.float64) * p_scale
    logdet = torch.randn(shape[0], generator=g, dtype=torch.float64)
    return x, params, logdet


def case_of(x, params, logdet, bins, lohi, inverse, style, seed=0):
    return make_case("rq_spline", dict(x=x, params=params, logdet=logdet),
                     dict(bins=bins, bound=tuple(lohi), inverse=inverse, **style), seed=seed)


def agree(x, params, logdet, bins, lohi, inverse, style, seed=0):
    check_finite_and_agree(LAUNCHER_OP, case_of(x, params, logdet, bins, lohi, inverse, style, seed), "triton",
                           DEVICE)


def launch(x, params, bins, lohi, inverse, style, logdet=None, grad_out=None, grad_logdet=None):
    """(out, logdet, grad_x, grad_params) of the launchers on float32 copies on DEVICE."""
    dev = lambda t: None if t is None else t.to(DEVICE, torch.float32).contiguous()  # noqa: E731
    x, params = dev(x), dev(params)
    a = launch_style(style)
    out, ld = tk().rq_spline_fwd(x, params, bins, *lohi, inverse, dev(logdet), *a)
    g = dev(grad_out) if grad_out is not None else torch.ones_like(x)
    gx, gp = tk().rq_spline_bwd(g, dev(grad_logdet), x, params, bins, *lohi, inverse, *a)
    return tuple(t.cpu() for t in (out, ld, gx, gp))


LEARNED_STYLES = ["nflows-learned", "zuko-learned"]


@pytest.mark.parametrize("with_logdet", [False, True], ids=["no-logdet", "logdet"])
@pytest.mark.parametrize("bins", [1, 2, 8])
@pytest.mark.parametrize("inverse", [False, True], ids=["fwd", "inv"])
@pytest.mark.parametrize("style", LEARNED_STYLES)
def test_learned_ends_on_unit_interval(style, inverse, bins, with_logdet):
    """tails=None on [0, 1] (nflows' default): outputs, log-dets and every gradient."""
    x, params, logdet = make((3, 5), bins, None, UNIT, seed=bins + 10 * inverse)
    x[0, :3] = torch.tensor([0.0, 1.0, 1.5])  # lo, hi, and outside (identity)
    agree(x, params, logdet if with_logdet else None, bins, UNIT, inverse, STYLES[style], seed=bins)


@pytest.mark.parametrize("bins", [1, 2, 8])
@pytest.mark.parametrize("inverse", [False, True], ids=["fwd", "inv"])
@pytest.mark.parametrize("style", ["linear", "nflows-learned", "zuko-learned"])
def test_asymmetric_interval(style, inverse, bins):
    x, params, logdet = make((2, 6), bins, STYLES[style]["tails"], ASYM, seed=20 + bins)
    x[0, :4] = torch.tensor([ASYM[0], ASYM[1], -1.5, 3.0])
    agree(x, params, logdet, bins, ASYM, inverse, STYLES[style], seed=bins)


@pytest.mark.parametrize("lohi", [UNIT, ASYM], ids=["unit", "asym"])
@pytest.mark.parametrize("inverse", [False, True], ids=["fwd", "inv"])
@pytest.mark.parametrize("style", ["linear", "nflows-learned", "zuko-learned"])
def test_at_knots_ends_and_outside(style, inverse, lohi):
    """Every interior knot (x knots, or y knots going back), lo and hi exactly, and points just
    and far outside."""
    bins = 4
    tails = STYLES[style]["tails"]
    x, params, logdet = make((3, 8), bins, tails, lohi, seed=3)
    xk, yk, _ = spline_knots(params.float().double(), bins, lohi, **STYLES[style])
    knots = yk if inverse else xk
    lo, hi = lohi
    for j in range(3):  # elements 0, 1, 2 at their own interior knots 1, 2, 3
        x[:, j] = knots[:, j, j + 1]
    x[:, 3], x[:, 4] = lo, hi
    x[:, 5] = torch.tensor([lo - 1e-6, hi + 1e-6, -1e6])
    x[:, 6] = torch.tensor([hi * 1.0000001 + 1e-7, 50.0, lo - 0.5])
    agree(x, params, logdet, bins, lohi, inverse, STYLES[style], seed=3)


@pytest.mark.parametrize("lohi", [UNIT, ASYM], ids=["unit", "asym"])
@pytest.mark.parametrize("inverse", [False, True], ids=["fwd", "inv"])
@pytest.mark.parametrize("style", ["linear", "nflows-learned", "zuko-learned"])
def test_outside_the_interval_is_the_identity(style, inverse, lohi):
    bins = 3
    lo, hi = lohi
    _, params, _ = make((2, 5), bins, STYLES[style]["tails"], lohi, seed=4)
    x = torch.tensor([[hi + 2e-7 * max(1.0, abs(hi)), lo - 0.5, 1e30, -7.0, (lo + hi) / 2],
                      [-1e6, 8.0, lo + 0.25, 1e4, lo - 1e-6]], dtype=torch.float64)
    g = torch.randn(2, 5, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    gl = torch.tensor([0.7, -1.3], dtype=torch.float64)
    out, ld, gx, gp = launch(x, params, bins, lohi, inverse, STYLES[style], grad_out=g, grad_logdet=gl)
    xf = x.float()
    outside = (xf < lo) | (xf > hi)
    assert outside.sum() == 8
    assert torch.equal(out[outside], xf[outside])  # the input itself, exactly
    assert torch.equal(gx[outside], g.float()[outside])
    assert torch.equal(gp[outside], torch.zeros_like(gp[outside]))
    for t in (out, ld, gx, gp):
        assert torch.isfinite(t).all()
    # the log-det holds only the inside elements' terms (float64 reference on the same inputs)
    y_ref, ld_ref = rq_spline_ref(xf.double(), params.float().double(), bins=bins, bound=lohi, inverse=inverse,
                                  **STYLES[style])
    torch.testing.assert_close(out.double(), y_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ld.double(), ld_ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("with_logdet", [False, True], ids=["no-logdet", "logdet"])
@pytest.mark.parametrize("bins", [1, 2, 8])
@pytest.mark.parametrize("lohi", [UNIT, ASYM], ids=["unit", "asym"])
@pytest.mark.parametrize("style", ["linear", "nflows-learned", "zuko-learned"])
def test_round_trip(style, lohi, bins, with_logdet):
    """inverse(forward(x)) == x and the log-dets cancel, within tolerances.check_roundtrip."""
    x, params, logdet = make((2, 6), bins, STYLES[style]["tails"], lohi, seed=30 + bins)
    x[0, :2] = torch.tensor(lohi)
    case = case_of(x, params, logdet if with_logdet else None, bins, lohi, False, STYLES[style], seed=bins)
    check_roundtrip(LAUNCHER_OP, case, "triton", DEVICE)


def test_end_slopes_reach_the_kernels():
    """Learned ends whose raw params give d_0 = d_K = 1 reproduce linear tails (to the rounding
    of softplus(raw) = 1 - d_min), other end params change only the first and last bins, and
    their gradients go to the end columns exactly where the element is in the first or last bin."""
    from flowkern.reference.rq_spline import identity_derivative_raw

    bins = 3
    x, p_lin, _ = make((2, 8), bins, "linear", ASYM, seed=5, outside=0.0)
    raw = identity_derivative_raw()
    ends = torch.full(p_lin.shape[:-1] + (1,), raw, dtype=torch.float64)
    p_learned = torch.cat([p_lin[..., :2 * bins], ends, p_lin[..., 2 * bins:], ends], dim=-1)
    lin = launch(x, p_lin, bins, ASYM, False, STYLES["linear"])
    learned = launch(x, p_learned, bins, ASYM, False, STYLES["nflows-learned"])
    for a, b in zip(lin[:3], learned[:3]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lin[3], torch.cat([learned[3][..., :2 * bins], learned[3][..., 2 * bins + 1:-1]], -1),
                               rtol=1e-5, atol=1e-5)
    xk, _, _ = spline_knots(p_learned.float().double(), bins, ASYM, tails=None)
    xf = x.float().double()
    first = xf < xk[..., 1]
    last = xf >= xk[..., -2]
    gp = learned[3]
    assert torch.equal(gp[..., 2 * bins] != 0, first)
    assert torch.equal(gp[..., -1] != 0, last)


def test_vmap_and_fake_tensors_take_the_interval_and_tails():
    """The ops' vmap rules (the running log-det now at position 6) and shape-only fakes."""
    bins = 2
    style = launch_style(STYLES["zuko-learned"])
    x, params, logdet = make((2, 3, 4), bins, None, ASYM, seed=7)
    x, params = x.to(DEVICE, torch.float32), params.to(DEVICE, torch.float32)
    logdet = torch.randn(2, 3, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    fn = lambda a, p, l: tk().rq_spline_fwd(a, p, bins, *ASYM, False, l, *style)  # noqa: E731
    out, ld = torch.func.vmap(fn)(x, params, logdet)
    for i in range(2):
        o, l = fn(x[i].contiguous(), params[i].contiguous(), logdet[i].contiguous())
        torch.testing.assert_close(out[i], o, rtol=0, atol=0)
        torch.testing.assert_close(ld[i], l, rtol=0, atol=0)
    from torch._subclasses.fake_tensor import FakeTensorMode

    x0, p0 = x[0].contiguous(), params[0].contiguous()
    with FakeTensorMode() as mode:
        fx, fp = mode.from_tensor(x0), mode.from_tensor(p0)
        o, l = torch.ops.flowkern.rq_spline_fwd_triton(fx, fp, bins, *ASYM, True, None, *style)
        gx, gp = torch.ops.flowkern.rq_spline_bwd_triton(o, l, fx, fp, bins, *ASYM, True, *style)
    assert o.shape == fx.shape and l.shape == (3,) and gx.shape == fx.shape and gp.shape == fp.shape


def test_interval_and_flag_arguments():
    """lo and hi are runtime kernel arguments; LEARNED is compile-time; the public tables."""
    import triton.language as tl

    for kernel in (tk()._rq_spline_fwd_kernel, tk()._rq_spline_bwd_kernel):
        params = inspect.signature(kernel.fn).parameters
        for name in ("lo", "hi"):
            assert params[name].annotation is not tl.constexpr, name
        assert params["LEARNED"].annotation is tl.constexpr
    assert tk().FWD_TENSOR_ARGS == (0, 1, 6) and tk().BWD_TENSOR_ARGS == (0, 1, 2, 3)
    assert tk().DEFAULT_STYLE[-1] is False and len(tk().DEFAULT_STYLE) == 6
    fwd = inspect.signature(tk().rq_spline_fwd).parameters
    assert list(fwd) == ["x", "params", "bins", "lo", "hi", "inverse", "logdet", "min_width", "min_height",
                         "min_derivative", "exp_derivative", "log_slope", "learned_ends"]
    bwd = inspect.signature(tk().rq_spline_bwd).parameters
    assert list(bwd) == ["grad_out", "grad_logdet", "x_in", "params", "bins", "lo", "hi", "inverse", "min_width",
                         "min_height", "min_derivative", "exp_derivative", "log_slope", "learned_ends"]


@pytest.mark.parametrize("lohi", [(1.0, 1.0), (2.0, -1.0), (math.nan, 1.0), (0.0, math.inf), (-math.inf, 0.0),
                                  (-1e308, 1e308)])
def test_bad_intervals_are_rejected(lohi):
    bins = 2
    x, params, _ = make((2, 2), bins, "linear", UNIT)
    x, params = x.to(DEVICE, torch.float32), params.to(DEVICE, torch.float32)
    style = tk().DEFAULT_STYLE
    with pytest.raises(ValueError, match="interval"):
        tk().rq_spline_fwd(x, params, bins, *lohi, False, None, *style)
    with pytest.raises(ValueError, match="interval"):
        tk().rq_spline_bwd(x, None, x, params, bins, *lohi, False, *style)


@pytest.mark.parametrize("learned", [False, True])
def test_params_length_follows_the_tails(learned):
    """3 bins - 1 params with linear tails, 3 bins + 1 with learned ends: the other is rejected."""
    bins = 3
    x, params, _ = make((2, 2), bins, "linear" if learned else None, UNIT)  # the wrong length
    x, params = x.to(DEVICE, torch.float32), params.to(DEVICE, torch.float32)
    style = tk().DEFAULT_STYLE[:-1] + (learned,)
    with pytest.raises(ValueError, match="params must have shape"):
        tk().rq_spline_fwd(x, params, bins, *UNIT, False, None, *style)
    with pytest.raises(ValueError, match="params must have shape"):
        tk().rq_spline_bwd(x, None, x, params, bins, *UNIT, False, *style)
