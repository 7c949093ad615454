"""flowkern.ops.rq_spline and SplineCoupling: agreement with nflows, knots and bounds, exact
inverses, log-dets, gradients, extreme inputs and parameters, errors."""
from __future__ import annotations

import pytest
import torch

from flowkern.nn.coupling import coupling_mask
from flowkern.nn.spline import SplineCoupling
from flowkern.ops.rq_spline import rq_spline
from flowkern.reference.rq_spline import identity_derivative_raw, rq_spline_ref, spline_knots

import flowkern
from tolerances import EPS, TINY, check_agree, check_op_roundtrip, make_case, spline_bin_terms, spline_roundtrip_bound
from layer_checks import check_batch_sizes, check_logdet_jacobian, check_round_trip, check_running_logdet, perturb_

BOUND = 3.0
ALL_BINS = list(range(1, 17))


def make(shape, bins, *, dtype=torch.float64, scale=1.0, spread=1.2, seed=0):
    """x uniform on [-spread * BOUND, spread * BOUND] and params N(0, scale^2) of x.shape + (3 bins - 1,)."""
    g = torch.Generator().manual_seed(seed)
    x = (torch.rand(shape, generator=g, dtype=torch.float64) * 2 - 1) * spread * BOUND
    p = torch.randn(tuple(shape) + (3 * bins - 1,), generator=g, dtype=torch.float64) * scale
    return x.to(dtype), p.to(dtype)


def nflows_spline(x, p, bins, inverse):
    """nflows' function on the same (N,) inputs: per-element outputs and log|dy/dx|."""
    rq = pytest.importorskip("nflows.transforms.splines.rational_quadratic")
    return rq.unconstrained_rational_quadratic_spline(
        x, p[:, :bins], p[:, bins:2 * bins], p[:, 2 * bins:], inverse=inverse, tails="linear", tail_bound=BOUND)


def knot_inputs(p, bins, inverse):
    """Every knot of every row (x knots, or y knots for the inverse) as one (N * (bins + 1),) input,
    with the matching params, knots and derivatives."""
    xk, yk, dk = spline_knots(p, bins, BOUND)
    k = p.shape[-1]
    pk = p.unsqueeze(1).expand(-1, bins + 1, k).reshape(-1, k)
    return (yk if inverse else xk).reshape(-1), pk, (xk if inverse else yk).reshape(-1), dk.reshape(-1)


# ---------------------------------------------------------------- the function itself


@pytest.mark.parametrize("inverse", [False, True], ids=["fwd", "inv"])
@pytest.mark.parametrize("bins", ALL_BINS)
def test_matches_nflows_float64(bins, inverse):
    x, p = make((500,), bins, scale=2.0, seed=bins)
    y_ref, lad_ref = nflows_spline(x, p, bins, inverse)
    y, ld = rq_spline(x, p, bins=bins, bound=BOUND, inverse=inverse)  # 1-D x: one element per row
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ld, lad_ref, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("inverse", [False, True], ids=["fwd", "inv"])
@pytest.mark.parametrize("bins", [1, 2, 5, 10, 16])
def test_tails_none_matches_nflows_float64(bins, inverse):
    """tails=None on bound=(0, 1) is nflows' rational_quadratic_spline (its tails=None): the same
    knots, K + 1 learned derivatives. The inverse's root differs from nflows' formula by rounding,
    pulled back by the slope (nflows' own x error on steep bins is of that size)."""
    rq = pytest.importorskip("nflows.transforms.splines.rational_quadratic")
    g = torch.Generator().manual_seed(bins)
    x = torch.rand(500, generator=g, dtype=torch.float64)
    x[:2] = torch.tensor([0.0, 1.0], dtype=torch.float64)
    p = torch.randn(500, 3 * bins + 1, generator=g, dtype=torch.float64)
    y_ref, lad_ref = rq.rational_quadratic_spline(x, p[:, :bins], p[:, bins:2 * bins], p[:, 2 * bins:],
                                                  inverse=inverse)
    y, ld = rq_spline(x, p, bins=bins, bound=(0.0, 1.0), tails=None, inverse=inverse)
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ld, lad_ref, rtol=1e-9, atol=1e-9)
    assert y[0].item() == 0.0 and y[1].item() == 1.0


