"""flowkern.accelerate on nflows and zuko models: the libraries' own numbers, on the fused ops.

Every comparison runs the library's plain module and its accelerated deep copy on the same
weights and inputs. float64: outputs and log-dets to 1e-12 relative; gradients to 1e-11 of each
parameter's largest gradient (the fused backward is analytic, nflows' and zuko's is autograd of
their forward: the two round differently, measured 2e-12 at most on these models, see
docs/interop.md). float32: within a few hundred ulps of the float64 answer, like the library's
own float32 run (twice its error plus the conditioning allowance)."""
from __future__ import annotations

import copy
import functools
import io

import pytest
import torch

import flowkern
from flowkern.interop import explain, is_accelerated

nflows = pytest.importorskip("nflows")
zuko = pytest.importorskip("zuko")

from nflows.nn.nets import ResidualNet  # noqa: E402
from nflows.transforms.autoregressive import (MaskedAffineAutoregressiveTransform,  # noqa: E402
                                              MaskedPiecewiseRationalQuadraticAutoregressiveTransform)
from nflows.transforms.base import CompositeTransform  # noqa: E402
from nflows.transforms.coupling import (AffineCouplingTransform,  # noqa: E402
                                        PiecewiseRationalQuadraticCouplingTransform)
from nflows.transforms.lu import LULinear  # noqa: E402
from nflows.transforms.permutations import RandomPermutation  # noqa: E402
from nflows.utils.torchutils import create_alternating_binary_mask  # noqa: E402

D, C = 5, 3


