"""Your own conditioner: the built-in networks (MLP, ResidualNet, ConvNet) and their options, the
couplings' conditioner= (a name, a module, a factory), identity at init, the checks that name
the argument before any work, and Flow's context embedding."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from flowkern import models
from flowkern import nn as fnn
from flowkern.nn.nets import ConvNet, MLP, ResidualNet, output_layer
from tolerances import EPS, check_flow_roundtrip, flow_logprob_rounding


def _perturb(net: nn.Module, std: float = 0.3, seed: int = 0) -> nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * std)
    return net


# ------------------------------------------------------------------------------ the networks

@pytest.mark.parametrize("context", [0, 3])
def test_mlp_options_shapes_and_context(context):
    net = MLP(5, 7, hidden=11, layers=3, context=context, activation="tanh", dropout=0.1)
    linears = [m for m in net if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(5 + context, 11), (11, 11), (11, 11), (11, 7)]
    assert sum(isinstance(m, nn.Tanh) for m in net) == 3 and sum(isinstance(m, nn.Dropout) for m in net) == 3
    x = torch.randn(4, 5)
    c = torch.randn(4, context) if context else None
    assert torch.equal(net(x, c), torch.zeros(4, 7))  # the last layer starts at zero
    _perturb(net).eval()
    args = (x, c) if context else (x,)
    out = net(*args)
    if context:  # the context is concatenated to the input
        ref = nn.Sequential(*list(net))(torch.cat([x, c], 1))
        assert torch.equal(out, ref)
        assert not torch.equal(net(x, c + 1), out)


def test_mlp_default_layout_keeps_the_state_dict_keys():
    net = MLP(4, 6, hidden=8)
    assert list(net.state_dict()) == ["0.weight", "0.bias", "2.weight", "2.bias", "4.weight", "4.bias"]
    conv = ConvNet(4, 6, hidden=8)
    assert list(conv.state_dict()) == ["0.weight", "0.bias", "2.weight", "2.bias", "4.weight", "4.bias"]


@pytest.mark.parametrize("batch_norm", [False, True])
def test_residual_net_blocks_context_and_identity_blocks(batch_norm):
    torch.manual_seed(0)
    net = ResidualNet(3, 5, hidden=16, blocks=3, context=2, activation="elu", dropout=0.0, batch_norm=batch_norm)
    assert len(net.blocks) == 3 and net.blocks[0].inner.in_features == 16 + 2  # context into every block
    assert output_layer(net) is net.last
    x, c = torch.randn(6, 3), torch.randn(6, 2)
    net.eval()
    # New blocks are the identity: the net is last(first(cat(x, c))), and last starts at zero.
    assert torch.equal(net(x, c), torch.zeros(6, 5))
    nn.init.normal_(net.last.weight)
    h = net.first(torch.cat([x, c], 1))
    assert torch.equal(net(x, c), net.last(h))
    _perturb(net)
    # Each block reads the context: changing it moves the output through the blocks too.
    first_only = net.last(net.blocks[2](net.blocks[1](net.blocks[0](net.first(torch.cat([x, c + 1], 1)), c),
                                                      c), c))
    assert not torch.equal(net(x, c + 1), first_only)


def test_conv_net_broadcasts_the_context_over_the_image():
    net = _perturb(ConvNet(2, 4, hidden=8, layers=3, context=3))
    assert sum(isinstance(m, nn.Conv2d) for m in net) == 4
    x, c = torch.randn(2, 2, 5, 5), torch.randn(2, 3)
    ref = nn.Sequential(*list(net))(torch.cat([x, c[:, :, None, None].expand(-1, -1, 5, 5)], 1))
    assert torch.equal(net(x, c), ref)


@pytest.mark.parametrize("make, match", [
    (lambda: MLP(0, 3), "in_features"), (lambda: MLP(3, 3, hidden=0), "hidden"),
    (lambda: MLP(3, 3, layers=True), "layers"), (lambda: MLP(3, 3, activation="swish"), "activation"),
    (lambda: MLP(3, 3, activation=nn.ReLU()), "activation"), (lambda: MLP(3, 3, dropout=1.0), "dropout"),
    (lambda: ResidualNet(3, 3, blocks=0), "blocks"), (lambda: ConvNet(3, 3, context=-1), "context"),
    (lambda: MLP(3, 64, 4), "positional"),  # the old (in, hidden, out) order must not read silently
])
def test_network_arguments_are_checked(make, match):
    with pytest.raises((ValueError, TypeError), match=match):
        make()


def test_networks_check_their_context():
    with pytest.raises(ValueError, match="conditional"):
        MLP(3, 2, context=2)(torch.randn(4, 3))
    with pytest.raises(ValueError, match=r"context must have shape \(4, 2\)"):
        ResidualNet(3, 2, context=2)(torch.randn(4, 3), torch.randn(4, 5))
    with pytest.raises(ValueError, match="context=0"):
        MLP(3, 2)(torch.randn(4, 3), torch.randn(4, 2))


def test_zero_last_layer_and_its_errors():
    net = _perturb(nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 4)))
    fnn.zero_last_layer(net, torch.arange(4.0))
    assert torch.equal(net(torch.randn(5, 3)), torch.arange(4.0).expand(5, 4))
    with pytest.raises(ValueError, match="no nn.Linear"):
        fnn.zero_last_layer(nn.Tanh())
    with pytest.raises(ValueError, match="no bias"):
        fnn.zero_last_layer(nn.Linear(3, 2, bias=False), torch.ones(2))


# ------------------------------------------------------------------- couplings take any network

class TwoInput(nn.Module):
    """A user's conditional network: its own way of using the context (a gate)."""

    def __init__(self, kept: int, out: int, context: int):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(kept, 16), nn.SiLU())
        self.gate = nn.Linear(context, 16)
        self.head = nn.Linear(16, out)

    def forward(self, x, context):
        return self.head(self.body(x) * torch.sigmoid(self.gate(context)))


