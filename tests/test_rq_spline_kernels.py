"""The fused spline kernels (compiled CPU/CUDA, Triton) against the float64 reference."""
from __future__ import annotations

import math

import pytest
import torch

import flowkern
from flowkern.ops import rq_spline
from flowkern.reference.rq_spline import params_per_element, spline_knots

from conftest import kernel_backends
from tolerances import check_agree, check_op_roundtrip


def make(shape, bins, device, p_scale=1.0, x_scale=2.0, seed=0, tails="linear"):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g, dtype=torch.float64) * x_scale).to(device)
    params = (torch.randn(*shape, params_per_element(bins, tails), generator=g, dtype=torch.float64) * p_scale)
    return x, params.to(device)


def compare(backend, device, x, params, bins, inverse, bound=3.0, seed=0):
    """Outputs and the gradients of every input (x, params, the running log-det) against the
    float64 reference, within the problem's conditioned bound (tolerances.check_agree: 2x the
    float32 reference's own error, plus what 8-ulp input perturbations move the float64 answer,
    plus the knots' rounding at the bound's scale): no hand-set atol."""
    ld_in = torch.randn(x.shape[0], generator=torch.Generator().manual_seed(seed + 5), dtype=torch.float64)
    check_agree("rq_spline", dict(x=x, params=params, logdet=ld_in), dict(bins=bins, bound=bound, inverse=inverse),
                backend=backend, device=device, seed=seed)


@pytest.mark.parametrize("backend,device", kernel_backends())
@pytest.mark.parametrize("bins", [1, 2, 8, 16])
@pytest.mark.parametrize("inverse", [False, True], ids=["fwd", "inv"])
@pytest.mark.parametrize("shape", [(2, 7), (3, 5, 2), (1, 33)], ids=lambda s: "x".join(map(str, s)))
def test_kernels_match_reference(backend, device, bins, inverse, shape):
    x, params = make(shape, bins, device)
    compare(backend, device, x, params, bins, inverse)


@pytest.mark.parametrize("backend,device", kernel_backends())
@pytest.mark.parametrize("inverse", [False, True], ids=["fwd", "inv"])
def test_kernels_at_knots_bounds_and_outside(backend, device, inverse):
    bins, bound = 5, 3.0
    x, params = make((3, 6), bins, device)
    xk, yk, _ = spline_knots(params.double(), bins, bound)
    knots = yk if inverse else xk  # (3, 6, bins + 1)
    x = knots[..., 1].clone()      # the first interior knot of each element
    x[:, 0], x[:, 1], x[:, 2], x[:, 3] = -bound, bound, 50.0, -1e6
    x[:, 4] = (yk if inverse else xk)[:, 4, 2]
    x[:, 5] = (yk if inverse else xk)[:, 5, 3]
    # At a knot the log-slope's derivative jumps between the two bins, and which bin float32
    # rounding picks may differ between implementations: the input perturbations (x and the
    # knots moved by 8 ulps either way) cross the knot, so the bound holds the jump there; the
    # log-det's gradients are compared too.
    compare(backend, device, x, params, bins, inverse, bound=bound)


@pytest.mark.parametrize("backend,device", kernel_backends())
@pytest.mark.parametrize("inverse", [False, True], ids=["fwd", "inv"])
def test_kernels_extreme_params_stay_finite(backend, device, inverse):
    bins = 8
    x, params = make((4, 9), bins, device, p_scale=1e4, x_scale=2.0)
    x, params = x.float().requires_grad_(), params.float().requires_grad_()
    with flowkern.backend(backend):
        y, ld = rq_spline(x, params, bins=bins, inverse=inverse)
        gx, gp = torch.autograd.grad(y.sum() + ld.sum(), (x, params))
    for t in (y, ld, gx, gp):
        assert torch.isfinite(t).all()