def _jiggle(model, seed=0, scale=0.3):
    """Weights away from the identity init, so every spline bin and slope matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return model


def nflows_model(spline_kw=None, dtype=torch.float64, seed=0):
    """An sbi-shaped nflows transform: spline couplings with ResidualNets and LULinear, a masked
    autoregressive spline, a masked affine autoregressive transform (sbi's maf) and an affine
    coupling, all conditional."""
    torch.manual_seed(seed)
    kw = {"num_bins": 6, "tails": "linear", "tail_bound": 3.0, **(spline_kw or {})}
    net = lambda i, o: ResidualNet(i, o, hidden_features=16, context_features=C, num_blocks=2)  # noqa: E731
    layers = []
    for i in range(2):
        layers.append(PiecewiseRationalQuadraticCouplingTransform(create_alternating_binary_mask(D, even=i % 2 == 0),
                                                                  net, **kw))
        layers.append(LULinear(D, identity_init=True))
    layers.append(MaskedPiecewiseRationalQuadraticAutoregressiveTransform(D, 16, context_features=C, **kw))
    layers.append(AffineCouplingTransform(create_alternating_binary_mask(D), net))
    # the MAF first and jiggled less: its inverse divides by scales down to 1e-3 feature after
    # feature, and with the others' weights it maps their inverses to |x| ~ 1e8 (both ways)
    maf = _jiggle(MaskedAffineAutoregressiveTransform(D, 16, context_features=C, num_blocks=2).to(dtype), seed, 0.05)
    return CompositeTransform([maf, *_jiggle(CompositeTransform(layers).to(dtype), seed)._transforms])


def data(n=40, dtype=torch.float64, seed=1, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, D, generator=g, dtype=dtype) * scale
    x[0] = torch.tensor([-3.0, 3.0, 7.0, -40.0, 0.0], dtype=dtype)  # on and outside the bound
    return x, torch.randn(n, C, generator=g, dtype=dtype)


def rel(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-300)).item()


def grads(model):
    return [p.grad.clone() for p in model.parameters()]


def check_same(plain, fast, run, out_tol=1e-12, grad_tol=1e-11):
    """run(model) -> tensors; the first ones' sum is backpropagated."""
    outs_p, outs_f = run(plain), run(fast)
    for a, b in zip(outs_f, outs_p):
        assert rel(a, b) < out_tol, (rel(a, b), out_tol)
    sum(o.sum() for o in outs_p).backward()
    sum(o.sum() for o in outs_f).backward()
    for (name, p), q in zip(plain.named_parameters(), fast.parameters()):
        assert p.grad is not None and q.grad is not None, name
        assert rel(q.grad, p.grad) < grad_tol, (name, rel(q.grad, p.grad))


@pytest.mark.parametrize("spline_kw", [{}, dict(min_bin_width=0.02, min_bin_height=0.01, min_derivative=0.05),
                                       dict(tail_bound=1.5, num_bins=3)], ids=["default", "mins", "bound"])
def test_nflows_forward_and_gradients_match(spline_kw):
    plain = nflows_model(spline_kw)
    fast = flowkern.accelerate(plain, inplace=False)
    assert sum(map(is_accelerated, fast.modules())) == 7 and not any(map(is_accelerated, plain.modules()))
    x, c = data()
    check_same(plain, fast, lambda m: m(x, context=c))


def test_nflows_inverse_matches_and_inverts():
    plain = nflows_model()
    fast = flowkern.accelerate(plain, inplace=False)
    z, c = data(seed=3)
    # layer by layer, each fused transform gives nflows' inverse to 1e-12
    for tp, tf in zip(plain._transforms, fast._transforms):
        kw = {} if isinstance(tp, LULinear) else {"context": c}
        check_same(tp, tf, lambda m: m.inverse(z, **kw))
    with torch.no_grad():
        (xp, ldp), (xf, ldf) = plain.inverse(z, context=c), fast.inverse(z, context=c)
        z_p, ld_p = plain(xp, context=c)
        z_f, ld_f = fast(xf, context=c)
    # Through the whole stack nflows' own float64 log-det is off by ~2e-10 (its round trip does
    # not cancel to better, measured): the fused one round-trips tighter and is within that.
    lib_err = (ld_p + ldp).abs().max().item()
    assert (ld_f + ldf).abs().max().item() <= lib_err + 1e-12 * ldp.abs().max().item()
    assert (ldf - ldp).abs().max().item() <= 2 * lib_err + 1e-12 * ldp.abs().max().item()
    assert rel(xf, xp) < 1e-12
    torch.testing.assert_close(z_f, z, rtol=1e-9, atol=1e-9)


def test_nflows_float32_within_the_library_own_error():
    plain64 = nflows_model()
    plain32 = copy.deepcopy(plain64).float()
    fast32 = flowkern.accelerate(copy.deepcopy(plain32))
    x, c = data()
    with torch.no_grad():
        exact = plain64(x, context=c)
        lib = plain32(x.float(), context=c.float())
        ours = fast32(x.float(), context=c.float())
    for e, a, b in zip(exact, lib, ours):
        lib_err = (a.double() - e).abs().max().item()
        assert (b.double() - e).abs().max().item() <= 2 * lib_err + 1e-5 * e.abs().max().item()


def test_state_dict_and_tree_are_unchanged_and_undo_restores():
    plain = nflows_model()
    before = {k: v.clone() for k, v in plain.state_dict().items()}
    names = [n for n, _ in plain.named_modules()]
    flowkern.accelerate(plain)
    assert [n for n, _ in plain.named_modules()] == names
    assert list(plain.state_dict()) == list(before)
    assert all(torch.equal(plain.state_dict()[k], v) for k, v in before.items())
    # saved accelerated, loads into a plain model, and the plain one back
    buf = io.BytesIO()
    torch.save(plain.state_dict(), buf)
    other = nflows_model(seed=5)
    other.load_state_dict(torch.load(io.BytesIO(buf.getvalue())))
    x, c = data()
    with torch.no_grad():
        torch.testing.assert_close(other(x, context=c)[1], plain(x, context=c)[1], rtol=1e-12, atol=0)
    assert isinstance(plain._transforms[1], PiecewiseRationalQuadraticCouplingTransform)
    flowkern.accelerate(plain, enable=False)
    assert not any(map(is_accelerated, plain.modules()))
    assert type(plain._transforms[1]) is PiecewiseRationalQuadraticCouplingTransform
    assert "_fk_identity" not in plain._transforms[1].__dict__
    # and the whole model pickles accelerated
    flowkern.accelerate(plain)
    buf = io.BytesIO()
    torch.save(plain, buf)
    again = torch.load(io.BytesIO(buf.getvalue()), weights_only=False)
    with torch.no_grad():
        torch.testing.assert_close(again(x, context=c)[1], plain(x, context=c)[1], rtol=0, atol=0)


def test_explain_says_what_was_left_and_why():
    class MyCoupling(PiecewiseRationalQuadraticCouplingTransform):
        pass

    net = lambda i, o: ResidualNet(i, o, hidden_features=8)  # noqa: E731
    model = CompositeTransform([
        PiecewiseRationalQuadraticCouplingTransform(create_alternating_binary_mask(D), net, tails="circular"),
        MyCoupling(create_alternating_binary_mask(D), net, tails="linear"),
        RandomPermutation(D),
    ])
    flowkern.accelerate(model)
    report = explain(model)
    why = {e.name: e.why for e in report.entries}
    assert not report.accelerated
    assert "tails='circular'" in why["_transforms.0"]
    assert "subclass" in why["_transforms.1"]
    assert "no fused version" in why["_transforms.2"]
    assert "_transforms" not in why  # the composite itself is not a transform to report
    assert "left as they are" in str(report)


def test_nflows_tails_none_matches():
    """tails=None, nflows' default for its spline transforms: the spline on [0, 1] with learned end
    slopes (3K + 1 params). A stack of them keeps [0, 1] (nflows raises outside it), with the
    coupling's unconditional CDF and the autoregressive spline; both directions and gradients."""
    torch.manual_seed(0)
    net = lambda i, o: ResidualNet(i, o, hidden_features=16, context_features=C, num_blocks=2)  # noqa: E731
    layers = [PiecewiseRationalQuadraticCouplingTransform(create_alternating_binary_mask(D), net, num_bins=5,
                                                          apply_unconditional_transform=True),
              MaskedPiecewiseRationalQuadraticAutoregressiveTransform(D, 16, context_features=C, num_bins=4),
              PiecewiseRationalQuadraticCouplingTransform(create_alternating_binary_mask(D, even=False), net,
                                                          num_bins=7, min_bin_width=0.02, min_derivative=0.05)]
    plain = _jiggle(CompositeTransform(layers).double())
    assert all(t.tails is None for t in plain._transforms)
    fast = flowkern.accelerate(plain, inplace=False)
    assert sum(map(is_accelerated, fast.modules())) == 4  # with the unconditional CDF
    g = torch.Generator().manual_seed(2)
    x, c = torch.rand(40, D, generator=g, dtype=torch.float64), torch.randn(40, C, generator=g, dtype=torch.float64)
    x[0] = torch.tensor([0.0, 1.0, 0.5, 1e-9, 1 - 1e-9], dtype=torch.float64)  # the ends
    check_same(plain, fast, lambda m: m(x, context=c))
    with torch.no_grad():
        z = plain(x, context=c)[0]
    for tp, tf in zip(plain._transforms, fast._transforms):
        check_same(tp, tf, lambda m: m.inverse(z, context=c))
    with torch.no_grad():  # outside [0, 1] nflows raises; the fused spline passes it through
        out = torch.tensor([[-0.5, 1.5, 0.5, 0.5, 0.5]], dtype=torch.float64)
        y, ld = fast._transforms[1](out, context=c[:1])
        assert torch.isfinite(ld).all() and y[0, 0].item() == -0.5 and y[0, 1].item() == 1.5


def test_nflows_coupling_with_an_unconditional_spline():
    """apply_unconditional_transform=True: the identity features' own spline (a
    PiecewiseRationalQuadraticCDF with batch-shared params) is fused too, in nflows' order
    (after the coupling going forward, before it going back)."""
    torch.manual_seed(0)
    net = lambda i, o: ResidualNet(i, o, hidden_features=8, context_features=C)  # noqa: E731
    plain = _jiggle(CompositeTransform([PiecewiseRationalQuadraticCouplingTransform(
        create_alternating_binary_mask(D), net, num_bins=4, tails="linear", tail_bound=2.0,
        apply_unconditional_transform=True)]).double())
    fast = flowkern.accelerate(plain, inplace=False)
    assert is_accelerated(fast._transforms[0]) and is_accelerated(fast._transforms[0].unconditional_transform)
    x, c = data()
    check_same(plain, fast, lambda m: m(x, context=c))
    check_same(plain, fast, lambda m: m.inverse(x, context=c))


def test_accelerate_checks_its_arguments():
    with pytest.raises(TypeError, match="nn.Module"):
        flowkern.accelerate("model")
    with pytest.raises(TypeError, match="bool"):
        flowkern.accelerate(torch.nn.Linear(2, 2), enable=1)
    m = torch.nn.Sequential(torch.nn.Linear(2, 2))
    assert flowkern.accelerate(m) is m and "no module" in str(explain(m))


def test_image_inputs_run_the_library_own_code():
    from nflows.nn.nets import ConvResidualNet

    torch.manual_seed(0)
    plain = _jiggle(AffineCouplingTransform(torch.tensor([1, 0, 1, 0]), lambda i, o: ConvResidualNet(
        i, o, hidden_channels=8, num_blocks=1)).double())
    fast = flowkern.accelerate(plain, inplace=False)
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64)
    check_same(plain, fast, lambda m: m(x))
    check_same(plain, fast, lambda m: m.inverse(x))