LAYERS = {
    "affine": lambda **kw: fnn.AffineCoupling(6, 16, scale="exp", **kw),
    "additive": lambda **kw: fnn.AdditiveCoupling(6, 16, **kw),
    "spline": lambda **kw: fnn.SplineCoupling(6, 16, bins=5, bound=3.0, **kw),
}
WIDTH = {"affine": 2 * 3, "additive": 3, "spline": 3 * 14}  # params per transformed feature x 3 transformed


@pytest.mark.parametrize("kind", sorted(LAYERS))
@pytest.mark.parametrize("how", ["residual", "module", "factory", "factory-context"])
def test_coupling_with_any_conditioner_starts_as_identity_and_trains_it(kind, how):
    torch.manual_seed(0)
    context = 4 if how in ("residual", "factory-context") else 0
    if how == "residual":
        cond = "residual"
    elif how == "module":
        cond = nn.Sequential(nn.Linear(3, 32), nn.GELU(), nn.Linear(32, WIDTH[kind]))
    elif how == "factory":
        cond = lambda i, o: nn.Sequential(nn.Linear(i, 24), nn.ReLU(), nn.Linear(24, o))  # noqa: E731
    else:
        cond = lambda i, o: TwoInput(i, o, context)  # noqa: E731
    layer = LAYERS[kind](conditioner=cond, context=context)
    if how == "residual":
        assert isinstance(layer.conditioner, ResidualNet)
    if how == "module":
        assert layer.conditioner is cond
    assert layer.starts_as_identity
    x = torch.randn(9, 6) * 1.5
    c = torch.randn(9, context) if context else None
    y, ld = layer(x, c)
    # At init the transform is the identity up to the rounding of its identity parameters
    # (the spline's derivative 1 = min + softplus(raw) in float32, a few ulps).
    assert (y - x).abs().max() <= 8 * EPS[torch.float32] * x.abs().max()
    assert ld.abs().max() <= 8 * EPS[torch.float32] * 6
    _perturb(layer.conditioner, 0.2)
    flow = fnn.Flow([layer])
    check_flow_roundtrip(flow, x, c) if context else check_flow_roundtrip(flow, x)
    # Gradients reach the user's network (and the context).
    c_in = c.clone().requires_grad_() if context else None
    (-flow.log_prob(x, c_in).sum()).backward()
    grads = [p.grad for p in layer.conditioner.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert sum(g.abs().sum() for g in grads) > 0
    if context:
        assert c_in.grad.abs().max() > 0


def test_identity_init_false_and_a_net_that_cannot_start_as_identity_keep_their_weights():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 6))
    before = {k: v.clone() for k, v in net.state_dict().items()}
    layer = fnn.AffineCoupling(6, conditioner=net, identity_init=False)
    assert not layer.starts_as_identity
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    # An activation after the output layer: zeroing it does not make a constant output of the
    # identity values (sigmoid(b) != b), so the layer puts the weights back and says so.
    squashed = nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 6), nn.Sigmoid())
    before = {k: v.clone() for k, v in squashed.state_dict().items()}
    layer = fnn.AffineCoupling(6, conditioner=squashed)
    assert not layer.starts_as_identity
    assert all(torch.equal(before[k], v) for k, v in squashed.state_dict().items())