@pytest.mark.parametrize("backend,device", kernel_backends())
def test_kernels_round_trip_and_batch_zero(backend, device):
    x, params = make((4, 50), 8, device)
    # The round trip within y's rounding pulled back by the inverse's slope (and the knots'
    # rounding), the log-dets cancelling within their sums' rounding and the log-slope's move
    # between x and where the inverse lands (tolerances.check_roundtrip), not within the float32
    # reference's own round trip, which can happen to come back exact.
    for inverse in (False, True):
        check_op_roundtrip("rq_spline", dict(x=x, params=params), dict(bins=8, bound=3.0, inverse=inverse),
                           backend=backend, device=device)
    x, params = x.float(), params.float()
    with flowkern.backend(backend):
        empty, ld0 = rq_spline(x[:0], params[:0])
    assert empty.shape == (0, 50) and ld0.shape == (0,)


@pytest.mark.parametrize("backend,device", kernel_backends())
def test_kernels_saved_tensors_are_the_inputs_only(backend, device):
    """The fused backward saves x and params, nothing of size B x D x bins beyond the input."""
    x, params = make((4, 10), 8, device)
    x, params = x.float().requires_grad_(), params.float().requires_grad_()
    sizes = []
    with flowkern.backend(backend), torch.autograd.graph.saved_tensors_hooks(
            lambda t: sizes.append(t.numel()) or t, lambda t: t):
        rq_spline(x, params)
    assert sorted(sizes) == sorted([x.numel(), params.numel()])


def test_float64_kernel_gradcheck():
    if "cpu" not in flowkern.available_backends():
        pytest.skip("compiled CPU backend not built")
    x, params = make((2, 3), 4, "cpu")
    ld = torch.randn(2, dtype=torch.float64)
    for inverse in (False, True):
        with flowkern.backend("cpu"):
            assert torch.autograd.gradcheck(
                lambda a, p, l: rq_spline(a, p, bins=4, inverse=inverse, logdet=l),
                (x.requires_grad_(), params.requires_grad_(), ld.requires_grad_()))


# Knot styles: nflows' other minimums, zuko's soft-clamped exp parameterisation, and mixtures.
STYLES = {
    "mins": dict(min_width=0.02, min_height=0.05, min_derivative=0.1),
    "zuko": dict(min_width=0.0, min_height=0.0, min_derivative=0.0, derivative="exp", slope=1e-3),
    "exp-mins": dict(min_derivative=0.01, derivative="exp"),
    "softplus-clamp": dict(slope=1e-2),
}