def test_uneven_masks_and_no_identity_features():
    """A mask that steps unevenly gathers its features; a mask of all ones (sbi's nsf on a 1-D
    theta: mask [1], a conditioner of the context alone) has no identity features at all."""
    torch.manual_seed(0)
    net = lambda i, o: ResidualNet(max(i, 1), o, hidden_features=8, context_features=C)  # noqa: E731
    uneven = _jiggle(CompositeTransform([PiecewiseRationalQuadraticCouplingTransform(
        torch.tensor([1, 1, 0, 1, 0]), net, num_bins=4, tails="linear", tail_bound=3.0)]).double())
    fast = flowkern.accelerate(uneven, inplace=False)
    x, c = data()
    check_same(uneven, fast, lambda m: m(x, context=c))
    check_same(uneven, fast, lambda m: m.inverse(x, context=c))

    class ContextOnly(torch.nn.Module):  # sbi's ContextSplineMap: ignores its (B, 0) input
        hidden_features = 8

        def __init__(self, i, o):
            super().__init__()
            self.net = torch.nn.Sequential(torch.nn.Linear(C, 8), torch.nn.Tanh(), torch.nn.Linear(8, o))

        def forward(self, inputs, context):
            return self.net(context)

    one = _jiggle(CompositeTransform([PiecewiseRationalQuadraticCouplingTransform(
        torch.tensor([1]), ContextOnly, num_bins=4, tails="linear", tail_bound=3.0)]).double())
    fast = flowkern.accelerate(one, inplace=False)
    assert is_accelerated(fast._transforms[0])
    x1 = x[:, :1]
    check_same(one, fast, lambda m: m(x1, context=c))
    check_same(one, fast, lambda m: m.inverse(x1, context=c))


