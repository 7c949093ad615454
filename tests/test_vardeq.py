"""Variational dequantization (flowkern.nn.VariationalDequantize) and the importance-weighted
log-likelihood estimate."""
from __future__ import annotations

import math

import pytest
import torch

from flowkern.models import RealNVP
from flowkern.nn import Flow, StandardNormal, VariationalDequantize, importance_log_prob
from flowkern.ops import dequantize_logit

from tolerances import EPS, sum_rounding


def perturbed(layer: VariationalDequantize, scale: float = 0.3, seed: int = 0) -> VariationalDequantize:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return layer


def pixels(rows: int, shape=(1, 2, 2), seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (rows, *shape), generator=g, dtype=torch.uint8)


def test_log_q_matches_the_jacobian_determinant():
    """log q(u | x) = log N(e) - log|det du/de|, with the Jacobian from jacrev on a tiny image."""
    layer = perturbed(VariationalDequantize((1, 2, 2), layers=3, hidden=8)).double()
    x = pixels(3)
    eps = torch.randn(3, 4, dtype=torch.float64)
    u, log_q = layer.sample_noise(x, eps)
    assert u.shape == x.shape and log_q.shape == (3,)
    for i in range(3):
        def noise_of(e, i=i):
            return layer.sample_noise(x[i:i + 1], e[None])[0].reshape(4)
        jac = torch.func.jacrev(noise_of)(eps[i])
        log_n = -0.5 * (eps[i] ** 2).sum() - 2 * math.log(2 * math.pi)
        expected = log_n - torch.linalg.slogdet(jac).logabsdet
        # float64: slogdet of J + dJ, |dJ| <= 4 n eps |J| (LU's backward stability, jacrev's
        # rounding), moves log|det| by <= 4 n^2 eps cond(J); the log-densities' sums of O(1) terms
        # round to 64 eps (n + |value|) (was rtol / atol 1e-9)
        eps64, n = 2.0 ** -53, jac.shape[0]
        bound = 4 * n * n * eps64 * torch.linalg.cond(jac) + 64 * eps64 * (n + expected.abs() + log_n.abs())
        assert (log_q[i] - expected).abs() <= bound


def test_noise_stays_in_unit_interval_even_for_extreme_parameters():
    layer = perturbed(VariationalDequantize(16, layers=2, hidden=8), scale=30.0)
    x = torch.randint(0, 256, (64, 16), dtype=torch.uint8)
    u, log_q = layer.sample_noise(x, torch.randn(64, 16) * 10)
    assert bool((u >= 0).all()) and bool((u < 1).all())
    y, logdet = layer(x)  # dequantize_logit's own [0, 1) check passes
    assert torch.isfinite(y).all()


def test_flow_bits_per_dim_is_the_variational_bound_and_trains_q():
    torch.manual_seed(0)
    deq = VariationalDequantize((1, 2, 2), layers=2, hidden=8)
    flow = Flow([deq], base=StandardNormal((1, 2, 2)))
    x = pixels(5)
    torch.manual_seed(1)
    bpd = flow.bits_per_dim(x)
    torch.manual_seed(1)
    u, log_q = deq.sample_noise(x)  # the same noise draw
    assert bpd.shape == (5,) and torch.isfinite(bpd).all()
    # By hand: -(log N(y) + logdet of (x + u) -> y - log q(u | x)) / (D ln 2).
    y, ld = dequantize_logit(x, u, alpha=deq.alpha)
    expected = -(-0.5 * (y ** 2).sum((1, 2, 3)) - 2 * math.log(2 * math.pi) + ld - log_q) / (4 * math.log(2))
    # The flow sums the same float32 terms (y^2 / 2, the constant, the log-dets) in its own
    # order: each sum within tolerances.sum_rounding of the exact one, so within twice that of
    # each other (was rtol / atol 1e-5).
    terms = torch.cat([(y ** 2 / 2).flatten(1), ld[:, None], log_q[:, None], torch.full((5, 1), 2 * math.log(2 * math.pi))], 1)
    assert ((bpd - expected).abs() <= 2 * sum_rounding(terms, EPS[torch.float32]) / (4 * math.log(2))).all()
    bpd.mean().backward()
    grads = [p.grad for p in deq.parameters()]
    assert all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)


def test_realnvp_with_variational_dequantization_round_trips_and_samples():
    torch.manual_seed(0)
    model = RealNVP(16, layers=2, hidden=8, dequantize="variational")
    assert isinstance(model.layers[0], VariationalDequantize)
    x = torch.randint(0, 256, (6, 16), dtype=torch.uint8)
    assert torch.isfinite(model.bits_per_dim(x)).all()
    samples = model.sample(4)
    assert samples.shape == (4, 16) and bool((samples >= 0).all()) and bool((samples <= 255).all())


@pytest.mark.parametrize("kind", ["uniform", "variational"])
def test_importance_estimate_is_above_the_bound(kind):
    torch.manual_seed(0)
    model = RealNVP(16, layers=2, hidden=8, dequantize=kind)
    if kind == "variational":
        perturbed(model.layers[0], scale=0.1)
    x = torch.randint(0, 256, (32, 16), dtype=torch.uint8)
    with torch.no_grad():
        single = torch.stack([model.log_prob(x) for _ in range(16)]).double()
    # Jensen on the same draws: log-mean-exp >= mean, exactly.
    lme = torch.logsumexp(single, 0) - math.log(16)
    assert bool((lme >= single.mean(0) - 1e-9).all())
    # Fresh draws, on average over rows and repeats: the K=16 estimate is not below K=1.
    k16 = importance_log_prob(model, x, samples=16)
    k1 = importance_log_prob(model, x, samples=1)
    assert k16.shape == (32,) and float(k16.mean()) >= float(k1.mean()) - 0.05
    with pytest.raises(ValueError, match="samples must be a positive int"):
        importance_log_prob(model, x, samples=0)


def test_argument_errors():
    with pytest.raises(ValueError, match="image_shape"):
        VariationalDequantize((0, 3))
    with pytest.raises(ValueError, match="layers"):
        VariationalDequantize(4, layers=0)
    layer = VariationalDequantize((1, 2, 2), layers=1, hidden=4)
    with pytest.raises(ValueError, match="x must have shape"):
        layer(torch.zeros(2, 5, dtype=torch.uint8))
