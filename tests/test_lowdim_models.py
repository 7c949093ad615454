"""flowkern.models.MAF and NSF: sbi's maf and nsf architectures by default, their variants,
round trips, training signal to every part (embedding included), memory saving and compile."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from flowkern import models
from flowkern import nn as fnn
from tolerances import EPS, check_flow_roundtrip, flow_logprob_rounding

VARIANTS = {
    "maf": lambda **kw: models.MAF(3, **kw),
    "iaf": lambda **kw: models.MAF(3, inverse_autoregressive=True, scale="sigmoid", **kw),
    "maf-residual": lambda **kw: models.MAF(3, residual=True, permutation="reverse", **kw),
    "maf-softplus": lambda **kw: models.MAF(3, scale="softplus", **kw),   # nflows 0.14's (sbi's maf)
    "maf-rational": lambda **kw: models.MAF(3, scale="rational", clamp=6.9, **kw),  # zuko's
    "nsf": lambda **kw: models.NSF(3, **kw),
    "nsf-mlp": lambda **kw: models.NSF(3, conditioner="mlp", **kw),
    "nsf-autoregressive": lambda **kw: models.NSF(3, autoregressive=True, **kw),
    "nsf-1d": lambda **kw: models.NSF(1, autoregressive=True, **kw),
}


def _perturb(flow, std=0.05, seed=0):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in flow.named_parameters():
            if not name.startswith("embedding"):
                p.add_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * std)
    return flow


def test_defaults_are_sbis_architectures():
    maf = models.MAF(4, context=6)
    kinds = [type(m).__name__ for m in maf.layers]
    assert kinds == ["MaskedAutoregressiveAffine", "Permutation"] * 5
    made = maf.layers[0].made
    # nflows' MADE with num_blocks=2: an initial layer and 2 blocks, 3 hidden layers of 50
    assert made.first.out_features == 50 and sum(isinstance(m, nn.Linear) for m in made.hidden) == 2
    assert isinstance(made.activation, nn.Tanh) and maf.layers[1].kind == "random"
    zuko_like = models.MAF(4, scale="rational", clamp=6.9)
    assert all(m.scale == "rational" and m.clamp == 6.9 for m in zuko_like.layers[::2])
    nsf = models.NSF(4, context=6)
    assert [type(m).__name__ for m in nsf.layers] == ["SplineCoupling", "LinearLU"] * 5
    c = nsf.layers[0]
    assert c.bins == 10 and c.bound == 3.0 and isinstance(c.conditioner, fnn.ResidualNet)
    assert c.conditioner.first.out_features == 50 and len(c.conditioner.blocks) == 2
    assert c.conditioner.context_features == 6
    assert not torch.equal(nsf.layers[0].mask, nsf.layers[2].mask)  # alternating


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_variants_round_trip_sample_and_train_with_an_embedding(variant):
    torch.manual_seed(0)
    emb = nn.Sequential(nn.Linear(9, 4), nn.Tanh())
    flow = _perturb(VARIANTS[variant](context=4, layers=3, hidden=16, embedding=emb))
    d = flow.features
    x, c = torch.randn(12, d), torch.randn(12, 9)
    check_flow_roundtrip(flow, x, c)
    lp = flow.log_prob(x, c)
    assert lp.shape == (12,) and torch.isfinite(lp).all()
    (-lp.mean()).backward()
    for name, p in flow.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert all(p.grad.abs().sum() > 0 for p in emb.parameters())
    s = flow.sample(7, context=c[:2])
    assert s.shape == (7, 2, d) and torch.isfinite(s).all()


@pytest.mark.parametrize("variant", ["maf", "nsf", "nsf-autoregressive"])
def test_memory_saving_and_compile(variant):
    torch.manual_seed(0)
    flow = _perturb(VARIANTS[variant](context=2, layers=3, hidden=16))
    x, c = torch.randn(10, 3), torch.randn(10, 2)

    def grads(memory_saving):
        flow.memory_saving = memory_saving
        flow.zero_grad(set_to_none=True)
        loss = -flow.log_prob(x, c).sum()
        loss.backward()
        return {n: p.grad.clone() for n, p in flow.named_parameters()}, loss.detach()

    ref, loss_ref = grads(False)
    got, loss = grads(True)
    assert (loss - loss_ref).abs() <= 2 * flow_logprob_rounding(flow, x, EPS[torch.float32], c).sum()
    overall = max(g.abs().max().item() for g in ref.values())
    for name, g in ref.items():  # tests/test_memory_saving.py's rule
        assert (got[name] - g).abs().max() <= 1e-4 * g.abs().max() + 4 * EPS[torch.float32] * overall, name
    flow.memory_saving = False
    torch._dynamo.reset()  # Flow.log_prob's code object is compiled for many flows in one process
    compiled = torch.compile(flow.log_prob, fullgraph=True)
    assert (compiled(x, c) - flow.log_prob(x, c)).abs().max() <= 2 * flow_logprob_rounding(
        flow, x, EPS[torch.float32], c).max()


def test_bad_model_arguments():
    for make, err, match in (
            (lambda: models.NSF(1), ValueError, "features >= 2"),
            (lambda: models.NSF(3, inverse_autoregressive=True), ValueError, "autoregressive=True"),
            (lambda: models.NSF(3, autoregressive=True, conditioner=lambda i, o: nn.Linear(i, o)), ValueError,
             "MADE"),
            (lambda: models.NSF(3, conditioner=nn.Linear(1, 28)), TypeError, "one network per layer"),
            (lambda: models.MAF(3, permutation="sorted"), ValueError, "permutation"),
            (lambda: models.MAF(0), ValueError, "features")):
        with pytest.raises(err, match=match):
            make()


def test_nsf_takes_a_conditioner_factory():
    made = []

    def factory(i, o):
        net = fnn.MLP(i, o, hidden=8, context=2)
        made.append(net)
        return net

    flow = models.NSF(4, context=2, layers=2, conditioner=factory)
    assert len(made) == 2 and flow.layers[0].conditioner is made[0]


@pytest.mark.parametrize("variant", ["maf", "nsf", "iaf"])
def test_batched_conditional_sampling_and_log_prob(variant):
    """sample(n, context=(M, C)) -> (n, M, D): draw [i, m] is the inverse of base draw i * M + m
    under context m alone; log_prob of an (n, M, D) batch against (M, C) scores each under its
    own context."""
    torch.manual_seed(0)
    emb = nn.Linear(5, 4)
    flow = _perturb(VARIANTS[variant](context=4, layers=2, hidden=16, embedding=emb))
    n, m = 6, 3
    c = torch.randn(m, 5)
    torch.manual_seed(11)
    x = flow.sample(n, context=c)
    assert x.shape == (n, m, 3)
    torch.manual_seed(11)
    z = flow.base.sample(n * m).view(n, m, 3)
    for j in range(m):
        cj = c[j].expand(n, 5)
        back, _ = flow(x[:, j], cj)  # the draw's latent under its own context
        assert (back - z[:, j]).abs().max() <= 1e-4 * (1 + z.abs().max())
    # Changing one context changes that context's draws only, to the bit elsewhere.
    c2 = c.clone()
    c2[1] += 1.0
    torch.manual_seed(11)
    x2 = flow.sample(n, context=c2)
    assert torch.equal(x2[:, [0, 2]], x[:, [0, 2]]) and not torch.equal(x2[:, 1], x[:, 1])
    lp = flow.log_prob(x, c)
    assert lp.shape == (n, m)
    for j in range(m):
        assert torch.equal(lp[:, j], flow.log_prob(x[:, j], c[j].expand(n, 5))) or (
            (lp[:, j] - flow.log_prob(x[:, j], c[j].expand(n, 5))).abs().max()
            <= 2 * flow_logprob_rounding(flow, x[:, j], EPS[torch.float32], c[j].expand(n, 5)).max())
    assert flow.log_prob(x[:, 0], c[0]).shape == (n,)  # a (C,) context applies to every row
    with pytest.raises(ValueError, match=r"x must have shape \(batch, 3\)"):  # x's M is not the context's
        flow.log_prob(x, c[:2])
