"""MADE and the masked autoregressive layers (MAF, autoregressive NSF, IAF): the autoregressive
property from the Jacobian, log-det = log|det J|, round trips, identity at init, gradients to
the MADE and the context, the backends against the float64 reference, memory-saving backprop
and torch.compile, and the argument checks."""
from __future__ import annotations

import copy

import pytest
import torch
from torch.func import jacrev

import flowkern
from flowkern import nn as fnn
from flowkern.nn.autoregressive import MADE, input_degrees
from conftest import kernel_backends
from tolerances import EPS, check_against, check_flow_roundtrip, layer_fn, sum_rounding

KINDS = {
    "affine": lambda d, **kw: fnn.MaskedAutoregressiveAffine(d, 12, **kw),
    "affine-sigmoid": lambda d, **kw: fnn.MaskedAutoregressiveAffine(d, 12, scale="sigmoid", **kw),
    "spline": lambda d, **kw: fnn.MaskedAutoregressiveSpline(d, 12, bins=4, bound=2.5, **kw),
}


def _perturb(layer, std=0.3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * std)
    return layer


def _make(kind, d, std=0.3, **kw):
    torch.manual_seed(1)
    return _perturb(KINDS[kind](d, **kw), std)


# -------------------------------------------------------------------------------------- MADE

@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("layout", ["param-major", "feature-major"])
def test_made_outputs_depend_only_on_earlier_features(residual, layout):
    torch.manual_seed(0)
    d, p = 6, 3
    made = _perturb(MADE(d, p, hidden=10, layers=3, context=2, order="random", residual=residual, layout=layout,
                        activation="tanh"))  # smooth: no unit is dead at the point
    made = made.double()
    x, c = torch.randn(d, dtype=torch.float64), torch.randn(1, 2, dtype=torch.float64)
    J = jacrev(lambda v: made(v[None], c)[0])(x)  # (D * P, D)
    feature = torch.arange(d).repeat(p) if layout == "param-major" else torch.arange(d).repeat_interleave(p)
    deg = made.degrees
    allowed = deg[feature][:, None] > deg[None, :]
    assert (J[~allowed] == 0).all()
    # Every allowed connection is used somewhere (hidden >= D - 1): the mask is not too strict.
    reach = (J != 0)
    for i in range(d):
        earlier = deg < deg[i]
        assert reach[feature == i][:, earlier].any(0).all()
    # The context reaches every output, also the first feature's.
    Jc = jacrev(lambda cc: made(x[None], cc)[0])(c)[:, 0]
    assert (Jc.abs().sum(1) > 0).all()


def test_made_degrees_orders_and_state_dict():
    assert input_degrees(4, "natural").tolist() == [1, 2, 3, 4]
    assert input_degrees(4, "reversed").tolist() == [4, 3, 2, 1]
    assert input_degrees(4, torch.tensor([2, 0, 3, 1])).tolist() == [2, 4, 1, 3]  # feature 2 first
    torch.manual_seed(3)
    a = MADE(5, 2, order="random")
    b = MADE(5, 2, order="natural")
    b.load_state_dict(a.state_dict())  # the order travels with the weights
    assert torch.equal(a.degrees, b.degrees) and torch.equal(a.last.mask, b.last.mask)
    assert torch.equal(a.order, torch.argsort(a.degrees))
    x = torch.randn(3, 5)
    assert torch.equal(a(x), b(x))
    one = MADE(1, 3, context=2)  # D = 1: the outputs see the context only
    assert (one.first.mask == 0).all()


@pytest.mark.parametrize("order, match", [
    ([0, 0, 1], "permutation"), ([0, 1], "permutation"), ([0.0, 1.0, 2.0], "permutation"), ("sorted", "order"),
    (object(), "order"),
])
def test_bad_orders_raise_naming_order(order, match):
    with pytest.raises((ValueError, TypeError), match=match):
        fnn.MaskedAutoregressiveAffine(3, order=order)


# ----------------------------------------------------------------------- the autoregressive layers