def test_tails_none_outside_the_interval_is_the_identity():
    x = torch.tensor([[-0.5, 1.5, 0.25]], dtype=torch.float64)
    p = torch.randn(1, 3, 3 * 4 + 1, dtype=torch.float64)
    y, ld = rq_spline(x, p, bins=4, bound=(0.0, 1.0), tails=None)
    _, ld_inside = rq_spline(x[:, 2:], p[:, 2:], bins=4, bound=(0.0, 1.0), tails=None)
    assert y[0, 0].item() == -0.5 and y[0, 1].item() == 1.5
    torch.testing.assert_close(ld, ld_inside)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("inverse", [False, True], ids=["fwd", "inv"])
@pytest.mark.parametrize("bins", ALL_BINS)
def test_knots_and_bounds(bins, inverse, dtype):
    """At a knot the spline hits the other knot with slope d_k; x = knot_k lies in bin k, +-bound
    in the first / last bin (slope 1, log-det 0)."""
    _, p = make((20,), bins, dtype=dtype, scale=2.0, seed=100 + bins)
    v, pk, expected, dk = knot_inputs(p, bins, inverse)  # the knots as computed in dtype
    out, ld = rq_spline(v, pk, bins=bins, bound=BOUND, inverse=inverse)
    if dtype == torch.float32:
        # float32: the op at the knots within the conditioned bound of the float64 reference (the
        # knots moved by 8 ulps either way cross into the neighbouring bin, so the bound holds
        # its jump in the log-slope: in a flat bin one ulp of theta moves it by ~1e-4), not a
        # hand-set 2e-6 / 1e-3; the identities themselves are asserted in float64 below.
        check_agree("rq_spline", dict(x=v, params=pk), dict(bins=bins, bound=BOUND, inverse=inverse),
                    backend=flowkern.get_backend(), device="cpu")
        v, pk, expected, dk = knot_inputs(p.double(), bins, inverse)
        out, ld = rq_spline(v, pk, bins=bins, bound=BOUND, inverse=inverse)
    # float64: values of size BOUND = 3 through a dozen roundings (the knots' cumulative sums, the
    # root formula) agree to ~100 ulps of 3 (3e-14): 1e-12; the log-slope log(d_k) of O(1), its
    # derivative 1 / w up to ~1e3 in flat bins times those ulps: 1e-10.
    tol, ld_tol = 1e-12, 1e-10
    torch.testing.assert_close(out, expected, rtol=0, atol=tol)
    torch.testing.assert_close(ld, -dk.log() if inverse else dk.log(), rtol=0, atol=ld_tol)
    ends = v.abs() == BOUND
    assert ends.sum() == 40  # +-bound: the identity, up to the rounding of y_k + h_k
    torch.testing.assert_close(out[ends], v[ends], rtol=0, atol=tol)
    torch.testing.assert_close(ld[ends], torch.zeros_like(ld[ends]), rtol=0, atol=ld_tol)
    assert (out.abs() <= BOUND).all()
    if dtype == torch.float64:
        ref_out, ref_ld = nflows_spline(v, pk, bins, inverse)
        torch.testing.assert_close(out, ref_out, rtol=0, atol=1e-12)
        torch.testing.assert_close(ld, ref_ld, rtol=0, atol=1e-10)


