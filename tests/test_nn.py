"""Layers, Flow and RealNVP: exact inverses, log-dets, errors, backends, torch.compile."""
from __future__ import annotations

import copy
import math

import pytest
import torch

import flowkern
from flowkern.models import RealNVP
from flowkern.nn import AffineCoupling, Flow, StandardNormal, coupling_mask
from flowkern.nn.coupling import AdditiveCoupling, ConvAffineCoupling

from conftest import kernel_backends
from tolerances import EPS, check_against, flow_logprob_rounding, layer_fn
from layer_checks import check_batch_sizes, check_logdet_jacobian, check_round_trip, check_running_logdet, perturb_


@pytest.mark.parametrize("scale", ["sigmoid", "exp", "tanh"])
def test_new_coupling_is_identity(scale):
    layer = AffineCoupling(10, hidden=16, scale=scale)
    x = torch.randn(4, 10)
    y, ld = layer(x)
    # A fresh coupling's conditioner outputs 0: m = 1 up to the few roundings of its scale
    # function (4 ulps), so y = x m within 4 eps |x| and the log-det, a sum of 10 log m's of at
    # most 4 eps each, within 40 eps (was atol 1e-6 / 1e-5).
    eps = EPS[torch.float32]
    assert ((y - x).abs() <= 4 * eps * x.abs()).all()
    assert (ld.abs() <= 4 * eps * x.shape[1]).all()


@pytest.mark.parametrize("mask", ["alternate", "half", "tensor"])
@pytest.mark.parametrize("flip", [False, True])
@pytest.mark.parametrize("context", [0, 3])
def test_coupling_round_trip_and_mask(mask, flip, context):
    features = 7
    m = torch.tensor([True, False, False, True, True, False, True]) if mask == "tensor" else mask
    layer = perturb_(AffineCoupling(features, hidden=16, mask=m, context=context, flip=flip))
    x = torch.randn(5, features)
    ctx = torch.randn(5, context) if context else None
    y, ld = layer(x, ctx)
    kept = ~coupling_mask(features, m, flip)
    assert torch.equal(y[:, kept], x[:, kept])  # the kept features pass through untouched
    assert not torch.allclose(y[:, ~kept], x[:, ~kept])
    check_round_trip(layer, x, ctx)  # the intermediate's rounding pulled back (was rtol / atol 1e-5)


@pytest.mark.parametrize("scale", ["sigmoid", "exp", "tanh"])
def test_coupling_logdet_equals_jacobian(scale):
    layer = perturb_(AffineCoupling(6, hidden=8, scale=scale, context=2)).double()
    x, ctx = torch.randn(3, 6, dtype=torch.float64), torch.randn(3, 2, dtype=torch.float64)
    check_logdet_jacobian(layer, x, ctx)
    check_running_logdet(layer, x, ctx)
    check_batch_sizes(layer.float(), (6,), context_features=2)


@pytest.mark.parametrize("context", [0, 2])
def test_conv_coupling(context):
    layer = ConvAffineCoupling(4, hidden=6, context=context)
    x = torch.randn(3, 4, 5, 6)
    ctx = torch.randn(3, context) if context else None
    y, ld = layer(x, ctx)
    assert ((y - x).abs() <= 4 * EPS[torch.float32] * x.abs()).all()  # identity at initialisation: m = 1 to 4 ulps
    perturb_(layer, scale=0.2)
    y, ld = check_round_trip(layer, x, ctx)
    assert torch.equal(y[:, :2], x[:, :2]) and not torch.allclose(y[:, 2:], x[:, 2:])
    check_logdet_jacobian(layer, torch.randn(2, 4, 2, 3, dtype=torch.float64),
                          None if ctx is None else torch.randn(2, context, dtype=torch.float64))
    check_batch_sizes(layer.float(), (4, 3, 3), context_features=context)
    with pytest.raises(ValueError, match=r"shape \(batch, 4, height, width\)"):
        layer(torch.randn(3, 4, 5), ctx)


