"""The fused spline kernels (compiled CPU/CUDA, Triton) against the float64 reference."""
from __future__ import annotations

import pytest
import torch

import flowkern
from flowkern.ops import rq_spline
from flowkern.reference import rq_spline_ref
from flowkern.reference.rq_spline import spline_knots

from conftest import assert_close_2x, kernel_backends, spline_roundtrip_bound


def make(shape, bins, device, p_scale=1.0, x_scale=2.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g, dtype=torch.float64) * x_scale).to(device)
    params = (torch.randn(*shape, 3 * bins - 1, generator=g, dtype=torch.float64) * p_scale).to(device)
    return x, params


def run(fn, x, params, ld_in, w_out, w_ld, **kw):
    leaves = [a.detach().clone().requires_grad_(True) for a in (x, params, ld_in)]
    out, ld = fn(leaves[0], leaves[1], logdet=leaves[2], **kw)
    loss = (out.double() * w_out).sum() + (ld.double() * w_ld).sum()
    return (out, ld, *torch.autograd.grad(loss, leaves))


def compare(backend, x, params, bins, inverse, atol=1e-5, bound=3.0, logdet_grads=True):
    device = x.device
    ld_in = torch.randn(x.shape[0], dtype=torch.float64, device=device)
    w_out = torch.randn(x.shape, dtype=torch.float64, device=device)
    w_ld = torch.randn(x.shape[0], dtype=torch.float64, device=device) * float(logdet_grads)
    kw = dict(bins=bins, bound=bound, inverse=inverse)
    ref64 = run(rq_spline_ref, x, params, ld_in, w_out, w_ld, **kw)
    ref32 = run(rq_spline_ref, x.float(), params.float(), ld_in.float(), w_out, w_ld, **kw)
    with flowkern.backend(backend):
        got = run(rq_spline, x.float(), params.float(), ld_in.float(), w_out, w_ld, **kw)
    assert got[0].dtype == torch.float32 and got[1].dtype == torch.float32
    for name, a, b, c in zip(["out", "logdet", "grad_x", "grad_params", "grad_logdet_in"], got, ref64, ref32):
        assert_close_2x(name, a, b, c, atol=atol)


@pytest.mark.parametrize("backend,device", kernel_backends())
@pytest.mark.parametrize("bins", [1, 2, 8, 16])
@pytest.mark.parametrize("inverse", [False, True], ids=["fwd", "inv"])
@pytest.mark.parametrize("shape", [(2, 7), (3, 5, 2), (1, 33)], ids=lambda s: "x".join(map(str, s)))
def test_kernels_match_reference(backend, device, bins, inverse, shape):
    x, params = make(shape, bins, device)
    compare(backend, x, params, bins, inverse, atol=1e-4)


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
    # rounding picks differs between implementations: compare the log-det's value there, and
    # the gradients of the (C1) output only.
    compare(backend, x, params, bins, inverse, atol=1e-3, logdet_grads=False)


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
    x, params = x.float(), params.float()
    with flowkern.backend(backend):
        y, ld = rq_spline(x, params)
        x2, ld2 = rq_spline(y, params, inverse=True)
        empty, ld0 = rq_spline(x[:0], params[:0])
    # The round trip's error is bounded by the problem's conditioning (the inverse's slope at
    # y), not by the float32 reference's own round trip, which can happen to come back exact.
    y64, ld64 = rq_spline_ref(x.double(), params.double(), inverse=False)
    log_slope = rq_spline_ref(x.double().reshape(-1, 1), params.double().reshape(-1, 1, params.shape[-1]))[1]
    bound = spline_roundtrip_bound(x.double(), y64, log_slope.reshape(x.shape), 3.0, 2.0 ** -24)
    err = (x2.double() - x.double()).abs()
    assert (err <= bound).all(), f"round trip: worst err {err.max():.3g}, bound there {bound.flatten()[err.argmax()]:.3g}"
    torch.testing.assert_close(ld2, -ld, rtol=1e-4, atol=1e-4)
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