def test_identity_init_leaves_the_global_random_stream_alone():
    torch.manual_seed(5)
    fnn.SplineCoupling(6, 8, conditioner=lambda i, o: nn.Linear(i, o))
    a = torch.rand(3)
    torch.manual_seed(5)
    lin = nn.Linear(3, 3 * 23)  # what the factory draws
    del lin
    assert torch.equal(torch.rand(3), a)


@pytest.mark.parametrize("make, err, match", [
    (lambda: fnn.AffineCoupling(6, conditioner=nn.Linear(3, 5)), ValueError, r"conditioner: .*\(batch, 6\)"),
    (lambda: fnn.AffineCoupling(6, conditioner=nn.Linear(4, 6)), ValueError, "conditioner: net\\(kept\\)"),
    (lambda: fnn.SplineCoupling(6, conditioner=lambda i, o: "net"), TypeError, "factory returned str"),
    (lambda: fnn.SplineCoupling(6, conditioner="transformer"), ValueError, "conditioner must be one of"),
    (lambda: fnn.SplineCoupling(6, conditioner=3), TypeError, "conditioner must be"),
    (lambda: fnn.AffineCoupling(6, context=2, conditioner=nn.Linear(3, 6)), ValueError, "net\\(kept, context\\)"),
    (lambda: fnn.ConvAffineCoupling(4, 8, conditioner="residual"), ValueError, "ConvNet"),
    (lambda: fnn.AffineCoupling(6, identity_init="yes"), TypeError, "identity_init"),
    (lambda: models.RealNVP(6, 2, 8, conditioner=nn.Linear(3, 6)), TypeError, "one network per coupling"),
])
def test_bad_conditioners_raise_naming_the_argument_at_construction(make, err, match):
    with pytest.raises(err, match=match):
        make()


def test_a_conditioner_that_changes_its_output_width_is_caught_at_the_call():
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 6)

        def forward(self, x):
            out = self.lin(x)
            return out if x.shape[0] == 2 else out[:, :4]  # right on the probe, wrong after

    layer = fnn.AffineCoupling(6, conditioner=Odd())
    with pytest.raises(ValueError, match=r"conditioner: its output must have shape \(5, 6\)"):
        layer(torch.randn(5, 6))


def test_probe_restores_training_mode_and_batchnorm_statistics():
    net = nn.Sequential(nn.Linear(3, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 6))
    stats = net[1].running_mean.clone(), net[1].num_batches_tracked.clone()
    fnn.AffineCoupling(6, conditioner=net)
    assert net.training and net[1].training
    assert torch.equal(net[1].running_mean, stats[0]) and torch.equal(net[1].num_batches_tracked, stats[1])


def test_conv_coupling_with_a_user_conv_net_and_context():
    class Conv(nn.Module):
        def __init__(self, i, o):
            super().__init__()
            self.a, self.b = nn.Conv2d(i + 2, 8, 3, padding=1), nn.Conv2d(8, o, 1)

        def forward(self, x, context):
            c = context[:, :, None, None].expand(-1, -1, *x.shape[2:])
            return self.b(torch.relu(self.a(torch.cat([x, c], 1))))

    torch.manual_seed(0)
    layer = fnn.ConvAffineCoupling(4, context=2, conditioner=Conv, scale="tanh")
    assert layer.starts_as_identity
    _perturb(layer.conditioner, 0.1)
    x, c = torch.randn(3, 4, 6, 6), torch.randn(3, 2)
    check_flow_roundtrip(fnn.Flow([layer], fnn.StandardNormal((4, 6, 6))), x, c)


# ------------------------------------------------------------------------------- the embedding

def _conditional_flow(embedding=None, context=3, conditioner="residual", std=0.2):
    torch.manual_seed(0)
    flow = models.RealNVP(5, 4, 16, "spline", context=context, bins=6, conditioner=conditioner,
                          embedding=embedding)
    for layer in flow.couplings:
        _perturb(layer.conditioner, std, seed=len(flow.couplings))
    return flow