@pytest.mark.parametrize("kind", sorted(KINDS))
@pytest.mark.parametrize("iaf", [False, True])
@pytest.mark.parametrize("d, context, order", [(1, 2, "natural"), (4, 0, "reversed"), (7, 3, "random")])
def test_jacobian_is_triangular_in_the_order_and_logdet_is_its_log_det(kind, iaf, d, context, order):
    layer = _make(kind, d, context=context, order=order, inverse_autoregressive=iaf).double()
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(3, d, generator=gen, dtype=torch.float64)
    c = torch.randn(3, context, generator=gen, dtype=torch.float64) if context else None
    perm = layer.made.order
    z, ld = layer(x, c)
    back, ld_inv = layer.inverse(z, c)
    for r in range(3):
        cr = c[r:r + 1] if context else None
        for direction, point, logdet in (("forward", x[r], ld[r]), ("inverse", z[r], ld_inv[r])):
            f = layer if direction == "forward" else layer.inverse
            J = jacrev(lambda v: f(v[None], cr)[0][0])(point)
            P = J[perm][:, perm]
            assert (P.triu(1) == 0).all(), f"{direction}: output depends on a later feature"
            sign, logabs = torch.linalg.slogdet(J)
            assert sign > 0  # monotone in each feature
            assert (logabs - logdet).abs() <= 64 * EPS[torch.float64] * (1 + logabs.abs() + d)
    assert (back - x).abs().max() <= 1e-12 * (1 + x.abs().max())
    assert (ld + ld_inv).abs().max() <= 1e-12 * (1 + ld.abs().max())


@pytest.mark.parametrize("kind", sorted(KINDS))
@pytest.mark.parametrize("iaf", [False, True])
def test_new_layers_are_the_identity_and_float32_round_trips(kind, iaf):
    layer = KINDS[kind](5, context=2, inverse_autoregressive=iaf)
    x, c = torch.randn(16, 5) * 1.5, torch.randn(16, 2)
    y, ld = layer(x, c)
    assert (y - x).abs().max() <= 8 * EPS[torch.float32] * x.abs().max()
    assert ld.abs().max() <= 8 * EPS[torch.float32] * 5
    _perturb(layer, 0.2)
    check_flow_roundtrip(fnn.Flow([layer]), x, c)


@pytest.mark.parametrize("kind", sorted(KINDS))
@pytest.mark.parametrize("iaf", [False, True])
def test_gradients_reach_the_made_and_the_context_in_both_directions(kind, iaf):
    layer = _make(kind, 4, std=0.2, context=3, inverse_autoregressive=iaf)
    x, c = torch.randn(8, 4), torch.randn(8, 3, requires_grad=True)
    for direction in ("forward", "inverse"):
        layer.zero_grad(set_to_none=True)
        c.grad = None
        out, ld = (layer if direction == "forward" else layer.inverse)(x, c)
        (out.square().sum() + ld.sum()).backward()
        grads = [p.grad for p in layer.made.parameters()]
        assert all(g is not None and torch.isfinite(g).all() for g in grads)
        assert layer.made.last.weight.grad.abs().sum() > 0 and c.grad.abs().sum() > 0


@pytest.mark.parametrize("backend, device", kernel_backends(with_reference=True))
@pytest.mark.parametrize("kind", sorted(KINDS))
@pytest.mark.parametrize("iaf", [False, True])
def test_backends_agree_with_the_float64_reference(kind, iaf, backend, device):
    """Both directions and the log-dets on each backend within the float64 reference's conditioned
    bound (tolerances.check_against: the layer's own float32 error, twice, plus what 8-ulp moves
    of x, the context and every parameter do), the log-det also within the rounding of its sum
    of per-feature terms log|J_ii| (tolerances.sum_rounding: where they cancel, no input
    perturbation shows it)."""
    layer = _make(kind, 3, std=0.2, context=2, inverse_autoregressive=iaf)
    gen = torch.Generator().manual_seed(4)
    x, c = torch.randn(5, 3, generator=gen), torch.randn(5, 2, generator=gen)
    layer64 = copy.deepcopy(layer).double()
    for direction in ("forward", "inverse"):
        def run(m, v, cc, direction=direction):
            return (m if direction == "forward" else m.inverse)(v, cc)

        f64 = layer64 if direction == "forward" else layer64.inverse
        terms = torch.stack([jacrev(lambda v, r=r: f64(v[None], c[r:r + 1].double())[0][0])(x[r].double())
                             .diagonal().abs().log() for r in range(5)])
        ld_extra = sum_rounding(terms, EPS[torch.float32])
        if kind.startswith("affine"):
            # log m is taken of a rounded m (sigmoid(s + 2) + 1e-3 or exp(...) near 1): its
            # relative rounding, a few eps, is an absolute error in each term, whatever |log m|.
            ld_extra = ld_extra + 4 * EPS[torch.float32] * terms.shape[1]

        fn, params = layer_fn(layer, lambda m, v: run(m, v[:, :3], v[:, 3:]), backend="reference")
        with flowkern.backend(backend):
            got = run(layer.to(device), x.to(device), c.to(device))
        layer.cpu()
        check_against(f"{kind} iaf={iaf} {direction}", fn, [torch.cat([x, c], 1), *params], got, torch.float32,
                      names=("out", "logdet"), extra=(0.0, ld_extra))


