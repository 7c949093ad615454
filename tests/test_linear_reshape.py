"""LinearLU, Invertible1x1Conv, Permutation, Squeeze/Unsqueeze and Split: the layer contract
(round trip, log-det = log|det J|, gradients, batch 0/1, running log-det), the LU
parametrisation, permutation state, errors, and a multi-scale Flow built from them."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from flowkern.nn.coupling import AffineCoupling
from flowkern.nn.flow import Flow, StandardNormal
from flowkern.nn.linear import Invertible1x1Conv, LinearLU, Permutation
from flowkern.nn.reshape import Split, Squeeze, Unsqueeze

from tolerances import EPS, sum_rounding
from layer_checks import (check_batch_sizes, check_gradcheck, check_logdet_jacobian, check_round_trip,
                          check_running_logdet, perturb_, standard_normal_logpdf)


def _lu_layer(kind, size, seed=0):
    torch.manual_seed(seed)
    layer = LinearLU(size) if kind == "linear" else Invertible1x1Conv(size)
    return perturb_(layer, 0.3, seed)  # away from the orthogonal init, log-det != 0


# --- LinearLU and Invertible1x1Conv -----------------------------------------------------------

def test_linear_lu_contract():
    layer = _lu_layer("linear", 5)
    x = torch.randn(4, 5)
    _, ld = check_round_trip(layer, x)
    assert ld.abs().min() > 1e-3  # a non-trivial log-det is being checked
    check_running_logdet(layer, x)
    check_batch_sizes(layer, (5,))
    check_logdet_jacobian(layer, torch.randn(3, 5, dtype=torch.float64))


@pytest.mark.parametrize("shape", [(2, 3, 2, 2), (2, 3, 4), (2, 3, 2, 1, 2)], ids=["2d", "1d", "3d"])
def test_conv_contract(shape):
    layer = _lu_layer("conv", 3)
    x = torch.randn(shape)
    check_round_trip(layer, x)
    check_running_logdet(layer, x)
    check_batch_sizes(layer, shape[1:])
    check_logdet_jacobian(layer, torch.randn(shape, dtype=torch.float64))


def test_conv_logdet_is_positions_times_sum_log_s_and_matches_conv2d():
    layer = _lu_layer("conv", 3)
    x = torch.randn(2, 3, 4, 5)
    y, ld = layer(x)
    torch.testing.assert_close(ld, (20 * layer.log_s.sum()).expand(2))
    # Two float32 evaluations of sum_c W_oc x_c (3 terms): each within 3 eps sum_c |W_oc x_c| of
    # the exact sum, so of each other within twice that (was rtol / atol 1e-5).
    expected = torch.nn.functional.conv2d(x, layer.weight.view(3, 3, 1, 1))
    mag = torch.nn.functional.conv2d(x.abs(), layer.weight.abs().view(3, 3, 1, 1))
    assert ((y - expected).abs() <= 6 * EPS[torch.float32] * mag).all()
    assert y.is_contiguous() and layer.inverse(y)[0].is_contiguous()


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_lu_gradcheck_input_and_parameters(kind):
    layer = _lu_layer(kind, 3).double()
    x = torch.randn(2, 3, dtype=torch.float64) if kind == "linear" else torch.randn(2, 3, 2, 1, dtype=torch.float64)
    check_gradcheck(layer, x)

    class Inverse(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, v, context=None, logdet=None):
            return self.inner.inverse(v, context, logdet)

    # The parameters themselves, through both directions.
    for module, prefix in ((layer, ""), (Inverse(layer), "inner.")):
        names = [prefix + n for n, _ in layer.named_parameters()]
        params = tuple(p.detach().clone().requires_grad_() for p in layer.parameters())

        def f(*ps, module=module, names=names):
            return torch.func.functional_call(module, dict(zip(names, ps)), (x,))

        assert torch.autograd.gradcheck(f, params, eps=1e-6, atol=1e-5)
    check_gradcheck(Inverse(layer), x)


def test_lu_init_is_orthogonal_and_seeded():
    torch.manual_seed(3)
    a = LinearLU(6)
    torch.manual_seed(3)
    b = Invertible1x1Conv(6)
    w = a.weight
    # W = L U of a float64 orthogonal matrix's LU factors rounded to float32: W's entries within
    # (n + 4) eps (|L| |U|) (the factors' rounding, exp(log_s), the float32 product), so
    # W W^T = I within twice that times |W|^T plus the product's own n eps |W| |W|^T (was atol 1e-5).
    eps, n = EPS[torch.float32], 6
    lower, upper = (f.detach().double().abs() for f in a._factors())
    lu = (lower @ upper).index_select(0, a.permutation)
    wa = w.detach().double().abs()
    bound = (n + 4) * eps * (lu @ wa.T + wa @ lu.T) + n * eps * wa @ wa.T
    assert ((w @ w.T).double() - torch.eye(6, dtype=torch.float64)).abs().le(bound).all()
    _, ld = a(torch.randn(4, 6))
    # log|det| of the orthogonal matrix is 0: each stored log_s is log|s| rounded (eps |log_s|),
    # and their float32 sum rounds (tolerances.sum_rounding) (was atol 1e-5).
    log_s = a.log_s.detach().double()
    assert (ld.double().abs() <= sum_rounding(log_s[None], eps) + 2 * eps * log_s.abs().sum()).all()
    torch.testing.assert_close(b.weight, w, rtol=0, atol=0)  # torch.manual_seed controls the init
    assert not torch.allclose(LinearLU(6).weight, w)


def test_linear_lu_weight_is_p_l_u():
    layer = _lu_layer("linear", 5)
    n = 5
    p = torch.eye(n)[layer.permutation]  # P[i, perm[i]] = 1
    lower = torch.tril(layer.lower, -1) + torch.eye(n)
    upper = torch.triu(layer.upper, 1) + torch.diag(layer.sign_s * layer.log_s.exp())
    torch.testing.assert_close(layer.weight, p @ lower @ upper)
    x = torch.randn(3, n)
    y, ld = layer(x)
    torch.testing.assert_close(y, x @ (p @ lower @ upper).T)
    torch.testing.assert_close(ld, torch.linalg.slogdet(p @ lower @ upper).logabsdet.expand(3))
    # Only the strict triangles of `lower`/`upper` matter (their other entries get no gradient).
    (y.sum() + ld.sum()).backward()
    assert torch.all(torch.triu(layer.lower.grad) == 0) and torch.all(torch.tril(layer.upper.grad) == 0)
    assert set(layer.state_dict()) == {"lower", "upper", "log_s", "sign_s", "permutation"}


def test_lu_dtypes_and_non_contiguous_input():
    layer = _lu_layer("conv", 3)
    x = torch.randn(2, 3, 4, 4)
    y, ld = layer(x)
    y_bf, ld_bf = layer(x.bfloat16())
    assert y_bf.dtype == torch.bfloat16 and ld_bf.dtype == torch.float32
    # x rounds to bfloat16 (relative 2^-8), the float32 matmul of it, the result rounds once more:
    # within 2^-8 (|W| |x| + |y|), twice for the float32 products besides (was rtol / atol 2e-2).
    wx = torch.einsum("oc,bc...->bo...", layer.weight.detach().abs(), x.abs())
    assert ((y_bf.float() - y).abs() <= 2 * EPS[torch.bfloat16] * (wx + y.abs())).all()
    y64, ld64 = layer(x.double())  # float32 parameters, float64 input: float64 out
    assert y64.dtype == torch.float64 and ld64.dtype == torch.float64
    xt = torch.randn(2, 4, 4, 3).permute(0, 3, 1, 2)  # channels-last strides
    torch.testing.assert_close(layer(xt)[0], layer(xt.contiguous())[0])
    lin = _lu_layer("linear", 4)
    xs = torch.randn(6, 8)[:, ::2]
    check_round_trip(lin, xs)  # on a strided view, within y's rounding pulled back by W^-1 (was 1e-5)


def test_lu_layers_in_a_vector_flow():
    torch.manual_seed(0)
    flow = Flow([LinearLU(4), Permutation(4, "random"), perturb_(AffineCoupling(4, hidden=8)), LinearLU(4)])
    perturb_(flow, 0.2)
    x = torch.randn(5, 4)
    z, ld = flow(x)
    torch.testing.assert_close(flow.log_prob(x).double(), standard_normal_logpdf(z) + ld.double())
    check_round_trip(flow, x)  # every layer's rounding pulled back (was rtol 1e-4 / atol 1e-5)


# --- Permutation ------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["reverse", "random"])
@pytest.mark.parametrize("shape", [(3, 5), (2, 5, 2, 3)], ids=["vector", "image"])
def test_permutation_contract(kind, shape):
    torch.manual_seed(0)
    layer = Permutation(5, kind)
    x = torch.randn(shape)
    y, ld = check_round_trip(layer, x, exact=True)
    assert torch.equal(ld, torch.zeros(shape[0]))
    assert torch.equal(y, x[:, layer.permutation])
    if kind == "reverse":
        assert torch.equal(y, x.flip(1))
    check_running_logdet(layer, x)
    check_batch_sizes(layer, shape[1:])
    check_logdet_jacobian(layer, torch.randn(shape, dtype=torch.float64))
    assert layer(x.double())[1].dtype == torch.float64


def test_permutation_state_dict_round_trip():
    torch.manual_seed(0)
    a = Permutation(7, "random")
    b = Permutation(7, "random")
    assert not torch.equal(a.permutation, b.permutation)
    assert "permutation" in a.state_dict()
    b.load_state_dict(a.state_dict())
    x = torch.randn(3, 7)
    assert torch.equal(b(x)[0], a(x)[0])
    assert torch.equal(b.inverse(x)[0], a.inverse(x)[0])  # the cached inverse follows the load
    assert torch.equal(b.inverse(b(x)[0])[0], x)
    # The LU layers save their permutation too, and a whole model restores it.
    torch.manual_seed(1)
    m1 = Flow([LinearLU(4), Permutation(4, "random")])
    m2 = Flow([LinearLU(4), Permutation(4, "random")])
    m2.load_state_dict(m1.state_dict())
    x = torch.randn(2, 4)
    assert torch.equal(m2(x)[0], m1(x)[0]) and torch.equal(m2.inverse(x)[0], m1.inverse(x)[0])
    with pytest.raises(ValueError, match="not a permutation"):
        b.load_state_dict({"permutation": torch.zeros(7, dtype=torch.long)})


# --- Squeeze / Unsqueeze ----------------------------------------------------------------------

@pytest.mark.parametrize("factor", [2, 3])
def test_squeeze_is_exact_space_to_depth(factor):
    x = torch.arange(2 * 3 * (2 * factor) * (3 * factor), dtype=torch.float32).reshape(2, 3, 2 * factor, 3 * factor)
    y, ld = Squeeze(factor)(x)
    assert y.shape == (2, 3 * factor * factor, 2, 3)
    assert torch.equal(y, torch.nn.functional.pixel_unshuffle(x, factor))
    # channel c*f*f + i*f + j holds pixel (i, j) of each f x f block of channel c
    assert torch.equal(y[:, 1 * factor * factor + 1 * factor + 0], x[:, 1, 1::factor, 0::factor])
    assert torch.equal(Squeeze(factor).inverse(y)[0], x)
    assert torch.equal(Unsqueeze(factor)(y)[0], x)
    assert torch.equal(Unsqueeze(factor).inverse(x)[0], y)
    assert torch.equal(ld, torch.zeros(2))


@pytest.mark.parametrize("layer,shape", [(Squeeze(), (1, 2, 4, 4)), (Unsqueeze(), (1, 8, 2, 2))],
                         ids=["squeeze", "unsqueeze"])
def test_reshape_contract(layer, shape):
    x = torch.randn(shape)
    check_round_trip(layer, x, exact=True)
    check_running_logdet(layer, x)
    check_batch_sizes(layer, shape[1:])
    x64 = torch.randn(shape, dtype=torch.float64)
    check_logdet_jacobian(layer, x64)  # log-det 0 and |det J| = 1
    assert layer(x64)[1].dtype == torch.float64


# --- Split ------------------------------------------------------------------------------------

def test_split_contract():
    torch.manual_seed(0)
    layer = Split(perturb_(Invertible1x1Conv(2), 0.3))
    x = torch.randn(3, 4, 2, 2)
    y, ld = check_round_trip(layer, x)
    assert torch.equal(y[:, 2:], x[:, 2:])  # the factored-out half passes unchanged
    torch.testing.assert_close(y[:, :2], layer.layers[0](x[:, :2])[0])
    torch.testing.assert_close(ld, layer.layers[0](x[:, :2])[1])
    check_running_logdet(layer, x)
    check_batch_sizes(layer, (4, 2, 2))
    check_logdet_jacobian(layer, torch.randn(2, 4, 2, 2, dtype=torch.float64))
    check_gradcheck(layer, torch.randn(2, 4, 2, 1, dtype=torch.float64))


def test_split_multi_layer_odd_channels_and_context():
    torch.manual_seed(0)
    # C = 5: the first ceil(5/2) = 3 channels are kept and transformed, the last 2 factored out.
    layer = Split(Squeeze(), perturb_(Invertible1x1Conv(12)), Unsqueeze())
    x = torch.randn(2, 5, 2, 2)
    y, _ = check_round_trip(layer, x)
    assert torch.equal(y[:, 3:], x[:, 3:])
    check_logdet_jacobian(layer, torch.randn(2, 5, 2, 2, dtype=torch.float64))
    # Context reaches every inner layer, in both directions.
    coupling = perturb_(AffineCoupling(2, hidden=8, context=3))
    layer = Split(coupling, LinearLU(2))
    x, ctx = torch.randn(4, 4), torch.randn(4, 3)
    y, ld = check_round_trip(layer, x, ctx)
    h, ld_ref = coupling(x[:, :2], ctx)
    h, ld_ref = layer.layers[1](h, None, ld_ref)
    torch.testing.assert_close(y, torch.cat([h, x[:, 2:]], 1))
    torch.testing.assert_close(ld, ld_ref)
    with pytest.raises(ValueError, match="pass context"):
        layer(x)
    assert isinstance(layer.layers, nn.ModuleList) and len(list(layer.parameters())) > 3


# --- errors -----------------------------------------------------------------------------------

@pytest.mark.parametrize("make,error,match", [
    (lambda: LinearLU(0), ValueError, "features must be an int >= 1"),
    (lambda: LinearLU(2.0), ValueError, "features must be an int"),
    (lambda: Invertible1x1Conv(-1), ValueError, "channels must be an int >= 1"),
    (lambda: Permutation(3, "shuffle"), ValueError, "kind must be one of"),
    (lambda: Permutation(0), ValueError, "features_or_channels must be"),
    (lambda: Squeeze(0), ValueError, "factor must be an int >= 1"),
    (lambda: Unsqueeze(True), ValueError, "factor must be an int"),
    (lambda: Split(), ValueError, "at least one layer"),
    (lambda: Split(nn.Linear(2, 2)), TypeError, r"layers\[0\] must be a flow layer"),
    (lambda: Split(Squeeze(), 3), TypeError, r"layers\[1\] must be a flow layer"),
])
def test_bad_construction(make, error, match):
    with pytest.raises(error, match=match):
        make()


@pytest.mark.parametrize("layer,call,error,match", [
    (LinearLU(5), lambda l: l(torch.randn(3, 4)), ValueError, r"x must have shape \(batch, 5\)"),
    (LinearLU(5), lambda l: l(torch.randn(3, 5, 1)), ValueError, r"x must have shape \(batch, 5\)"),
    (LinearLU(5), lambda l: l.inverse(torch.randn(3, 4)), ValueError, r"z must have shape \(batch, 5\)"),
    (LinearLU(5), lambda l: l(torch.randn(5)), ValueError, "batch dimension"),
    (LinearLU(5), lambda l: l(torch.zeros(3, 5, dtype=torch.long)), TypeError, "floating-point"),
    (LinearLU(5), lambda l: l(torch.randn(3, 5), None, torch.zeros(2)), ValueError, r"logdet must have shape"),
    (Invertible1x1Conv(3), lambda l: l(torch.randn(2, 4, 2, 2)), ValueError, r"shape \(batch, 3, \*spatial\)"),
    (Invertible1x1Conv(3), lambda l: l(torch.randn(2, 3)), ValueError, "at least one spatial dim"),
    (Invertible1x1Conv(3), lambda l: l.inverse(torch.randn(2, 2, 2)), ValueError, r"z must have shape"),
    (Invertible1x1Conv(3), lambda l: l(torch.zeros(2, 3, 2, 2, dtype=torch.int32)), TypeError, "floating-point"),
    (Permutation(4), lambda l: l(torch.randn(2, 3)), ValueError, r"shape \(batch, 4, ...\)"),
    (Permutation(4), lambda l: l(torch.zeros(2, 4, dtype=torch.long)), TypeError, "floating-point"),
    (Squeeze(), lambda l: l(torch.randn(1, 2, 3, 4)), ValueError, r"divisible by 2, got shape \(1, 2, 3, 4\)"),
    (Squeeze(), lambda l: l(torch.randn(1, 2, 4, 5)), ValueError, r"divisible by 2, got shape \(1, 2, 4, 5\)"),
    (Squeeze(), lambda l: l(torch.randn(2, 4, 4)), ValueError, r"shape \(batch, C, H, W\)"),
    (Squeeze(), lambda l: l.inverse(torch.randn(1, 3, 2, 2)), ValueError, "channels divisible by 4"),
    (Squeeze(), lambda l: l(torch.zeros(1, 1, 2, 2, dtype=torch.uint8)), TypeError, "floating-point"),
    (Unsqueeze(), lambda l: l(torch.randn(1, 6, 2, 2)), ValueError, "channels divisible by 4"),
    (Unsqueeze(), lambda l: l.inverse(torch.randn(1, 1, 3, 2)), ValueError, r"divisible by 2, got shape"),
    (Split(Invertible1x1Conv(1)), lambda l: l(torch.randn(2, 1, 2, 2)), ValueError, "C >= 2"),
    (Split(Squeeze()), lambda l: l(torch.randn(1, 4, 4, 4)), ValueError, "preserve the kept channels' shape"),
    (Split(Invertible1x1Conv(2)), lambda l: l(torch.zeros(2, 4, 2, 2, dtype=torch.long)), TypeError, "floating"),
    (Split(Invertible1x1Conv(2)), lambda l: l(torch.randn(2, 4, 2, 2), None, torch.zeros(3)), ValueError,
     r"logdet must have shape"),
    (Split(Invertible1x1Conv(2)), lambda l: l(torch.randn(2, 6, 2, 2)), ValueError, r"shape \(batch, 2, \*spatial\)"),
])
def test_bad_input(layer, call, error, match):
    with pytest.raises(error, match=match):
        call(layer)


# --- a multi-scale flow -----------------------------------------------------------------------

def test_multiscale_flow():
    torch.manual_seed(0)
    flow = Flow([Squeeze(), Invertible1x1Conv(4), Split(Squeeze(), Invertible1x1Conv(8), Unsqueeze()), Unsqueeze()],
                base=StandardNormal((1, 4, 4)))
    perturb_(flow, 0.2)
    x = torch.randn(5, 1, 4, 4)
    z, ld = flow(x)
    assert z.shape == x.shape and ld.shape == (5,)
    lp = flow.log_prob(x)
    torch.testing.assert_close(lp.double(), standard_normal_logpdf(z) + ld.double())
    check_round_trip(flow, x)  # through Split's multi-scale branches (was rtol 1e-4 / atol 1e-5)
    assert flow.sample(3).shape == (3, 1, 4, 4)
    assert flow.sample(0).shape == (0, 1, 4, 4)
    check_logdet_jacobian(flow, torch.randn(2, 1, 4, 4, dtype=torch.float64))
    lp.mean().backward()
    assert all(p.grad is not None for p in flow.parameters())
    assert math.isfinite(lp.sum().item())


def test_permutation_evens_first_and_given():
    x = torch.arange(7.0).reshape(1, 7)
    layer = Permutation(7, "evens_first")
    assert layer(x)[0].tolist() == [[0, 2, 4, 6, 1, 3, 5]]
    back = Permutation(7, layer.inverse_permutation)
    assert torch.equal(back(layer(x)[0])[0], x) and back.kind == "given"
    assert torch.equal(layer.inverse(layer(x)[0])[0], x)
    for bad in (torch.tensor([0, 0, 1]), torch.tensor([0.0, 1.0, 2.0]), torch.tensor([0, 1])):
        with pytest.raises(ValueError, match="0..2 once each"):
            Permutation(3, bad)
    with pytest.raises(ValueError, match="kind"):
        Permutation(3, "sideways")


def test_permutation_grid_transposes_take_the_reshape_path_and_follow_loaded_state():
    """evens_first (and its inverse) permute by a reshape-transpose copy, the same values and
    gradients as index_select; a loaded state dict with another permutation switches the path."""
    from flowkern.nn.linear import transpose_rows

    n = 12
    evens = Permutation(n, "evens_first")
    undo = Permutation(n, evens.inverse_permutation)
    assert transpose_rows(evens.permutation) == n // 2 and transpose_rows(undo.permutation) == 2
    for layer in (evens, undo):
        x = torch.randn(5, n, 3, dtype=torch.float64, requires_grad=True)
        y, _ = layer(x)
        torch.testing.assert_close(y, x.index_select(1, layer.permutation), rtol=0, atol=0)
        (y * torch.arange(y.numel(), dtype=torch.float64).view(y.shape)).sum().backward()
        expected = torch.arange(y.numel(), dtype=torch.float64).view(y.shape).index_select(1, layer.inverse_permutation)
        torch.testing.assert_close(x.grad, expected, rtol=0, atol=0)
        torch.testing.assert_close(layer.inverse(y)[0], x, rtol=0, atol=0)
    shuffled = Permutation(n, "random")
    evens.load_state_dict(shuffled.state_dict())
    assert evens._rows == 0
    x = torch.randn(4, n)
    torch.testing.assert_close(evens(x)[0], x.index_select(1, shuffled.permutation), rtol=0, atol=0)