def test_additive_coupling_preserves_volume():
    layer = perturb_(AdditiveCoupling(5, hidden=8, context=1))
    x, ctx = torch.randn(4, 5), torch.randn(4, 1)
    y, ld = check_round_trip(layer, x, ctx)
    assert torch.equal(ld, torch.zeros(4)) and not torch.allclose(y, x)
    check_logdet_jacobian(layer, torch.randn(2, 5, dtype=torch.float64), torch.randn(2, 1, dtype=torch.float64))
    check_running_logdet(layer.float(), x, ctx)


def test_coupling_gradcheck_float64():
    layer = perturb_(AffineCoupling(5, hidden=4, scale="sigmoid")).double()
    x = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda v: layer(v), (x,))


@pytest.mark.parametrize("make,error,match", [
    (lambda: AffineCoupling(1), ValueError, "features must be an int >= 2"),
    (lambda: AffineCoupling(4, mask="checkerboard"), ValueError, "mask must be"),
    (lambda: AffineCoupling(4, mask=torch.ones(4, dtype=torch.bool)), ValueError, "at least one"),
    (lambda: AffineCoupling(4, mask=torch.ones(3, dtype=torch.bool)), ValueError, "bool of shape"),
    (lambda: AffineCoupling(4, scale="relu"), ValueError, "scale must be one of"),
    (lambda: AffineCoupling(4, context=-1), ValueError, "context must be"),
    (lambda: RealNVP(8, layers=0), ValueError, "layers must be"),
    (lambda: RealNVP(8, coupling="glow"), ValueError, "coupling must be one of"),
    (lambda: StandardNormal(0), ValueError, "positive"),
])
def test_bad_construction(make, error, match):
    with pytest.raises(error, match=match):
        make()


@pytest.mark.parametrize("call,error,match", [
    (lambda l: l(torch.randn(3, 5)), ValueError, r"shape \(batch, 4\)"),
    (lambda l: l(torch.randn(4)), ValueError, "batch dimension"),
    (lambda l: l(torch.zeros(3, 4, dtype=torch.long)), TypeError, "floating-point"),
    (lambda l: l(torch.randn(3, 4)), ValueError, "pass context"),
    (lambda l: l(torch.randn(3, 4), torch.randn(3, 1)), ValueError, r"context must have shape \(3, 2\)"),
    (lambda l: l.inverse(torch.randn(3, 4), torch.randn(2, 2)), ValueError, "context must have shape"),
])
def test_bad_input(call, error, match):
    layer = AffineCoupling(4, hidden=8, context=2)
    with pytest.raises(error, match=match):
        call(layer)


def small_flow(**kw):
    torch.manual_seed(0)
    return perturb_(RealNVP(features=6, layers=4, hidden=16, **kw), scale=0.2)


def test_flow_round_trip_and_log_prob():
    flow = small_flow()
    x = torch.randn(8, 6)
    z, ld = check_round_trip(flow, x)  # every layer's rounding pulled back (was rtol 1e-4 / atol 1e-5)
    expected = -0.5 * (z ** 2).sum(1) - 3 * math.log(2 * math.pi) + ld
    torch.testing.assert_close(flow.log_prob(x), expected)


def test_flow_log_prob_is_a_density_in_1d_pairs():
    """exp(log p) integrates to 1: a 2-feature flow on a grid (the change of variables is right)."""
    torch.manual_seed(1)
    flow = perturb_(RealNVP(features=2, layers=4, hidden=8, scale="tanh"), scale=0.5).double()
    g = torch.linspace(-24, 24, 1201, dtype=torch.float64)  # wide: scales up to e^2 spread the tails
    xx, yy = torch.meshgrid(g, g, indexing="ij")
    pts = torch.stack([xx.flatten(), yy.flatten()], 1)
    with torch.no_grad():
        mass = flow.log_prob(pts).exp().sum() * (g[1] - g[0]) ** 2
    assert abs(mass.item() - 1) < 1e-3