def test_embedding_feeds_every_layer_once_per_call_and_trains():
    emb = nn.Sequential(nn.Linear(7, 12), nn.Tanh(), nn.Linear(12, 3))
    calls = []
    emb.register_forward_hook(lambda *a: calls.append(1))
    flow = _conditional_flow(emb)
    x, c = torch.randn(10, 5), torch.randn(10, 7)
    lp = flow.log_prob(x, c)
    assert len(calls) == 1
    plain = _conditional_flow(None)
    plain.load_state_dict({k: v for k, v in flow.state_dict().items() if not k.startswith("embedding.")})
    with torch.no_grad():
        e = emb(c)
    assert torch.equal(lp.detach(), plain.log_prob(x, e).detach())
    (-lp.sum()).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in emb.parameters())
    calls.clear()
    z, _ = flow(x, c)
    back, _ = flow.inverse(z, c)
    assert len(calls) == 2
    check_flow_roundtrip(flow, x, c)
    # Sampling: the contexts embedded once (one call, M rows), then repeated.
    calls.clear()
    s = flow.sample(6, context=c[:3])
    assert s.shape == (6, 3, 5) and len(calls) == 1
    with pytest.raises(ValueError, match=r"\(M, C\) rows after the embedding: context \(1, 10, 7\) gave"):
        flow.sample(6, context=c[None])
    with pytest.raises(ValueError, match="scalar"):
        flow.sample(6, context=c[0, 0])
    with pytest.raises(TypeError, match="context must be a tensor"):
        flow.log_prob(x, [1.0, 2.0])
    with pytest.raises(TypeError, match="embedding must be an nn.Module"):
        fnn.Flow(list(flow.layers), embedding=lambda c: c)


@pytest.mark.parametrize("reuse", [True, False])
def test_memory_saving_with_residual_conditioners_and_an_embedding(reuse, monkeypatch):
    """The memory-saving walk's conditioner reuse takes the two-input call net(kept, context):
    each coupling's network runs once going forward and once going back (twice without reuse),
    and the gradients match standard backprop."""
    from flowkern.nn import memory

    if not reuse:
        monkeypatch.setattr(memory, "_has_conditioner", lambda layer: False)
    emb = nn.Sequential(nn.Linear(7, 3), nn.Tanh())
    # Moderate weights: a steep flow's inverse (round trip 1e-2 at std 0.2) rebuilds inputs that
    # drift far beyond rounding (keep_every bounds that; tests/test_memory_saving.py).
    flow = _conditional_flow(emb, std=0.05)
    x, c = torch.randn(12, 5), torch.randn(12, 7)

    def grads(memory_saving):
        flow.memory_saving = memory_saving
        flow.zero_grad(set_to_none=True)
        xi, ci = x.clone().requires_grad_(), c.clone().requires_grad_()
        loss = -flow.log_prob(xi, ci).sum()
        loss.backward()
        out = {n: p.grad.clone() for n, p in flow.named_parameters()}
        out["<x>"], out["<c>"] = xi.grad, ci.grad
        return out, loss.detach()

    ref, loss_ref = grads(False)
    calls = []
    hooks = [layer.conditioner.register_forward_hook(lambda *a: calls.append(1)) for layer in flow.couplings]
    got, loss = grads(True)
    for h in hooks:
        h.remove()
    assert len(calls) == len(flow.couplings) * (2 if reuse else 3)
    assert (loss - loss_ref).abs() <= 2 * flow_logprob_rounding(flow, x, EPS[torch.float32], c).sum()
    overall = max(g.abs().max().item() for g in ref.values())
    for name, g in ref.items():
        err = (got[name] - g).abs().max().item()
        # The walk rebuilds each layer's input by its inverse (rounding ~ the round trip's), so
        # gradients agree to ~1e-4 of their scale (tests/test_memory_saving.py's rule).
        assert err <= 1e-4 * g.abs().max().item() + 4 * EPS[torch.float32] * overall, name


def test_realnvp_conditioner_factory_and_compile():
    flow = _conditional_flow(None, conditioner=lambda i, o: MLP(i, o, hidden=8, layers=1, context=3,
                                                              activation="tanh"))
    assert all(isinstance(layer.conditioner, MLP) and len(layer.conditioner) == 3 for layer in flow.couplings)
    x, c = torch.randn(8, 5), torch.randn(8, 3)
    torch._dynamo.reset()  # Flow.log_prob's code object is compiled for many flows in one process
    compiled = torch.compile(flow.log_prob, fullgraph=True)
    got, ref = compiled(x, c), flow.log_prob(x, c)
    assert (got - ref).abs().max() <= 2 * flow_logprob_rounding(flow, x, EPS[torch.float32], c).max()


