"""ActNorm and BatchNormFlow: the ops against their formulas and torch.nn.BatchNorm, the layers'
contract (exact inverses, log-dets, gradients, batch sizes), data-dependent initialisation and
running statistics."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from flowkern.nn.flow import Flow
from flowkern.nn.norm import ActNorm, BatchNormFlow
from flowkern.ops.actnorm import actnorm
from flowkern.ops.batchnorm_flow import batch_stats, batchnorm_flow
from flowkern.reference.actnorm import actnorm_ref
from flowkern.reference.batchnorm_flow import batch_stats_ref, batchnorm_flow_ref

from tolerances import (EPS, check_actnorm_init, check_against, check_batchnorm_against_torch, check_op_roundtrip,
                        flow_logprob_rounding, layer_fn)
from layer_checks import (check_batch_sizes, check_gradcheck, check_logdet_jacobian, check_round_trip,
                          check_running_logdet)

# (B, C, *spatial): features only, a sequence, an image; all tiny (Jacobians are (C*H*W)^2).
SHAPES = [(3, 4), (2, 3, 2), (2, 2, 2, 3)]
SHAPE_IDS = ["BxC", "BxCxL", "BxCxHxW"]


def randn(*shape, dtype=torch.float32, seed=0, scale=1.0, offset=0.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=torch.float64) * scale + offset).to(dtype)


def channel_view(v, x):
    return v.reshape((1, x.shape[1]) + (1,) * (x.dim() - 2))


# --- the ops, wrapped as layers so that the shared contract checks apply ---------------------

class ActNormOp(nn.Module):
    def __init__(self, channels, seed=0):
        super().__init__()
        self.shift = nn.Parameter(randn(channels, seed=seed))
        self.log_scale = nn.Parameter(randn(channels, seed=seed + 1, scale=0.5))

    def forward(self, x, context=None, logdet=None):
        return actnorm(x, self.shift, self.log_scale, logdet=logdet)

    def inverse(self, y, context=None, logdet=None):
        return actnorm(y, self.shift, self.log_scale, inverse=True, logdet=logdet)


class BatchNormFlowOp(nn.Module):
    """The op with fixed statistics (buffers) and learned log_gamma, beta."""

    def __init__(self, channels, seed=0, eps=1e-3):
        super().__init__()
        self.register_buffer("mean", randn(channels, seed=seed))
        self.register_buffer("var", randn(channels, seed=seed + 1).abs() + 0.1)
        self.log_gamma = nn.Parameter(randn(channels, seed=seed + 2, scale=0.5))
        self.beta = nn.Parameter(randn(channels, seed=seed + 3))
        self.eps = eps

    def forward(self, x, context=None, logdet=None):
        return batchnorm_flow(x, self.mean, self.var, self.log_gamma, self.beta, eps=self.eps, logdet=logdet)

    def inverse(self, y, context=None, logdet=None):
        return batchnorm_flow(y, self.mean, self.var, self.log_gamma, self.beta, eps=self.eps, inverse=True,
                              logdet=logdet)


OP_LAYERS = [ActNormOp, BatchNormFlowOp]


@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_actnorm_op_formula(shape):
    x = randn(*shape)
    t, s = randn(shape[1], seed=1), randn(shape[1], seed=2)
    y, ld = actnorm(x, t, s)
    torch.testing.assert_close(y, (x + channel_view(t, x)) * channel_view(s, x).exp())  # shift, then scale
    spatial = math.prod(shape[2:])
    torch.testing.assert_close(ld, torch.full((shape[0],), spatial * s.sum().item()))
    # The round trip within (x + t) e^s's rounding pulled back by e^-s (actnorm_roundtrip_tol),
    # both ways, the log-dets cancelling (tolerances.check_roundtrip), instead of rtol/atol 1e-5.
    for inverse in (False, True):
        check_op_roundtrip("actnorm", dict(x=x, shift=t, log_scale=s), dict(inverse=inverse), backend="auto",
                           device="cpu")


@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_batchnorm_flow_op_matches_torch_batch_norm(shape):
    x = randn(*shape)
    c = shape[1]
    mean, var = randn(c, seed=1), randn(c, seed=2).abs() + 0.1
    log_gamma, beta = randn(c, seed=3, scale=0.5), randn(c, seed=4)
    y, ld = batchnorm_flow(x, mean, var, log_gamma, beta, eps=1e-3)
    expected = F.batch_norm(x, mean, var, log_gamma.exp(), beta, training=False, eps=1e-3)
    torch.testing.assert_close(y, expected)
    spatial = math.prod(shape[2:])
    row = spatial * (log_gamma - 0.5 * torch.log(var + 1e-3)).sum()
    torch.testing.assert_close(ld, row.expand(shape[0]))


@pytest.mark.parametrize("make", OP_LAYERS)
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_op_contract(make, shape):
    layer = make(shape[1])
    check_round_trip(layer, randn(*shape, seed=5))
    check_running_logdet(layer, randn(*shape, seed=6))
    check_logdet_jacobian(layer, randn(*shape, seed=7, dtype=torch.float64))  # also makes layer float64
    check_gradcheck(layer, randn(*shape, seed=8, dtype=torch.float64))
    check_batch_sizes(layer.float(), shape[1:])


def test_ops_gradcheck_every_argument():
    """Gradients to every tensor argument, both directions (a fused kernel must give them all,
    mean and var included: training differentiates through the batch statistics)."""
    def leaves(*tensors):
        return tuple(t.double().requires_grad_() for t in tensors)

    x = randn(2, 3, 2, seed=1)
    ld0 = randn(2, seed=2)
    for inverse in (False, True):
        args = leaves(x, randn(3, seed=3), randn(3, seed=4, scale=0.5), ld0)
        assert torch.autograd.gradcheck(
            lambda v, t, s, l: actnorm(v, t, s, inverse=inverse, logdet=l), args)
        args = leaves(x, randn(3, seed=5), randn(3, seed=6).abs() + 0.2, randn(3, seed=7, scale=0.5),
                      randn(3, seed=8), ld0)
        assert torch.autograd.gradcheck(
            lambda v, m, var, g, b, l: batchnorm_flow(v, m, var, g, b, eps=1e-3, inverse=inverse, logdet=l), args)
    assert torch.autograd.gradcheck(lambda v: batch_stats(v), leaves(randn(3, 2, 2, seed=9)))


def test_ops_half_precision_and_non_contiguous():
    x = randn(6, 3, seed=1)
    t, s = randn(3, seed=2), randn(3, seed=3, scale=0.5)
    y, ld = actnorm(x.half(), t.half(), s.half())
    assert y.dtype == torch.float16 and ld.dtype == torch.float32
    # vs the float64 op on the half inputs: 4x the half reference's own error plus 8 half-ulp
    # perturbations (tolerances.check_against), instead of rtol/atol 2e-3
    check_against("half actnorm", lambda x, t, s: actnorm_ref(x, t, s), (x.half(), t.half(), s.half()), (y, ld),
                  torch.float16, in_dtypes=(None, None, None))
    mean, var = batch_stats(x.half())
    assert mean.dtype == var.dtype == torch.float16
    y, ld = batchnorm_flow(x.half(), mean, var, s.half(), t.half())
    assert y.dtype == torch.float16 and ld.dtype == torch.float32
    # float64 input: float64 log-det
    assert actnorm(x.double(), t.double(), s.double())[1].dtype == torch.float64
    # a transposed (non-contiguous) x gives the result of its contiguous copy
    xt = randn(3, 6, seed=4).t()
    assert not xt.is_contiguous()
    for fn, args in [(actnorm, (t, s)), (batchnorm_flow, (t, var.float(), s, t))]:
        torch.testing.assert_close(fn(xt, *args)[0], fn(xt.contiguous(), *args)[0])


def test_batch_stats_is_the_biased_batch_variance():
    x = randn(4, 3, 2, 2, seed=1)
    mean, var = batch_stats(x)
    flat = x.transpose(0, 1).reshape(3, -1)
    torch.testing.assert_close(mean, flat.mean(1))
    torch.testing.assert_close(var, flat.var(1, unbiased=False))
    # without a gradient to carry, the deterministic kernel (two passes): the reference's value up to rounding
    torch.testing.assert_close(batch_stats_ref(x)[1], var)
    with pytest.raises(ValueError, match="at least one value per channel"):
        batch_stats(torch.zeros(0, 3))


def _ok():
    return randn(2, 3), randn(3, seed=1), randn(3, seed=2)


@pytest.mark.parametrize("call,error,match", [
    (lambda x, p, q: actnorm(x.long(), p, q), TypeError, "x must be a floating-point"),
    (lambda x, p, q: actnorm(x[0], p, q), ValueError, r"x must have a batch dimension \(at least 2-D\)"),
    (lambda x, p, q: actnorm(x.numpy(), p, q), TypeError, "x must be a torch.Tensor"),
    (lambda x, p, q: actnorm(x, [0.0] * 3, q), TypeError, "shift must be a torch.Tensor"),
    (lambda x, p, q: actnorm(x, p[:2], q), ValueError, r"shift must have shape \(C,\) = \(3,\)"),
    (lambda x, p, q: actnorm(x, p, q.reshape(1, 3)), ValueError, r"log_scale must have shape \(C,\)"),
    (lambda x, p, q: actnorm(x, p, q.double()), TypeError, "log_scale must have the dtype of x"),
    (lambda x, p, q: actnorm(x, p, q.long()), TypeError, "log_scale must be a floating-point"),
    (lambda x, p, q: actnorm(x.to("meta"), p.to("meta"), q), ValueError, "log_scale is on cpu but x is on meta"),
    (lambda x, p, q: actnorm(x, p, q, logdet=torch.zeros(3)), ValueError, r"logdet must have shape \(batch,\)"),
    (lambda x, p, q: actnorm(x, p, q, logdet=torch.zeros(2, dtype=torch.long)), TypeError, "logdet must be a floa"),
    (lambda x, p, q: batchnorm_flow(x.int(), p, q, p, q), TypeError, "x must be a floating-point"),
    (lambda x, p, q: batchnorm_flow(x[0], p, q, p, q), ValueError, "x must have a batch dimension"),
    (lambda x, p, q: batchnorm_flow(x, p[:1], q, p, q), ValueError, r"mean must have shape \(C,\) = \(3,\)"),
    (lambda x, p, q: batchnorm_flow(x, p, torch.ones(4), p, q), ValueError, "var must have shape"),
    (lambda x, p, q: batchnorm_flow(x, p, q, p.half(), q), TypeError, "log_gamma must have the dtype of x"),
    (lambda x, p, q: batchnorm_flow(x, p, q, p, None), TypeError, "beta must be a torch.Tensor"),
    (lambda x, p, q: batchnorm_flow(x, p, q, p, q, eps=0.0), ValueError, "eps must be a positive"),
    (lambda x, p, q: batchnorm_flow(x, p, q, p, q, eps="a"), TypeError, "eps must be a number"),
    (lambda x, p, q: batchnorm_flow(x, p, q, p, q, logdet=torch.zeros(())), ValueError, "logdet must have shape"),
    (lambda x, p, q: batch_stats(x[0]), ValueError, "x must have a batch dimension"),
])
def test_op_bad_input(call, error, match):
    with pytest.raises(error, match=match):
        call(*_ok())


# --- ActNorm ------------------------------------------------------------------------------------

def initialized_actnorm(shape, seed=0):
    layer = ActNorm(shape[1])
    layer(randn(*(8,) + tuple(shape[1:]), seed=seed, scale=2.0, offset=0.5))  # the first batch initialises it
    return layer


@pytest.mark.parametrize("shape", [(64, 3), (16, 3, 4, 4), (16, 3, 5)], ids=["BxC", "BxCxHxW", "BxCxL"])
def test_actnorm_init_normalises_the_first_batch(shape):
    x = randn(*shape, seed=1, scale=3.0, offset=-2.0) * torch.tensor([1.0, 0.1, 10.0]).reshape(
        (1, 3) + (1,) * (len(shape) - 2))
    layer = ActNorm(3)
    assert not layer.initialized
    y, ld = layer(x)
    assert layer.initialized.item() and layer.initialized.dtype == torch.bool
    # shift / log_scale vs float64 statistics, y's channel means and stds within their
    # rounding (tolerances.check_actnorm_init; was atol 1e-5 / rtol, atol 1e-4)
    check_actnorm_init(layer, x, y)
    spatial = math.prod(shape[2:])
    torch.testing.assert_close(ld, (spatial * layer.log_scale.sum()).detach().expand(shape[0]))
    # later batches use the learned parameters: no re-initialisation
    params = [p.detach().clone() for p in layer.parameters()]
    layer(randn(*shape, seed=2))
    assert all(torch.equal(a, b) for a, b in zip(params, layer.parameters()))


@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_actnorm_contract(shape):
    layer = initialized_actnorm(shape)
    check_round_trip(layer, randn(*shape, seed=5))
    check_running_logdet(layer, randn(*shape, seed=6))
    check_logdet_jacobian(layer, randn(*shape, seed=7, dtype=torch.float64))
    check_gradcheck(layer, randn(*shape, seed=8, dtype=torch.float64))
    check_batch_sizes(layer.float(), shape[1:])  # batch 0 and 1 are fine once initialised


def test_actnorm_constant_feature_stays_finite():
    x = randn(8, 3, seed=1)
    x[:, 1] = 0.37  # zero variance
    x = x.requires_grad_()
    layer = ActNorm(3)
    y, ld = layer(x)
    assert torch.isfinite(layer.log_scale).all() and torch.isfinite(layer.shift).all()
    assert layer.log_scale[1].item() == pytest.approx(-math.log(1e-6), rel=1e-4)
    assert torch.isfinite(y).all() and torch.isfinite(ld).all()
    (y.sum() + ld.sum()).backward()
    assert torch.isfinite(x.grad).all()
    assert all(torch.isfinite(p.grad).all() for p in layer.parameters())
    x2, _ = layer.inverse(y.detach())
    assert torch.isfinite(x2).all()
    # the same with a constant channel in an image batch
    img = torch.ones(2, 2, 3, 3)
    img[:, 0] = randn(2, 3, 3, seed=2)
    y, ld = ActNorm(2)(img)
    assert torch.isfinite(y).all() and torch.isfinite(ld).all()


def test_actnorm_state_dict_keeps_initialized():
    trained = initialized_actnorm((4, 3))
    with torch.no_grad():
        trained.log_scale.add_(0.25)  # "training"
    state = trained.state_dict()
    assert set(state) == {"shift", "log_scale", "initialized"} and state["initialized"].item()
    fresh = ActNorm(3)
    fresh(randn(5, 3, seed=9))  # initialises itself on its own data...
    fresh.load_state_dict(state)  # ...then the loaded state wins and is not re-initialised
    z = randn(4, 3, seed=3)
    fresh.inverse(z)  # allowed: the loaded layer is initialised
    fresh(randn(6, 3, seed=4, scale=5.0))
    for name in ("shift", "log_scale"):
        assert torch.equal(getattr(fresh, name), getattr(trained, name))
    # and an uninitialised state makes the layer initialise again
    blank = ActNorm(3).state_dict()
    fresh.load_state_dict(blank)
    assert not fresh.initialized
    with pytest.raises(RuntimeError, match="before the layer was initialised"):
        fresh.inverse(z)
    fresh(randn(6, 3, seed=4))
    assert fresh.initialized and not torch.equal(fresh.log_scale, trained.log_scale)


def test_actnorm_before_initialisation():
    layer = ActNorm(3)
    with pytest.raises(RuntimeError, match=r"ActNorm.inverse called before the layer was initialised.*initialize"):
        layer.inverse(randn(4, 3))
    layer.eval()
    x = randn(4, 3)
    y, ld = layer(x)  # eval mode: the current parameters (the identity), no initialisation
    assert torch.equal(y, x) and torch.equal(ld, torch.zeros(4)) and not layer.initialized
    layer.train()
    for bad in (torch.zeros(0, 3), torch.zeros(1, 3), torch.zeros(0, 3, 2, 2)):
        with pytest.raises(ValueError, match="initialisation needs at least 2 values per channel"):
            layer(bad)
    layer.initialize(randn(1, 3, 2, 2))  # one image: 4 values per channel are enough
    assert layer.initialized


# --- BatchNormFlow --------------------------------------------------------------------------

def trained_batchnorm(shape, steps=3, momentum=0.3):
    """A layer whose running statistics and parameters are not the trivial ones."""
    layer = BatchNormFlow(shape[1], momentum=momentum)
    with torch.no_grad():
        layer.log_gamma.copy_(randn(shape[1], seed=11, scale=0.5))
        layer.beta.copy_(randn(shape[1], seed=12))
    for step in range(steps):
        layer(randn(*(6,) + tuple(shape[1:]), seed=20 + step, scale=2.0, offset=1.0))
    return layer


@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_batchnorm_flow_eval_contract(shape):
    layer = trained_batchnorm(shape).eval()
    assert not torch.equal(layer.running_var, torch.ones(shape[1]))
    check_round_trip(layer, randn(*shape, seed=5))
    check_running_logdet(layer, randn(*shape, seed=6))
    check_logdet_jacobian(layer, randn(*shape, seed=7, dtype=torch.float64))
    check_gradcheck(layer, randn(*shape, seed=8, dtype=torch.float64))
    check_batch_sizes(layer.float(), shape[1:])  # eval mode: any batch size, 0 and 1 included


@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_batchnorm_flow_training_logdet_is_the_per_row_map_with_batch_statistics(shape):
    layer = trained_batchnorm(shape).double().train()
    x = randn(*shape, seed=3, dtype=torch.float64, scale=2.0)
    y, ld = layer(x)
    mean, var = batch_stats_ref(x)
    for i in range(shape[0]):
        def row_map(v):
            out, _ = batchnorm_flow_ref(v.reshape(x[i:i + 1].shape), mean, var, layer.log_gamma, layer.beta,
                                        eps=layer.eps)
            return out.reshape(-1)

        jac = torch.func.jacrev(row_map)(x[i].reshape(-1))
        torch.testing.assert_close(ld[i], torch.linalg.slogdet(jac).logabsdet)
        torch.testing.assert_close(row_map(x[i]), y[i].reshape(-1))
    check_running_logdet(layer, x)
    check_gradcheck(layer, x)  # through the batch statistics


def test_batchnorm_flow_training_needs_two_values_per_channel():
    # The variance of a single value is 0 (every output would be beta, the map not invertible)
    # and the unbiased running estimate would divide by 0, so training mode refuses batches of
    # 0 and 1; with spatial dims a single image has enough values, as in torch.nn.BatchNorm2d.
    layer = BatchNormFlow(3)
    for bad in (torch.zeros(1, 3), torch.zeros(0, 3), torch.zeros(0, 3, 2, 2), torch.zeros(1, 3, 1, 1)):
        with pytest.raises(ValueError, match="training mode needs at least 2 values per channel.*eval mode"):
            layer(bad)
    assert torch.equal(layer.running_var, torch.ones(3))  # a refused batch changes nothing
    y, ld = layer(randn(1, 3, 2, 2))
    assert y.shape == (1, 3, 2, 2) and ld.shape == (1,)
    layer.eval()
    for b in (0, 1):
        assert layer(torch.zeros(b, 3))[0].shape == (b, 3)


@pytest.mark.parametrize("shape,torch_bn", [((8, 4), nn.BatchNorm1d), ((8, 4, 5), nn.BatchNorm1d),
                                            ((4, 4, 3, 2), nn.BatchNorm2d)], ids=["1d", "1d-seq", "2d"])
def test_batchnorm_flow_matches_torch_batchnorm(shape, torch_bn):
    momentum, eps = 0.3, 1e-4
    ref = torch_bn(shape[1], momentum=momentum, eps=eps)
    layer = BatchNormFlow(shape[1], momentum=momentum, eps=eps)
    with torch.no_grad():
        layer.log_gamma.copy_(randn(shape[1], seed=1, scale=0.5))
        layer.beta.copy_(randn(shape[1], seed=2))
        ref.weight.copy_(layer.log_gamma.exp())
        ref.bias.copy_(layer.beta)
    for step in range(4):
        x = randn(*shape, seed=10 + step, scale=1.0 + step, offset=step - 1.5)
        check_batchnorm_against_torch(f"training step {step}", layer, x, layer(x)[0])  # was rtol 1e-4 / atol 1e-5
        ref(x)  # torch's running-statistics update, to compare with the layer's
        torch.testing.assert_close(layer.running_mean, ref.running_mean)
        torch.testing.assert_close(layer.running_var, ref.running_var)
    layer.eval(), ref.eval()
    x = randn(*shape, seed=30, scale=2.0)
    y, ld = layer(x)
    check_batchnorm_against_torch("eval", layer, x, y)  # the running statistics (was rtol 1e-4 / atol 1e-5)
    spatial = math.prod(shape[2:])
    expected_ld = spatial * (layer.log_gamma - 0.5 * torch.log(ref.running_var + eps)).sum()
    torch.testing.assert_close(ld, expected_ld.detach().expand(shape[0]))


def test_batchnorm_flow_inverse_uses_running_statistics_in_both_modes():
    layer = trained_batchnorm((5, 3))
    z = randn(5, 3, seed=4)
    x_train, ld_train = layer.inverse(z)
    running = layer.running_var.clone()
    layer.eval()
    x_eval, ld_eval = layer.inverse(z)
    assert torch.equal(x_train, x_eval) and torch.equal(ld_train, ld_eval)
    assert torch.equal(layer.running_var, running)  # inverse never updates the running statistics
    # in training mode, forward normalises with the batch statistics: not the inverse's map
    layer.train()
    x = randn(5, 3, seed=5, scale=3.0)
    x2, _ = layer.inverse(layer(x)[0])
    assert not torch.allclose(x2, x, atol=1e-3)


def test_flow_of_norm_layers():
    flow = Flow([ActNorm(4), BatchNormFlow(4), ActNorm(4)])
    x = randn(16, 4, seed=1, scale=3.0, offset=2.0)
    lp = flow.log_prob(x)
    assert lp.shape == (16,) and torch.isfinite(lp).all()
    flow.eval()
    check_round_trip(flow, x)  # every layer's rounding pulled back (was rtol / atol 1e-4)
    assert flow.sample(3).shape == (3, 4)


# --- both layers --------------------------------------------------------------------------------

@pytest.mark.parametrize("make", [ActNorm, BatchNormFlow])
@pytest.mark.parametrize("call,error,match", [
    (lambda l: l(torch.randn(3, 5)), ValueError, r"x must have shape \(batch, 4\) or \(batch, 4, \*spatial\)"),
    (lambda l: l(torch.randn(3, 2, 4, 4)), ValueError, r"x must have shape \(batch, 4\)"),
    (lambda l: l(torch.randn(4)), ValueError, "x must have a batch dimension"),
    (lambda l: l(torch.zeros(3, 4, dtype=torch.long)), TypeError, "x must be a floating-point"),
    (lambda l: l.inverse(torch.randn(3, 3)), ValueError, r"z must have shape \(batch, 4\)"),
    (lambda l: l.inverse(torch.ones(3, 4, dtype=torch.int32)), TypeError, "z must be a floating-point"),
    (lambda l: l(torch.randn(3, 4, dtype=torch.float64)), TypeError, r"x must have the dtype of the layer's"),
    (lambda l: l.inverse(torch.randn(3, 4, dtype=torch.float16)), TypeError, "z must have the dtype of the layer"),
    (lambda l: l(torch.randn(3, 4, device="meta")), ValueError, "x is on meta but the layer is on cpu"),
    (lambda l: l(torch.randn(3, 4), logdet=torch.zeros(2)), ValueError, "logdet must have shape"),
    (lambda l: l.inverse(torch.randn(3, 4), logdet=torch.zeros(3, 1)), ValueError, "logdet must have shape"),
])
def test_layer_bad_input(make, call, error, match):
    layer = make(4)
    state = {k: v.clone() for k, v in layer.state_dict().items()}
    with pytest.raises(error, match=match):
        call(layer)
    # refused before touching the initialisation or the running statistics
    assert all(torch.equal(v, layer.state_dict()[k]) for k, v in state.items())


@pytest.mark.parametrize("make,error,match", [
    (lambda: ActNorm(0), ValueError, "features_or_channels must be a positive int"),
    (lambda: ActNorm(2.0), ValueError, "features_or_channels must be a positive int"),
    (lambda: ActNorm(3, eps=0), ValueError, "eps must be a positive"),
    (lambda: BatchNormFlow(-1), ValueError, "features_or_channels must be a positive int"),
    (lambda: BatchNormFlow(3, momentum=1.5), ValueError, r"momentum must be a number in \[0, 1\]"),
    (lambda: BatchNormFlow(3, momentum=None), ValueError, "momentum must be"),
    (lambda: BatchNormFlow(3, eps=-1e-5), ValueError, "eps must be a positive"),
])
def test_bad_construction(make, error, match):
    with pytest.raises(error, match=match):
        make()


def test_features_repr_and_context_is_ignored():
    a, b = ActNorm(5), BatchNormFlow(5, momentum=0.05)
    assert a.features == b.features == 5
    assert repr(a) == "ActNorm(5, eps=1e-06)"
    assert repr(b) == "BatchNormFlow(5, momentum=0.05, eps=1e-05)"
    assert set(dict(b.named_buffers())) == {"running_mean", "running_var"}
    x = randn(4, 5)
    for layer in (a, b):
        y, ld = layer(x, torch.randn(4, 7))
        layer.eval()
        torch.testing.assert_close(layer(x, torch.randn(4, 2))[0], layer(x)[0])
        torch.testing.assert_close(layer.inverse(y, torch.randn(4, 2))[0], layer.inverse(y)[0])


def test_compile_fullgraph_training_and_eval():
    """No graph break: ActNorm reads a cached flag (not its buffer) once initialised, and
    BatchNormFlow's running-statistics update traces."""
    flow = Flow([ActNorm(4), BatchNormFlow(4)])
    x = randn(8, 4, seed=1, scale=2.0)
    flow.log_prob(x)  # the eager first batch initialises ActNorm
    compiled = torch.compile(flow.log_prob, fullgraph=True, dynamic=False)
    bn = flow.layers[1]
    before = bn.running_mean.clone()
    got = compiled(x)
    assert not torch.equal(bn.running_mean, before)  # the compiled graph updated the running stats
    # The compiled log-prob vs the float64 flow, conditioned, plus its sums' rounding
    # (tolerances.flow_logprob_rounding); was eager float32 within rtol / atol 1e-5.
    fn, params = layer_fn(flow, lambda m, v: (m.log_prob(v),))
    check_against("compiled log_prob", fn, (x, *params), (got,), torch.float32,
                  extra=(flow_logprob_rounding(flow, x, EPS[torch.float32]),))