def test_large_lulinear_is_left_to_nflows():
    small, large = LULinear(8), LULinear(64)
    flowkern.accelerate(small)
    flowkern.accelerate(large)
    assert is_accelerated(small) and not is_accelerated(large)
    assert "D^4" in explain(large).left[0].why


# ---- zuko ----

def check_zuko_flow(plain, accelerated=3):
    """log_prob and every gradient of a 4-feature zuko flow, and its samples for the same base
    noise (the inverse: one pass per feature for an autoregressive flow)."""
    fast = flowkern.accelerate(plain, inplace=False)
    assert sum(map(is_accelerated, fast.modules())) == accelerated
    g = torch.Generator().manual_seed(2)
    x = torch.randn(30, 4, generator=g, dtype=torch.float64) * 3
    c = torch.randn(30, C, generator=g, dtype=torch.float64)
    check_same(plain, fast, lambda m: (m(c).log_prob(x),))
    torch.manual_seed(7)
    a = plain(c).rsample((5,))
    torch.manual_seed(7)
    b = fast(c).rsample((5,))
    assert a.shape == b.shape == (5, 30, 4) and rel(b, a) < 1e-11


def zuko_nsf(dtype=torch.float64, **kw):
    torch.manual_seed(0)
    return _jiggle(zuko.flows.NSF(4, C, transforms=3, hidden_features=(32, 32), bins=6, **kw).to(dtype), scale=0.5)


@pytest.mark.parametrize("kw", [{}, dict(univariate=functools.partial(zuko.transforms.MonotonicRQSTransform,
                                                                      bound=2.0, slope=1e-2))],
                         ids=["default", "bound-slope"])