@pytest.mark.parametrize("bins", ALL_BINS)
def test_round_trip_float64(bins):
    x, p = make((6, 40), bins, spread=1.5, seed=bins)  # a fifth of the points outside the bound
    y, ld = rq_spline(x, p, bins=bins, bound=BOUND)
    outside = x.abs() > BOUND
    assert outside.any() and torch.equal(y[outside], x[outside])
    # Both ways round, within the float64 intermediate's rounding pulled back by the inverse's
    # slope and the log-dets cancelling within their sums' rounding (tolerances.check_roundtrip),
    # not a hand-set 1e-9.
    for inverse in (False, True):
        check_op_roundtrip("rq_spline", dict(x=x, params=p), dict(bins=bins, bound=BOUND, inverse=inverse),
                           backend=flowkern.get_backend(), device="cpu", dtype=torch.float64)


@pytest.mark.parametrize("inverse", [False, True], ids=["fwd", "inv"])
@pytest.mark.parametrize("shape", [(3, 5), (2, 3, 2)])
def test_logdet_equals_jacobian(shape, inverse):
    bins = 5
    x, p = make(shape, bins, spread=1.3, seed=7)
    _, ld = rq_spline(x, p, bins=bins, bound=BOUND, inverse=inverse)
    for i in range(shape[0]):
        def f(v, i=i):
            return rq_spline(v.reshape((1,) + shape[1:]), p[i:i + 1], bins=bins, bound=BOUND, inverse=inverse)[0].reshape(-1)

        jac = torch.func.jacrev(f)(x[i].reshape(-1))
        torch.testing.assert_close(ld[i], torch.linalg.slogdet(jac).logabsdet, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("inverse", [False, True], ids=["fwd", "inv"])
@pytest.mark.parametrize("bins", [1, 2, 8])
def test_gradcheck_float64(bins, inverse):
    x, p = make((2, 3), bins, spread=1.3, seed=3)
    x, p = x.requires_grad_(), p.requires_grad_()
    assert torch.autograd.gradcheck(lambda v, q: rq_spline(v, q, bins=bins, bound=BOUND, inverse=inverse), (x, p))


# ---------------------------------------------------------------- extreme inputs and parameters


def extreme_params(n, bins, scale, dtype, seed):
    """Half the rows N(0, scale^2), half exactly +-scale."""
    g = torch.Generator().manual_seed(seed)
    p = torch.randn(n, 3 * bins - 1, generator=g, dtype=torch.float64) * scale
    p[n // 2:] = p[n // 2:].sign() * scale
    return p.to(dtype)


def extreme_values(p, bins, inverse, dtype, seed):
    """One value per row of p: knots, +-bound and their neighbours, zero, far outside, the largest
    finite numbers, and uniform values on [-bound, bound]."""
    n = p.shape[0]
    g = torch.Generator().manual_seed(seed)
    v = ((torch.rand(n, generator=g, dtype=torch.float64) * 2 - 1) * BOUND).to(dtype)
    xk, yk, _ = spline_knots(p, bins, BOUND)
    knots = yk if inverse else xk
    pick = torch.randint(0, bins + 1, (n,), generator=g)
    at_knot = torch.rand(n, generator=g) < 0.4
    v = torch.where(at_knot, knots[torch.arange(n), pick], v)
    big = torch.finfo(dtype).max
    b = torch.tensor(BOUND, dtype=dtype)
    special = torch.stack([b, -b, torch.nextafter(b, -b), torch.nextafter(-b, b), torch.nextafter(b, 2 * b),
                           torch.nextafter(-b, -2 * b), torch.tensor(0.0, dtype=dtype)]).to(dtype)
    special = torch.cat([special, torch.tensor([1e30, -1e30, big, -big], dtype=dtype)])
    v[:special.numel()] = special
    return v


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("scale", [1.0, 30.0, 1e4])
@pytest.mark.parametrize("inverse", [False, True], ids=["fwd", "inv"])
@pytest.mark.parametrize("bins", [1, 2, 8, 16])
def test_extreme_inputs_and_params_are_finite(bins, inverse, scale, dtype):
    p = extreme_params(300, bins, scale, dtype, seed=bins)
    v = extreme_values(p, bins, inverse, dtype, seed=bins)
    v, p = v.requires_grad_(), p.requires_grad_()
    out, ld = rq_spline(v, p, bins=bins, bound=BOUND, inverse=inverse)
    w = torch.randn(v.shape, dtype=torch.float64).to(dtype)
    gv, gp = torch.autograd.grad((out * w).sum() + ld.sum(), (v, p))
    for name, t in [("out", out), ("logdet", ld), ("grad x", gv), ("grad params", gp)]:
        assert torch.isfinite(t).all(), f"{name}: {int((~torch.isfinite(t)).sum())} non-finite"
    outside = v.detach().abs() > BOUND
    assert torch.equal(out[outside], v[outside]) and (ld[outside] == 0).all()
    assert (gv[outside] == w[outside]).all() and (gp[outside] == 0).all()
    inside = ~outside
    assert (out[inside].abs() <= BOUND).all()
    if dtype == torch.float64:  # the other direction recovers the input
        # within the intermediate's rounding pulled back by the second map's slope (flat bins of
        # extreme params magnify it: tolerances.spline_roundtrip_bound), the log-dets cancelling
        # within their sums' rounding and the log-slope's move (tolerances.check_roundtrip)
        # (computed here: the op's generic validity filter refuses these extreme inputs' gradients).
        x0, y0, ls = v.detach(), out.detach(), ld.detach()  # 1-D x: ld is each element's log-slope
        back, ld_back = rq_spline(y0, p.detach(), bins=bins, bound=BOUND, inverse=not inverse)
        eps = 2.0 ** -53
        bound = spline_roundtrip_bound(x0, y0, ls, BOUND, eps, TINY[torch.float64])
        err = (back - x0).abs()
        assert (err <= bound).all(), f"round trip: worst err {(err - bound).max():.3g} over the bound"
        case = make_case("rq_spline", dict(x=x0, params=p.detach()), dict(bins=bins, bound=BOUND, inverse=inverse),
                         dtype=torch.float64)
        _, terms = spline_bin_terms(case)
        # The log-slope moves with the inverse's own position in the bin, known only to within the
        # round-trip bound (x may round back exactly while the root formula's theta did not):
        # |d log-slope / dx| <= terms, times the bound.
        ld_tol = 2.0 ** 10 * eps * (ls.abs() + 2) + torch.where(terms > 0, 4 * terms * bound, 0.0)  # 0 outside
        bad = ~((ld_back + ls).abs() <= ld_tol)
        assert not bad.any(), (f"log-dets do not cancel: {(ld_back + ls).abs()[bad][:3].tolist()} vs {ld_tol[bad][:3].tolist()}; "
                               f"x {x0[bad][:3].tolist()} log-slope {ls[bad][:3].tolist()} err {err[bad][:3].tolist()}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("scale", [1.0, 100.0, 1e4])
def test_inverse_of_any_finite_y_is_finite_and_solves(scale, dtype):
    """y no forward produced: uniform on the bound, next to the y knots, random magnitudes.
    nflows asserts on a negative discriminant here; the inverse must return the solution."""
    bins, n = 8, 4000
    p = extreme_params(n, bins, scale, dtype, seed=11)
    g = torch.Generator().manual_seed(12)
    _, yk, _ = spline_knots(p, bins, BOUND)
    near = yk[torch.arange(n), torch.randint(0, bins + 1, (n,), generator=g)]
    near = torch.nextafter(near, torch.where(torch.rand(n, generator=g) < 0.5, near - 1, near + 1))
    uniform = ((torch.rand(n, generator=g, dtype=torch.float64) * 2 - 1) * BOUND).to(dtype)
    wide = (torch.randn(n, generator=g, dtype=torch.float64) * 10.0 ** (torch.rand(n, generator=g) * 76 - 38)).to(dtype)
    choice = torch.randint(0, 3, (n,), generator=g)
    y = torch.where(choice == 0, near, torch.where(choice == 1, uniform, wide))
    x, ld = rq_spline(y, p, bins=bins, bound=BOUND, inverse=True)
    assert torch.isfinite(x).all() and torch.isfinite(ld).all()
    inside = y.abs() <= BOUND
    assert (x[inside].abs() <= BOUND).all() and torch.equal(x[~inside], y[~inside])
    # Solves f(x) = y: the residual in y is at most the slope times x's own rounding.
    y2, ld2 = rq_spline(x, p, bins=bins, bound=BOUND)
    slope = ld2.double().exp()
    ulp = torch.finfo(dtype).eps * BOUND
    err = (y2 - y).abs().double()
    assert (err <= 4 * ulp * (1 + slope)).all(), f"worst residual {err.max().item():.3g}"


def test_bound_exactly_and_beyond_in_float32():
    """x = +-bound are inside (the last / first bin, identity at the ends); the next float out is outside."""
    bins = 8
    _, p = make((4,), bins, dtype=torch.float32, scale=3.0)
    b = torch.tensor(BOUND)
    for inverse in (False, True):
        for v in (b, -b):
            x = v.expand(4).clone()
            out, ld = rq_spline(x, p, bins=bins, bound=BOUND, inverse=inverse)
            assert torch.equal(out, x) and (ld.abs() < 1e-6).all()
            x = torch.nextafter(v, 2 * v).expand(4).clone()
            out, ld = rq_spline(x, p, bins=bins, bound=BOUND, inverse=inverse)
            assert torch.equal(out, x) and torch.equal(ld, torch.zeros(4))


# ---------------------------------------------------------------- float32 accuracy


def float32_round_trip(impl, x, p, bins):
    y, _ = impl(x, p, bins)
    x2, _ = impl(y, p, bins, inverse=True)
    return (x2.double() - x.double()).abs()


def ours(x, p, bins, inverse=False):
    return rq_spline(x, p, bins=bins, bound=BOUND, inverse=inverse)


def slopes(x, p, bins):
    """dy/dx in float64 at float32 inputs (1-D x: the log-det is per element)."""
    return rq_spline(x.double(), p.double(), bins=bins, bound=BOUND)[1].exp()


def test_float32_round_trip_inside_bound():
    """inverse(forward(x)) in float32 on 3,200 points of [-bound, bound], randn params.

    Where the spline is flat, many x share one float32 y: at slope s the round trip cannot do
    better than ulp(y) / (2 s), ~1e-4 for the slopes of 2e-4 that randn params produce. So the
    max abs error is required (<= 1e-5) where the slope is >= 0.1, and everywhere the error in
    y, |x' - x| * min(slope, 1), stays within a few float32 ulps of the bound.
    """
    bins = 8
    x, p = make((3200,), bins, dtype=torch.float32, spread=1.0, seed=0)
    # Elementwise: ulp(y) (and the knots' rounding) times the inverse's slope 1 / s, 64 ulps of
    # both (tolerances.spline_roundtrip_bound), instead of the hand-set 1e-5 where s >= 0.1,
    # 1.5e-6 in y and 1e-3 everywhere; the log-dets cancel within their sums' rounding plus the
    # log-slope's move |d log s / dx| |x' - x| (was atol 5e-3).
    check_op_roundtrip("rq_spline", dict(x=x, params=p), dict(bins=bins, bound=BOUND, inverse=False),
                       backend=flowkern.get_backend(), device="cpu")
    y, ld = ours(x, p, bins)
    assert ld.dtype == torch.float32


def test_float32_round_trip_no_worse_than_nflows():
    """Same inputs through nflows' own float32 forward and inverse. The forwards are the same
    arithmetic, so the worst elements (at the float32 limit above) tie up to rounding: ours may
    not be more than 10% worse there; on average, and in y, ours must be no worse."""
    bins = 8
    x, p = make((3200,), bins, dtype=torch.float32, spread=1.0, seed=0)

    def theirs(v, q, bins, inverse=False):
        return nflows_spline(v, q, bins, inverse)

    err_ours = float32_round_trip(ours, x, p, bins)
    err_nf = float32_round_trip(theirs, x, p, bins)
    slope = slopes(x, p, bins).clamp(max=1)
    assert err_ours.max() <= 1.1 * err_nf.max(), (err_ours.max().item(), err_nf.max().item())
    assert err_ours.mean() <= err_nf.mean(), (err_ours.mean().item(), err_nf.mean().item())
    assert (err_ours * slope).max() <= (err_nf * slope).max()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_compute_in_float32(dtype):
    bins = 4
    x, p = make((3, 7), bins, dtype=dtype)
    y, ld = rq_spline(x, p, bins=bins, bound=BOUND)
    assert y.dtype == dtype and ld.dtype == torch.float32
    y32, ld32 = rq_spline(x.float(), p.float(), bins=bins, bound=BOUND)
    torch.testing.assert_close(y, y32.to(dtype), rtol=0, atol=0)
    torch.testing.assert_close(ld, ld32)


# ---------------------------------------------------------------- the op's contract


def test_running_logdet_and_dtypes():
    bins = 3
    for dtype in (torch.float32, torch.float64):
        x, p = make((4, 6), bins, dtype=dtype)
        l0 = torch.randn(4, dtype=dtype)
        for inverse in (False, True):
            y, ld = rq_spline(x, p, bins=bins, inverse=inverse)
            y2, ld2 = rq_spline(x, p, bins=bins, inverse=inverse, logdet=l0)
            assert ld.dtype == dtype and torch.equal(y, y2)
            torch.testing.assert_close(ld2, ld + l0)


def test_default_bins_and_bound():
    x, p = make((2, 5), 8)
    torch.testing.assert_close(rq_spline(x, p), rq_spline_ref(x, p, bins=8, bound=3.0))


def test_non_contiguous_inputs():
    bins = 4
    x, p = make((5, 8), bins)
    xs, ps = x[:, ::2], p.transpose(0, 1).contiguous().transpose(0, 1)[:, ::2]
    assert not xs.is_contiguous() and not ps.is_contiguous()
    got = rq_spline(xs, ps, bins=bins)
    torch.testing.assert_close(got, rq_spline(xs.contiguous(), ps.contiguous(), bins=bins), rtol=0, atol=0)


@pytest.mark.parametrize("batch", [0, 1])
@pytest.mark.parametrize("inverse", [False, True], ids=["fwd", "inv"])
def test_batch_zero_and_one(batch, inverse):
    bins = 4
    x, p = make((batch, 3), bins, dtype=torch.float32)
    x, p = x.requires_grad_(), p.requires_grad_()
    y, ld = rq_spline(x, p, bins=bins, inverse=inverse)
    assert y.shape == (batch, 3) and ld.shape == (batch,) and ld.dtype == torch.float32
    (y.sum() + ld.sum()).backward()
    assert x.grad.shape == x.shape and p.grad.shape == p.shape


def test_one_dimensional_x_is_a_batch_of_scalars():
    bins = 4
    x, p = make((6,), bins)
    y, ld = rq_spline(x, p, bins=bins)
    y2, ld2 = rq_spline(x[:, None], p[:, None], bins=bins)
    torch.testing.assert_close(y, y2[:, 0], rtol=0, atol=0)
    torch.testing.assert_close(ld, ld2, rtol=0, atol=0)


X = torch.zeros(2, 3)
P = torch.zeros(2, 3, 23)


@pytest.mark.parametrize("args,kwargs,error,match", [
    ((X.numpy(), P), {}, TypeError, "x must be a torch.Tensor"),
    ((torch.zeros(2, 3, dtype=torch.long), P), {}, TypeError, "x must be a floating-point"),
    ((torch.tensor(1.0), P), {}, ValueError, "x must have a batch dimension"),
    ((X, None), {}, TypeError, "params must be a torch.Tensor"),
    ((X, P.long()), {}, TypeError, "params must be a floating-point"),
    ((X, P.double()), {}, TypeError, "params must have the dtype of x"),
    ((X, torch.zeros(2, 3, 22)), {}, ValueError, r"params must have shape .*\(2, 3, 23\)"),
    ((X, torch.zeros(2, 3, 23)), {"bins": 4}, ValueError, r"params must have shape .*\(2, 3, 11\) for bins=4"),
    ((X, torch.zeros(3, 23)), {}, ValueError, "params must have shape"),
    ((X, P.to("meta")), {}, ValueError, "params is on meta"),
    ((X, P), {"bins": 0}, ValueError, "bins must be between 1 and 1000"),
    ((X, P), {"bins": 1001}, ValueError, "bins must be between"),
    ((X, P), {"bins": 8.0}, TypeError, "bins must be an int"),
    ((X, P), {"bins": True}, TypeError, "bins must be an int"),
    ((X, P), {"bound": 0.0}, ValueError, "bound must be a positive finite number"),
    ((X, P), {"bound": -1.0}, ValueError, "bound must be a positive"),
    ((X, P), {"bound": float("inf")}, ValueError, "bound must be a positive finite"),
    ((X, P), {"bound": float("nan")}, ValueError, "bound must be a positive"),
    ((X, P), {"bound": "3"}, TypeError, "bound must be a number"),
    ((X, P), {"bound": 1e31}, ValueError, "bound must be between"),
    ((X, P), {"logdet": torch.zeros(3)}, ValueError, r"logdet must have shape \(batch,\) = \(2,\)"),
    ((X, P), {"logdet": torch.zeros(2, dtype=torch.long)}, TypeError, "logdet must be a floating-point"),
    ((X, P), {"logdet": [0.0, 0.0]}, TypeError, "logdet must be a torch.Tensor"),
])
def test_bad_input(args, kwargs, error, match):
    with pytest.raises(error, match=match):
        rq_spline(*args, **kwargs)


def test_reference_rejects_too_many_bins():
    x, p = make((2,), 1001)
    with pytest.raises(ValueError, match="bins"):
        rq_spline_ref(x, p, bins=1001)


# ---------------------------------------------------------------- SplineCoupling


@pytest.mark.parametrize("bins", [1, 2, 8])
@pytest.mark.parametrize("context", [0, 3])
def test_new_spline_coupling_is_identity(bins, context):
    layer = SplineCoupling(10, hidden=16, bins=bins, context=context)
    x = torch.randn(6, 10) * 2  # some features beyond the bound
    ctx = torch.randn(6, context) if context else None
    # The identity up to the knots' rounding: equal widths and heights 2 bound / bins whose
    # cumulative sums round at eps bound, slopes 1 within a few eps: y within 16 eps (|x| +
    # bound) inside, exactly x outside; each log-slope is log(1 + a few eps), the row's sum
    # within 16 eps (n + 1) over its n elements inside (was atol 1e-6 / 1e-5).
    eps, inside = EPS[torch.float32], x.abs() <= layer.bound
    for direction in (layer, layer.inverse):
        y, ld = direction(x, ctx)
        assert torch.equal(y[~inside], x[~inside])
        assert ((y - x).abs() <= 16 * eps * (x.abs() + layer.bound)).all()
        assert (ld.abs() <= 16 * eps * (inside.sum(1) + 1)).all()
    bias = layer.conditioner[-1].bias.view(-1, 3 * bins - 1)  # (transformed, P)
    assert (bias[:, :2 * bins] == 0).all() and torch.allclose(bias[:, 2 * bins:], torch.tensor(identity_derivative_raw()))


def test_spline_coupling_params_layout():
    """The conditioner's (B, T * P) output is read as (B, T, P), as nflows reads it: parameter p of
    transformed feature t is output t * P + p."""
    layer = perturb_(SplineCoupling(5, hidden=8, bins=3, mask="half")).double()
    x = torch.randn(4, 5, dtype=torch.float64) * 2
    kept, moved = x[:, :2], x[:, 2:]
    params = layer.conditioner(kept).view(4, 3, 8)
    y_moved, ld = rq_spline_ref(moved, params, bins=3, bound=3.0)
    y, ld_layer = layer(x)
    # float64 to rounding: the layer's op may run a fused kernel rather than the reference
    torch.testing.assert_close(y, torch.cat([kept, y_moved], 1), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ld_layer, ld, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("mask", ["alternate", "half", "tensor"])
@pytest.mark.parametrize("flip", [False, True])
@pytest.mark.parametrize("context", [0, 2])
def test_spline_coupling_round_trip_and_mask(mask, flip, context):
    features = 7
    m = torch.tensor([True, False, False, True, True, False, True]) if mask == "tensor" else mask
    layer = perturb_(SplineCoupling(features, hidden=16, bins=6, bound=2.5, mask=m, context=context, flip=flip))
    x = torch.randn(8, features) * 1.5
    ctx = torch.randn(8, context) if context else None
    kept = ~coupling_mask(features, m, flip)
    y, ld = layer(x, ctx)
    assert torch.equal(y[:, kept], x[:, kept]) and not torch.allclose(y[:, ~kept], x[:, ~kept])
    check_round_trip(layer.double(), x.double(), None if ctx is None else ctx.double())
    check_running_logdet(layer.float(), x, ctx)
    if context:
        assert not torch.allclose(layer(x, ctx)[0], layer(x, torch.randn(8, context))[0])


def test_spline_coupling_float32_round_trip():
    layer = perturb_(SplineCoupling(6, hidden=16, bins=8, context=2), scale=0.2)
    x, ctx = torch.randn(64, 6), torch.randn(64, 2)
    check_round_trip(layer, x, ctx)  # within the intermediates' rounding pulled back (was atol 1e-4)


def test_spline_coupling_logdet_jacobian_and_gradients():
    layer = perturb_(SplineCoupling(6, hidden=8, bins=4, bound=2.0, context=2)).double()
    x, ctx = torch.randn(3, 6, dtype=torch.float64) * 1.5, torch.randn(3, 2, dtype=torch.float64)
    check_logdet_jacobian(layer, x, ctx)
    check_batch_sizes(layer.float(), (6,), context_features=2)
    layer = layer.double()
    xg = x.clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda v: layer(v, ctx), (xg,))
    y, ld = layer(x, ctx)
    grads = torch.autograd.grad((y * torch.randn_like(y)).sum() + ld.sum(), list(layer.parameters()))
    assert all(torch.isfinite(g).all() for g in grads) and grads[-1].abs().sum() > 0


@pytest.mark.parametrize("make_layer,error,match", [
    (lambda: SplineCoupling(1), ValueError, "features must be an int >= 2"),
    (lambda: SplineCoupling(4, bins=0), ValueError, "bins must be between"),
    (lambda: SplineCoupling(4, bins=2.5), TypeError, "bins must be an int"),
    (lambda: SplineCoupling(4, bound=0.0), ValueError, "bound must be a positive"),
    (lambda: SplineCoupling(4, mask="checkerboard"), ValueError, "mask must be"),
    (lambda: SplineCoupling(4, context=-1), ValueError, "context must be"),
])
def test_spline_coupling_bad_construction(make_layer, error, match):
    with pytest.raises(error, match=match):
        make_layer()


def test_spline_coupling_bad_input():
    layer = SplineCoupling(4, hidden=8, context=2)
    with pytest.raises(ValueError, match=r"shape \(batch, 4\)"):
        layer(torch.randn(3, 5), torch.randn(3, 2))
    with pytest.raises(ValueError, match="pass context"):
        layer(torch.randn(3, 4))
    assert "bins=8, bound=3.0" in repr(layer)