def test_sample_shape_dtype_and_temperature_zero_is_the_mode():
    flow = small_flow()
    s = flow.sample(5)
    assert s.shape == (5, 6) and s.dtype == torch.float32 and torch.isfinite(s).all()
    mode = flow.sample(3, temperature=0.0)
    expected, _ = flow.inverse(torch.zeros(1, 6))
    torch.testing.assert_close(mode, expected.expand(3, 6))
    assert flow.sample(0).shape == (0, 6)


def test_conditional_flow_passes_context():
    flow = small_flow(context=3)
    x, ctx = torch.randn(4, 6), torch.randn(4, 3)
    lp = flow.log_prob(x, ctx)
    assert lp.shape == (4,) and not torch.allclose(lp, flow.log_prob(x, torch.randn(4, 3)))
    check_round_trip(flow, x, ctx)  # was rtol 1e-4 / atol 1e-5
    assert flow.sample(3, context=ctx).shape == (3, 4, 6)  # n per context row: (n, M, D)
    assert flow.sample(2, context=ctx[0]).shape == (2, 6)
    with pytest.raises(ValueError, match="pass context"):
        flow.log_prob(x)


@pytest.mark.parametrize("batch", [0, 1])
def test_flow_batch_zero_and_one(batch):
    flow = small_flow()
    x = torch.randn(batch, 6, requires_grad=True)
    lp = flow.log_prob(x)
    lp.sum().backward()
    assert lp.shape == (batch,) and x.grad.shape == (batch, 6)


def log_prob_and_grads(m, x):
    """Each row's log_prob and the parameters' gradients of -mean log_prob."""
    with torch.enable_grad():
        lp = m.log_prob(x.detach())
        grads = torch.autograd.grad(-lp.mean(), list(m.parameters()))
    return (lp.detach(), *grads)


def check_flow_against_float64(name, flow, x, got, backend="reference"):
    """got = log_prob_and_grads of the float32 flow within the conditioned bound of the float64
    flow (tolerances.check_against: x and every weight perturbed by 8 ulps, 2x the float32
    reference's own error), the log-probs plus their sums' rounding
    (tolerances.flow_logprob_rounding), the gradients normwise (sums over the batch)."""
    fn, params = layer_fn(copy.deepcopy(flow).cpu(), log_prob_and_grads, backend)
    extra = (flow_logprob_rounding(flow, x, EPS[torch.float32]),)
    check_against(name, fn, (x.cpu(), *params), got, torch.float32, extra=extra, normwise=True)


@pytest.mark.parametrize("backend,device", kernel_backends())
def test_realnvp_backend_matches_reference(backend, device):
    flow = small_flow().to(device)
    x = torch.randn(16, 6, device=device)
    with flowkern.backend(backend):
        got = log_prob_and_grads(flow, x)
    # vs the float64 flow, conditioned (was the float32 reference within rtol 1e-5 / 1e-4, atol 1e-5)
    check_flow_against_float64(backend, flow, x, got)


@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("coupling", ["affine", "spline"])
def test_compile_fullgraph_matches_eager(backend, coupling):
    if backend not in flowkern.available_backends():
        pytest.skip(f"{backend} backend not available")
    flow = small_flow(coupling=coupling)
    x = torch.randn(8, 6)
    with flowkern.backend(backend):
        compiled = torch.compile(flow.log_prob, fullgraph=True, dynamic=False)
        got = compiled(x)
        # and the backward through the compiled graph
        flow.zero_grad()
        (-compiled(x).mean()).backward()
        g_compiled = [p.grad.clone() for p in flow.parameters()]
    # Inductor reorders and fuses float32 sums: the compiled log-probs and gradients are held to
    # the float64 flow's conditioned bound as eager's are (was eager float32 within rtol 1e-5 /
    # 1e-4, atol 1e-5).
    check_flow_against_float64(f"compiled {backend}", flow, x, (got.detach(), *g_compiled))