# ------------------------------------------------------------- found by review: noise, statistics

def _ms_grads(flow, x, c, memory_saving, seed=7):
    flow.memory_saving = memory_saving
    flow.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    loss = -flow.log_prob(x, c).sum()
    loss.backward()
    return {n: p.grad.clone() for n, p in flow.named_parameters()}, loss.detach()


@pytest.mark.parametrize("kind", ["coupling", "maf"])
def test_dropout_layers_are_stochastic_and_memory_saving_replays_their_masks(kind):
    torch.manual_seed(0)
    if kind == "coupling":
        layers = [fnn.AffineCoupling(4, context=2, flip=i % 2 == 1, conditioner=lambda i_, o: MLP(
            i_, o, hidden=16, context=2, dropout=0.3)) for i in range(3)]
    else:
        layers = [fnn.MaskedAutoregressiveAffine(4, 16, context=2, dropout=0.3) for _ in range(3)]
    for layer in layers:
        _perturb(layer, 0.05)
    flow = fnn.Flow(layers).double()
    assert all(layer.stochastic for layer in layers)
    flow.eval()
    assert not any(layer.stochastic for layer in layers)  # no dropout in eval mode
    flow.train()
    x, c = torch.randn(9, 4, dtype=torch.float64), torch.randn(9, 2, dtype=torch.float64)
    ref, loss_ref = _ms_grads(flow, x, c, False)
    got, loss = _ms_grads(flow, x, c, True)
    assert (loss - loss_ref).abs() <= 1e-12 * loss_ref.abs()
    for name, g in ref.items():  # the same dropout masks: float64 rounding only
        assert (got[name] - g).abs().max() <= 1e-10 * (1 + g.abs().max()), name


def test_a_batchnorm_in_a_conditioner_counts_each_step_once_under_memory_saving():
    torch.manual_seed(0)
    flow = _conditional_flow(None, std=0.05, conditioner=lambda i, o: ResidualNet(i, o, hidden=16, context=3,
                                                                                batch_norm=True))
    x, c = torch.randn(12, 5), torch.randn(12, 3)
    ref = {k: v.clone() for k, v in flow.state_dict().items()}
    _ms_grads(flow, x, c, True)
    plain = _conditional_flow(None, std=0.05, conditioner=lambda i, o: ResidualNet(i, o, hidden=16, context=3,
                                                                                 batch_norm=True))
    plain.load_state_dict(ref)
    _ms_grads(plain, x, c, False)
    for (k, v), (k2, v2) in zip(flow.state_dict().items(), plain.state_dict().items()):
        if "running" in k or "num_batches" in k:
            assert torch.equal(v, v2) if "num_batches" in k else (v - v2).abs().max() <= 1e-6, k
    assert all(int(v) == 1 for k, v in flow.state_dict().items() if k.endswith("num_batches_tracked"))


def test_a_downsampling_conv_conditioner_is_accepted_and_starts_as_identity():
    class Down3(nn.Module):  # pools 3 times: a 4x4 trial image is too small for it
        def __init__(self, i, o):
            super().__init__()
            self.enc = nn.Sequential(nn.Conv2d(i, 8, 3, padding=1), nn.MaxPool2d(2), nn.MaxPool2d(2), nn.MaxPool2d(2))
            self.up = nn.Upsample(scale_factor=8)
            self.out = nn.Conv2d(8, o, 3, padding=1)

        def forward(self, x):
            return self.out(self.up(torch.relu(self.enc(x))))

    layer = fnn.ConvAffineCoupling(4, conditioner=Down3)
    assert layer.starts_as_identity
    x = torch.randn(2, 4, 16, 16)
    y, ld = layer(x)
    assert torch.equal(y, x) and torch.equal(ld, torch.zeros(2))


def test_a_dropout_after_the_output_layer_is_not_taken_for_the_identity():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 16), nn.ReLU(), nn.Linear(16, 6), nn.Dropout(0.5))
    state = torch.random.get_rng_state()
    # "sigmoid": the identity's raw scale is not 0, so dropping it (in training) is not the identity
    layer = fnn.AffineCoupling(6, conditioner=net, scale="sigmoid")
    assert not layer.starts_as_identity
    assert torch.equal(torch.random.get_rng_state(), state)  # the trial calls drew from a fork