def test_zuko_nsf_log_prob_gradients_and_samples_match(kw):
    if "univariate" in kw:  # NSF fixes univariate itself; MAF takes it
        plain = _jiggle(zuko.flows.MAF(4, C, transforms=3, hidden_features=(32, 32), shapes=[(6,), (6,), (5,)],
                                       **kw).double(), scale=0.5)
    else:
        plain = zuko_nsf()
    check_zuko_flow(plain)


@pytest.mark.parametrize("flow", ["maf", "maf-slope", "realnvp", "coupling-rqs"])
def test_zuko_affine_and_coupling_flows_match(flow):
    """MAF's MonotonicAffineTransform (the "rational" scale), and zuko's coupling transforms
    (RealNVP/NICE: GeneralCouplingTransform) with an affine or a spline univariate."""
    torch.manual_seed(0)
    kw = dict(transforms=3, hidden_features=(32, 32))
    if flow == "maf":
        plain = zuko.flows.MAF(4, C, **kw)
    elif flow == "maf-slope":
        plain = zuko.flows.MAF(4, C, univariate=functools.partial(zuko.transforms.MonotonicAffineTransform, slope=0.1),
                               **kw)
    elif flow == "realnvp":
        plain = zuko.flows.RealNVP(4, C, **kw)
    else:
        plain = zuko.flows.RealNVP(4, C, univariate=zuko.transforms.MonotonicRQSTransform,
                                   shapes=[(5,), (5,), (4,)], **kw)
    plain = _jiggle(plain.double(), scale=1.0 if "maf" in flow else 0.5)  # scales reach the soft clamp
    check_zuko_flow(plain)


def test_zuko_other_univariates_are_left_with_a_reason():
    flow = zuko.flows.NCSF(3, 2, transforms=2)
    flowkern.accelerate(flow)
    report = explain(flow)
    autoregressive = [e for e in report.entries if "autoregressive" in e.cls]
    assert autoregressive and all(not e.accelerated and "CircularRQSTransform" in e.why for e in autoregressive)


# ---- normflows ----

def normflows_model(extra=()):
    nf = pytest.importorskip("normflows")
    torch.manual_seed(0)
    flows = [nf.flows.CoupledRationalQuadraticSpline(4, 2, 16, num_bins=5, tail_bound=2.5),
             nf.flows.AutoregressiveRationalQuadraticSpline(4, 2, 16, num_bins=5, tail_bound=2.5),
             nf.flows.AffineCouplingBlock(nf.nets.MLP([2, 16, 4]), scale_map="exp"),
             nf.flows.AffineCouplingBlock(nf.nets.MLP([2, 16, 2]), scale=False),
             nf.flows.MaskedAffineAutoregressive(4, 16, num_blocks=2), *extra]
    return _jiggle(nf.NormalizingFlow(nf.distributions.DiagGaussian(4), flows).double())


def test_normflows_log_prob_gradients_and_samples_match():
    plain = normflows_model()
    fast = flowkern.accelerate(plain, inplace=False)
    # the coupling, its unconditional CDF, the autoregressive spline, both affine couplings, the MAF
    assert sum(map(is_accelerated, fast.modules())) == 6
    g = torch.Generator().manual_seed(4)
    x = torch.randn(40, 4, generator=g, dtype=torch.float64) * 2
    x[0] = torch.tensor([2.5, -2.5, 9.0, 0.0], dtype=torch.float64)
    check_same(plain, fast, lambda m: (m.log_prob(x),))
    z = torch.randn(40, 4, generator=g, dtype=torch.float64)
    check_same(plain, fast, lambda m: m.forward_and_log_det(z))  # normflows' sampling direction


def test_normflows_sigmoid_affine_is_left_with_a_reason():
    nf = pytest.importorskip("normflows")
    model = normflows_model([nf.flows.AffineCouplingBlock(nf.nets.MLP([2, 16, 4]), scale_map="sigmoid")])
    flowkern.accelerate(model)
    left = explain(model).left
    assert len(left) == 1 and "sigmoid" in left[0].why and left[0].name == "flows.5.flows.1"
