"""Ready-made models: RealNVP variants, Glow, and bits/dim on 8-bit data."""
from __future__ import annotations

import copy
import math

import pytest
import torch

import flowkern
from flowkern.models import Glow, RealNVP
from flowkern.nn import AdditiveCoupling, Dequantize, Flow, Logit, StandardNormal

from tolerances import EPS, check_against, check_flow_roundtrip, layer_fn, sum_rounding
from layer_checks import check_logdet_jacobian, perturb_, standard_normal_logpdf


def warm_up(flow, x):
    """One training-mode pass, so data-dependent initialisation (ActNorm) has happened."""
    flow.train()
    with torch.no_grad():
        flow(x)
    return flow


@pytest.mark.parametrize("coupling", ["affine", "additive", "spline"])
@pytest.mark.parametrize("norm", [None, "actnorm", "batchnorm"])
def test_realnvp_variants_round_trip(coupling, norm):
    torch.manual_seed(0)
    flow = perturb_(RealNVP(features=6, layers=4, hidden=8, coupling=coupling, norm=norm), scale=0.2)
    x = torch.randn(16, 6)
    warm_up(flow, x)
    for _ in range(3):  # give BatchNormFlow running statistics that are not the initial ones
        flow(torch.randn(16, 6) * 2 + 1)
    flow.eval()  # BatchNormFlow is exactly invertible with its running statistics
    # Within every layer's intermediate rounding pulled back through the layers before it
    # (tolerances.check_flow_roundtrip), not a hand-set 1e-4.
    z, ld = check_flow_roundtrip(flow, x)
    torch.testing.assert_close(flow.log_prob(x), standard_normal_logpdf(z).float() + ld)
    if coupling == "additive" and norm is None:
        assert torch.equal(ld, torch.zeros(16))
    check_logdet_jacobian(flow, x[:2].double())


def small_glow(**kw):
    torch.manual_seed(0)
    glow = Glow((1, 4, 4), levels=2, steps=2, hidden=8, **kw)
    return perturb_(glow, scale=0.05)


def test_glow_structure_round_trip_and_logdet():
    glow = small_glow()
    x = torch.randn(8, 1, 4, 4)
    warm_up(glow, x)
    glow.eval()
    z, ld = glow(x)
    assert z.shape == x.shape and ld.shape == (8,)
    check_flow_roundtrip(glow, x)  # was rtol / atol 1e-4
    torch.testing.assert_close(glow.log_prob(x), standard_normal_logpdf(z).float() + ld)
    check_logdet_jacobian(glow, x[:2].double())
    s = glow.sample(3, temperature=0.5)
    assert s.shape == (3, 1, 4, 4) and torch.isfinite(s).all()


def test_glow_on_mnist_shape_and_its_limits():
    glow = Glow((1, 28, 28), levels=2, steps=1, hidden=8)
    x = torch.randn(2, 1, 28, 28)
    warm_up(glow, x)
    assert glow.log_prob(x).shape == (2,)
    with pytest.raises(ValueError, match="divisible by 2\\*\\*levels = 8"):
        Glow((1, 28, 28), levels=3)
    with pytest.raises(ValueError, match="image_shape"):
        Glow((28, 28))


def test_glow_conditional():
    glow = small_glow(context=3)
    x, ctx = torch.randn(4, 1, 4, 4), torch.randn(4, 3)
    warm_up_ctx = glow.train()
    with torch.no_grad():
        glow(x, ctx)
    glow.eval()
    check_flow_roundtrip(glow, x, ctx)  # was rtol / atol 1e-4
    assert glow.sample(2, context=ctx).shape == (2, 4, 1, 4, 4)
    assert glow.sample(3, context=ctx[0]).shape == (3, 1, 4, 4)


def test_bits_per_dim_matches_a_hand_computation():
    """A tiny flow on 8-bit data: Dequantize, Logit, one additive coupling, N(0, I)."""
    torch.manual_seed(0)
    alpha = 0.05
    coupling = perturb_(AdditiveCoupling(4, hidden=4))
    flow = Flow([Dequantize(), Logit(alpha), coupling], base=StandardNormal(4))
    x = torch.tensor([[0, 17, 128, 255], [3, 3, 250, 9]], dtype=torch.uint8)
    torch.manual_seed(123)
    bpd = flow.bits_per_dim(x)
    torch.manual_seed(123)  # the same noise, by hand
    u = torch.rand(2, 4)

    def by_hand(c, u):  # in u's dtype: float32, the reference's own error, and float64, the exact value
        v = (x.to(u.dtype) + u) / 256
        vv = alpha + (1 - 2 * alpha) * v
        y = torch.log(vv) - torch.log1p(-vv)
        z, _ = c(y)  # volume preserving: log-det 0
        log_det = (-math.log(256) + math.log(1 - 2 * alpha) - torch.log(vv) - torch.log1p(-vv)).sum(1)
        log_p = -0.5 * (z ** 2).sum(1) - 2 * math.log(2 * math.pi) + log_det
        return (-log_p / (4 * math.log(2)),)

    # vs the float64 hand computation on the same noise, conditioned (tolerances.check_against:
    # u and the coupling's weights perturbed by 8 ulps), plus the float32 sums' rounding of
    # their terms z^2 / 2, the constants and the logit's log terms (was rtol / atol 1e-5)
    fn, params = layer_fn(coupling, by_hand)
    with torch.no_grad():
        v = (x.double() + u.double()) / 256
        vv = alpha + (1 - 2 * alpha) * v
        z, _ = copy.deepcopy(coupling).double()(torch.log(vv) - torch.log1p(-vv))
        logs = torch.log(vv).abs() + torch.log1p(-vv).abs() + math.log(256) + 1
        terms = torch.cat([z ** 2 / 2, logs, torch.full((2, 1), 2 * math.log(2 * math.pi))], 1)
    check_against("bits per dim", fn, (u, *params), (bpd,), torch.float32,
                  extra=(sum_rounding(terms, EPS[torch.float32]) / (4 * math.log(2)),))


def test_bits_per_dim_errors_and_model_option():
    flow = RealNVP(features=4, layers=2, hidden=4, dequantize=True)
    x = torch.randint(0, 256, (3, 4), dtype=torch.uint8)
    bpd = flow.bits_per_dim(x)
    assert bpd.shape == (3,) and torch.isfinite(bpd).all()
    with pytest.raises(TypeError, match="integer tensor"):
        flow.bits_per_dim(x.float())
    with pytest.raises(ValueError, match="first layer is flowkern.nn.Dequantize"):
        RealNVP(features=4, layers=2, hidden=4).bits_per_dim(x)
    samples = flow.sample(5)
    assert samples.shape == (5, 4)
    assert torch.equal(samples, samples.round()) and samples.min() >= 0 and samples.max() <= 255