@pytest.mark.parametrize("backend,device", kernel_backends())
@pytest.mark.parametrize("style", list(STYLES))
@pytest.mark.parametrize("bins", [1, 3, 10])
@pytest.mark.parametrize("inverse", [False, True], ids=["fwd", "inv"])
def test_kernels_match_reference_in_every_style(backend, device, style, bins, inverse):
    x, params = make((3, 9), bins, device, p_scale=3.0, x_scale=2.5)  # large raw params: the clamp bites
    x[0, :3] = torch.tensor([-3.0, 3.0, 40.0])
    ld_in = torch.randn(3, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    check_agree("rq_spline", dict(x=x, params=params, logdet=ld_in),
                dict(bins=bins, bound=3.0, inverse=inverse, **STYLES[style]), backend=backend, device=device)
    check_op_roundtrip("rq_spline", dict(x=x, params=params), dict(bins=bins, bound=3.0, inverse=inverse,
                                                                   **STYLES[style]), backend=backend, device=device)


@pytest.mark.parametrize("backend,device", kernel_backends())
def test_zuko_style_extreme_params_stay_finite(backend, device):
    # the soft clamp bounds every raw param, so even 1e30 gives bins of at least ~slope of the rest
    x, params = make((2, 8), 6, device)
    params = params * 1e30
    with flowkern.backend(backend):
        for inverse in (False, True):
            y, ld = rq_spline(x.float(), params.float(), bins=6, inverse=inverse, **STYLES["zuko"])
            assert torch.isfinite(y).all() and torch.isfinite(ld).all()


# Intervals other than [-B, B], and learned end slopes (nflows' tails=None on [0, 1]).
INTERVALS = {
    "nflows-none": dict(bound=(0.0, 1.0), tails=None),
    "shifted-linear": dict(bound=(-1.0, 2.5)),
    "shifted-none-zuko": dict(bound=(-4.0, -0.5), tails=None, **STYLES["zuko"]),
    "none-mins": dict(bound=(0.0, 1.0), tails=None, **STYLES["mins"]),
}


def interval_inputs(kw, bins, device, seed=0):
    """x spread over the interval and beyond it, with its ends, a knot and far outside in the first row."""
    lo, hi = kw["bound"]
    x, params = make((3, 11), bins, device, p_scale=1.5, x_scale=1.0, seed=seed, tails=kw.get("tails", "linear"))
    x = lo + (hi - lo) * torch.sigmoid(1.5 * x)  # inside, most of them
    style = {k: v for k, v in kw.items() if k != "bound"}
    xk, yk, _ = spline_knots(params.double(), bins, kw["bound"], **style)
    x[0, :6] = torch.tensor([lo, hi, lo - 0.25, hi + 3.0, 1e6, float(xk[0, 5, min(1, bins)])], dtype=x.dtype)
    x[1, 0] = yk[1, 0, min(1, bins)]  # a y knot, for the inverse
    return x, params


@pytest.mark.parametrize("backend,device", kernel_backends())
@pytest.mark.parametrize("case", list(INTERVALS))
@pytest.mark.parametrize("bins", [1, 2, 8])
@pytest.mark.parametrize("inverse", [False, True], ids=["fwd", "inv"])
def test_kernels_match_reference_on_intervals_and_learned_ends(backend, device, case, bins, inverse):
    kw = INTERVALS[case]
    x, params = interval_inputs(kw, bins, device)
    ld_in = torch.randn(3, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    check_agree("rq_spline", dict(x=x, params=params, logdet=ld_in), dict(bins=bins, inverse=inverse, **kw),
                backend=backend, device=device)
    check_op_roundtrip("rq_spline", dict(x=x, params=params), dict(bins=bins, inverse=inverse, **kw),
                       backend=backend, device=device)


@pytest.mark.parametrize("backend,device", kernel_backends())
def test_learned_ends_are_the_end_slopes(backend, device):
    """With tails=None the first and last derivative params set dy/dx at lo and hi: the log-det
    there is log(d_min + softplus(u)), and the outside stays the identity (nflows raises there)."""
    bins, lo, hi = 4, 0.0, 1.0
    _, params = make((1, 4), bins, device, tails=None)
    params[..., 2 * bins] = 0.7   # d_0
    params[..., -1] = -1.3        # d_K
    x = torch.tensor([[lo, hi, -0.5, 2.0]], dtype=torch.float64, device=device)
    with flowkern.backend(backend):
        y, _ = rq_spline(x.float(), params.float(), bins=bins, bound=(lo, hi), tails=None)
        for j, u in ((0, 0.7), (1, -1.3)):
            _, ld = rq_spline(x[:, j:j + 1].float(), params[:, j:j + 1].float(), bins=bins, bound=(lo, hi),
                              tails=None)
            expected = math.log(1e-3 + math.log1p(math.exp(u)))
            assert abs(ld.item() - expected) <= 1e-5 * (1 + abs(expected))
    assert y[0, 0].item() == lo and y[0, 1].item() == hi  # the end knots map exactly
    assert y[0, 2].item() == -0.5 and y[0, 3].item() == 2.0


def test_float64_kernel_gradcheck_learned_ends():
    if "cpu" not in flowkern.available_backends():
        pytest.skip("compiled CPU backend not built")
    x, params = make((2, 3), 3, "cpu", tails=None)
    x = torch.sigmoid(x).requires_grad_()
    ld = torch.randn(2, dtype=torch.float64).requires_grad_()
    for inverse in (False, True):
        with flowkern.backend("cpu"):
            assert torch.autograd.gradcheck(
                lambda a, p, l: rq_spline(a, p, bins=3, bound=(0.0, 1.0), tails=None, inverse=inverse, logdet=l),
                (x, params.requires_grad_(), ld))