def test_realnvp_default_is_the_mnist_model():
    flow = RealNVP()
    couplings = flow.couplings
    assert flow.features == 784 and len(couplings) == 8 and len(flow.layers) == 10  # + 2 permutations
    assert all(isinstance(l, AffineCoupling) and l.scale == "tanh" for l in couplings)
    hidden = couplings[0].conditioner[0]
    assert hidden.in_features == 392 and hidden.out_features == 512
    # alternating masks: every feature is transformed by some layer; laid out as halves
    assert (couplings[0].mask ^ couplings[1].mask).all()
    assert all(c._layout[0] == "blocks" for c in couplings)


@pytest.mark.parametrize("features", [6, 7])
@pytest.mark.parametrize("coupling", ["affine", "spline"])
def test_realnvp_halves_layout_is_the_interleaved_model(features, coupling):
    # RealNVP permutes evens-first once and splits halves; the same couplings with interleaved
    # masks on the unpermuted data must compute exactly the same function.
    torch.manual_seed(0)
    flow = perturb_(RealNVP(features, layers=3, hidden=8, coupling=coupling), scale=0.3)
    x = torch.randn(5, features)
    refs = []
    for i, layer in enumerate(flow.couplings):
        moved = coupling_mask(features, "alternate", flip=i % 2 == 1)
        ref = (AffineCoupling(features, 8, mask=moved) if coupling == "affine"
               else flowkern.nn.SplineCoupling(features, 8, mask=moved))
        ref.load_state_dict(layer.state_dict())
        refs.append(ref)
    z, logdet = flow(x)
    # The float32 halves model within the conditioned bound of the float64 interleaved chain
    # (its matmuls sum the permuted features in another order; was rtol / atol 1e-6 against the
    # float32 chain), the log-det plus its sums' rounding, 16 eps (n + |ld|) per layer.
    refs = torch.nn.ModuleList(refs)

    def chain(m, v):
        h, ld = v, torch.zeros(v.shape[0], dtype=v.dtype)
        for r in m:
            h, ld = r(h, None, ld)
        return h, ld

    fn, params = layer_fn(refs, chain)
    with torch.no_grad(), flowkern.backend("reference"):
        ld64 = chain(copy.deepcopy(refs).double(), x.double())[1]
    sums = 16 * EPS[torch.float32] * len(refs) * (features + ld64.abs())
    check_against("halves", fn, (x, *params), (z, logdet), torch.float32, extra=(0.0, sums))


@pytest.mark.parametrize("mask, layout", [("alternate", "interleaved"), ("half", "blocks"),
                                          (torch.tensor([True, False, False, True, True, False]), "general")])
@pytest.mark.parametrize("flip", [False, True])
@pytest.mark.parametrize("images", [False, True])
def test_coupling_split_and_merge_follow_the_mask(mask, layout, flip, images):
    # The view-based split/merge must pick exactly the features index_select would, in order,
    # and route gradients the same way.
    layer = (ConvAffineCoupling(6, 4, mask=mask, flip=flip) if images else AffineCoupling(6, 4, mask=mask, flip=flip))
    assert layer._layout[0] == layout
    x = torch.randn(3, 6, 2, 2) if images else torch.randn(3, 6)
    x.requires_grad_(True)
    kept, moved = layer._take(x)
    torch.testing.assert_close(kept, x.index_select(1, layer.kept_idx), rtol=0, atol=0)
    torch.testing.assert_close(moved, x.index_select(1, layer.moved_idx), rtol=0, atol=0)
    merged = layer._merge(kept * 2, moved * 3)
    expect = torch.where(layer.mask.view(1, 6, *([1] * (x.dim() - 2))), x * 3, x * 2)
    torch.testing.assert_close(merged, expect, rtol=0, atol=0)
    (g,) = torch.autograd.grad(merged.sum(), x)
    torch.testing.assert_close(g, torch.where(layer.mask.view(1, 6, *([1] * (x.dim() - 2))), 3.0, 2.0).expand_as(x))