@pytest.mark.parametrize("kind", ["affine", "spline"])
def test_memory_saving_and_compile_through_a_stack(kind):
    torch.manual_seed(0)
    layers = []
    for i in range(3):
        layers += [_perturb(KINDS[kind](4, context=2, order="random"), 0.05, seed=i), fnn.Permutation(4, "reverse")]
    flow = fnn.Flow(layers)
    x, c = torch.randn(10, 4), torch.randn(10, 2)

    def grads(memory_saving):
        flow.memory_saving = memory_saving
        flow.zero_grad(set_to_none=True)
        cc = c.clone().requires_grad_()
        loss = -flow.log_prob(x, cc).sum()
        loss.backward()
        return {n: p.grad.clone() for n, p in flow.named_parameters()} | {"<c>": cc.grad}, loss.detach()

    ref, loss_ref = grads(False)
    got, loss = grads(True)
    overall = max(g.abs().max().item() for g in ref.values())
    for name, g in ref.items():  # the rule of tests/test_memory_saving.py (rebuilt inputs round)
        assert (got[name] - g).abs().max() <= 1e-4 * g.abs().max() + 4 * EPS[torch.float32] * overall, name
    assert (loss - loss_ref).abs() <= 1e-5 * loss_ref.abs()
    flow.memory_saving = False
    torch._dynamo.reset()  # Flow.log_prob's code object is compiled for many flows in one process
    compiled = torch.compile(flow.log_prob, fullgraph=True)
    assert (compiled(x, c) - flow.log_prob(x, c)).abs().max() <= 1e-5 * (1 + flow.log_prob(x, c).abs().max())
    torch.manual_seed(5)
    s = flow.sample(6, context=c[0])
    assert s.shape == (6, 4) and torch.isfinite(s).all()


def test_layer_arguments_are_checked_before_any_work():
    layer = fnn.MaskedAutoregressiveSpline(3, context=2)
    with pytest.raises(ValueError, match=r"x must have shape \(batch, 3\)"):
        layer(torch.randn(4, 5), torch.randn(4, 2))
    with pytest.raises(ValueError, match="conditional"):
        layer(torch.randn(4, 3))
    with pytest.raises(ValueError, match=r"context must have shape \(4, 2\)"):
        layer.inverse(torch.randn(4, 3), torch.randn(4, 3))
    with pytest.raises(TypeError, match="dtype"):
        layer(torch.randn(4, 3, dtype=torch.float64), torch.randn(4, 2, dtype=torch.float64))
    for make, match in ((lambda: fnn.MaskedAutoregressiveAffine(0), "features"),
                        (lambda: fnn.MaskedAutoregressiveAffine(3, scale="softsign"), "scale"),
                        (lambda: fnn.MaskedAutoregressiveSpline(3, bins=0), "bins"),
                        (lambda: fnn.MaskedAutoregressiveAffine(3, inverse_autoregressive="no"), "inverse_autoregressive"),
                        (lambda: MADE(3, 2, layout="rows"), "layout")):
        with pytest.raises((ValueError, TypeError), match=match):
            make()
