"""The fused per-channel kernels (ActNorm, the batch-norm flow, batch statistics; compiled CPU/CUDA
and Triton) against the float64 reference, and the layers built on them."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import flowkern
from flowkern.nn.norm import ActNorm, BatchNormFlow
from flowkern.ops import actnorm, batch_stats, batchnorm_flow, batchnorm_flow_train
from flowkern.reference import actnorm_ref, batch_stats_ref, batchnorm_flow_ref
from flowkern.reference.batchnorm_flow import batchnorm_flow_train_ref

from conftest import kernel_backends
import tolerances as T

EPS = 1e-3
# (B, C, *spatial): features (rows folded together on the CPU), a tiny image (S = 15 < one
# vector: the row layout), planes with a ragged tail (S = 37), one value, MNIST-wide features.
SHAPES = [(5, 7), (3, 4, 3, 5), (2, 3, 37), (1, 1), (3, 784)]
SHAPE_IDS = ["5x7", "3x4x3x5", "2x3x37", "1x1", "3x784"]
OPS = ("actnorm", "batchnorm")


def needs_cpu_build():
    if "cpu" not in flowkern.available_backends():
        pytest.skip("compiled CPU backend not built")


def make(shape, op, seed=0, device="cpu", x_scale=2.0, x_offset=0.5):
    """float64 x and the op's (C,) parameters."""
    g = torch.Generator().manual_seed(seed)

    def randn(*s, scale=1.0):
        return (torch.randn(s, generator=g, dtype=torch.float64) * scale).to(device)

    c = shape[1]
    x = randn(*shape, scale=x_scale) + x_offset
    if op == "actnorm":
        params = (randn(c), randn(c, scale=0.5))
    elif op == "batchnorm":
        params = (randn(c), randn(c).abs() + 0.2, randn(c, scale=0.5), randn(c))
    else:  # training mode: log_gamma, beta
        params = (randn(c, scale=0.5), randn(c))
    return x, params


def call(op, kernel, x, params, logdet, inverse=False):
    """(out, logdet) of `op` through the public op (kernel) or the reference composite."""
    if op == "actnorm":
        return (actnorm if kernel else actnorm_ref)(x, *params, inverse=inverse, logdet=logdet)
    if op == "batchnorm":
        return (batchnorm_flow if kernel else batchnorm_flow_ref)(x, *params, eps=EPS, inverse=inverse, logdet=logdet)
    return (batchnorm_flow_train if kernel else batchnorm_flow_train_ref)(x, *params, eps=EPS, logdet=logdet)[:2]


def run(op, kernel, x, params, ld_in, w_out, w_ld, dtype, inverse=False):
    """Outputs and the gradients of <w_out, out> + <w_ld, logdet> to x, every parameter and ld_in."""
    leaves = [t.detach().to(dtype).requires_grad_() for t in (x, *params)]
    ld = ld_in.detach().to(torch.float64 if dtype == torch.float64 else torch.float32).requires_grad_()
    out, ld_out = call(op, kernel, leaves[0], leaves[1:], ld, inverse)
    loss = (out.double() * w_out).sum() + (ld_out.double() * w_ld).sum()
    return (out, ld_out, *torch.autograd.grad(loss, leaves + [ld]))


PARAM_NAMES = {"actnorm": ("shift", "log_scale"), "batchnorm": ("mean", "var", "log_gamma", "beta"),
               "train": ("log_gamma", "beta")}
OP_NAMES = {"actnorm": "actnorm", "batchnorm": "batchnorm_flow", "train": "batchnorm_flow_train"}


def compare(backend, device, op, shape, inverse=False, dtype=torch.float32, seed=0, **make_kw):
    """The op on `backend` vs the float64 reference: outputs and the gradients of x, every
    parameter and the running log-det within the conditioned bound (tolerances.check_agree:
    2x the reference's own error in dtype, 8-ulp input perturbations, the per-channel kernels'
    by-design errors of tolerances.channel_extra); no hand-set atol."""
    x, params = make(shape, op, seed=seed, device=device, **make_kw)
    g = torch.Generator().manual_seed(seed + 100)
    ld_in = torch.randn(shape[0], generator=g, dtype=torch.float64).to(device)
    w_out = torch.randn(shape, generator=g, dtype=torch.float64).to(device)
    w_ld = torch.randn(shape[0], generator=g, dtype=torch.float64).to(device)
    with flowkern.backend(backend):
        got = run(op, True, x, params, ld_in, w_out, w_ld, dtype, inverse)
    assert got[0].dtype == dtype and got[0].shape == x.shape
    assert got[1].dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert got[1].shape == (shape[0],)
    kw = dict(eps=EPS) if op != "actnorm" else {}
    if op != "train":
        kw["inverse"] = inverse
    T.check_agree(OP_NAMES[op], dict(x=x, logdet=ld_in, **dict(zip(PARAM_NAMES[op], params))), kw,
                  backend=backend, device=device, dtype=dtype, seed=seed)
    return got


# ---- every backend against the float64 reference ------------------------------------------------

@pytest.mark.parametrize("backend,device", kernel_backends())
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("inverse", [False, True], ids=["fwd", "inv"])
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_matches_reference(backend, device, op, inverse, shape):
    compare(backend, device, op, shape, inverse)


@pytest.mark.parametrize("backend,device", kernel_backends())
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_training_mode_matches_reference_composite(backend, device, shape):
    """batchnorm_flow_train == batchnorm_flow_train_ref, batchnorm_flow_ref(x, *batch_stats_ref(x), ...),
    gradients through the statistics included; its statistics are the batch's (biased variance)."""
    if shape[0] * (shape[2] if len(shape) > 2 else 1) < 2:
        shape = (2,) + shape[1:]  # a variance needs two values
    compare(backend, device, "train", shape)
    x, (log_gamma, beta) = make(shape, "train", device=device)
    x = x.float()
    with flowkern.backend(backend):
        _, _, mean, var = batchnorm_flow_train(x, log_gamma.float(), beta.float(), eps=EPS)
    assert not (mean.requires_grad or var.requires_grad)
    check_stats(mean, var, x)


@pytest.mark.parametrize("backend,device", kernel_backends())
@pytest.mark.parametrize("shape", [(6, 5), (4, 3, 2, 2), (3, 2, 40)], ids=["6x5", "4x3x2x2", "3x2x40"])
def test_batch_stats_matches_reference(backend, device, shape):
    # A mean far from 0 next to a small spread: one-pass formulas lose the variance here.
    x = (make(shape, "actnorm", device=device, x_scale=0.01, x_offset=300.0)[0]).float()
    with flowkern.backend(backend), torch.no_grad():
        mean, var = batch_stats(x)
    assert mean.dtype == var.dtype == torch.float32 and mean.shape == var.shape == (shape[1],)
    check_stats(mean, var, x)
    T.check_agree("batch_stats", dict(x=x), backend=backend, device=device)


def check_stats(mean, var, x):
    """Batch mean and (biased) variance within the conditioned bound, plus the sums' rounding
    that sign patterns of perturbations can cancel (tolerances.stats_extra: eps mean |x| for the
    mean, 2 eps mean |x (x - mean)| for the variance)."""
    case = T.make_case("batch_stats", dict(x=x))
    extra = T.stats_extra(case, T.EPS[torch.float32], None)
    T.check_against("batch stats", batch_stats_ref, (x.cpu(),), (mean, var), torch.float32,
                    extra=(extra["out:0"], extra["out:1"]), names=("mean", "var"))


def test_large_batches_on_cpu():
    """MNIST-sized features and batches that span several reduction chunks in each CPU layout
    (rows, planes, narrow rows folded together), held to the same rule."""
    needs_cpu_build()
    for shape in [(256, 784), (96, 4, 14, 14), (20000, 3)]:
        for op, inverse in [("actnorm", False), ("actnorm", True), ("batchnorm", False), ("batchnorm", True),
                            ("train", False)]:
            compare("cpu", "cpu", op, shape, inverse)


# ---- float64, half types, gradcheck ---------------------------------------------------------------

@pytest.mark.parametrize("op", OPS + ("train",))
@pytest.mark.parametrize("shape", [(4, 3), (3, 2, 2, 9)], ids=["4x3", "3x2x2x9"])
def test_float64_on_cpu(op, shape):
    needs_cpu_build()
    for inverse in ((False, True) if op != "train" else (False,)):
        compare("cpu", "cpu", op, shape, inverse, dtype=torch.float64)


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("inverse", [False, True], ids=["fwd", "inv"])
def test_gradcheck_float64(op, inverse):
    needs_cpu_build()
    x, params = make((3, 2, 5), op)
    ld = torch.randn(3, dtype=torch.float64)
    inputs = tuple(t.clone().requires_grad_() for t in (x, *params, ld))
    with flowkern.backend("cpu"):
        assert torch.autograd.gradcheck(lambda v, *p: call(op, True, v, p[:-1], p[-1], inverse), inputs)


def test_gradcheck_float64_training_mode():
    needs_cpu_build()
    for shape in [(5, 3), (2, 2, 3, 3)]:
        x, params = make(shape, "train")
        ld = torch.randn(shape[0], dtype=torch.float64)
        inputs = tuple(t.clone().requires_grad_() for t in (x, *params, ld))
        with flowkern.backend("cpu"):
            assert torch.autograd.gradcheck(lambda v, g, b, l: batchnorm_flow_train(v, g, b, eps=EPS, logdet=l)[:2],
                                            inputs)


@pytest.mark.parametrize("backend,device", kernel_backends())
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("op", OPS + ("train",))
def test_half_types_compute_in_float32(backend, device, dtype, op):
    """fp16/bf16 in, fp16/bf16 out (float32 log-det); the arithmetic in float32, rounded once."""
    if backend == "triton" and device == "cpu":
        pytest.skip("the Triton interpreter's half types are not the GPU's")
    for inverse in ((False, True) if op != "train" else (False,)):
        got = compare(backend, device, op, (6, 3, 2, 3), inverse, dtype=dtype, x_scale=1.0)
        assert got[1].dtype == torch.float32


# ---- batch sizes, running log-det, layouts --------------------------------------------------------

@pytest.mark.parametrize("backend,device", kernel_backends())
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("batch", [0, 1, 7])
@pytest.mark.parametrize("event", [(3,), (2, 4, 5)], ids=["C", "CxHxW"])
def test_batch_sizes(backend, device, op, batch, event):
    x, params = make((batch,) + event, op, device=device)
    x, params = x.float().requires_grad_(), [p.float().requires_grad_() for p in params]
    with flowkern.backend(backend):
        y, ld = call(op, True, x, params, None)
        (y.sum() + ld.sum()).backward()
        x2, ld2 = call(op, True, y.detach(), params, None, inverse=True)
    assert y.shape == x.shape and ld.shape == (batch,) and x.grad.shape == x.shape
    assert x2.shape == x.shape and ld2.shape == (batch,)
    # Values within the conditioned bound; the round trip within the intermediate's rounding
    # pulled back by 1 / m (tolerances.actnorm_roundtrip_tol, batchnorm_roundtrip_tol), the
    # log-dets cancelling within their sums' rounding.
    kw = dict(eps=EPS) if op != "actnorm" else {}
    tensors = dict(x=x, **dict(zip(PARAM_NAMES[op], params)))
    for inverse in (False, True):
        T.check_agree(OP_NAMES[op], tensors, dict(kw, inverse=inverse), backend=backend, device=device)
        T.check_op_roundtrip(OP_NAMES[op], tensors, dict(kw, inverse=inverse), backend=backend, device=device)
    if batch == 0:  # nothing to sum: zero parameter gradients, not NaN
        assert all(torch.equal(p.grad, torch.zeros_like(p)) for p in params)


@pytest.mark.parametrize("backend,device", kernel_backends())
@pytest.mark.parametrize("op", OPS)
def test_empty_spatial_dims(backend, device, op):
    """x (B, C, 0): nothing to transform, a log-det of 0 (plus the running one), zero gradients."""
    x, params = make((3, 2, 0), op, device=device)
    x, params = x.float().requires_grad_(), [p.float().requires_grad_() for p in params]
    l0 = torch.randn(3, device=device)
    with flowkern.backend(backend):
        y, ld = call(op, True, x, params, l0)
        (y.sum() + ld.sum()).backward()
    assert y.shape == (3, 2, 0)
    torch.testing.assert_close(ld, l0)
    assert all(torch.equal(p.grad, torch.zeros_like(p)) for p in params)


@pytest.mark.parametrize("backend,device", kernel_backends())
def test_training_mode_batch_sizes(backend, device):
    with flowkern.backend(backend):
        for shape in [(1, 3, 2, 2), (2, 3), (7, 5)]:
            x, (lg, b) = make(shape, "train", device=device)
            y, ld, mean, var = batchnorm_flow_train(x.float(), lg.float(), b.float())
            assert y.shape == shape and ld.shape == (shape[0],) and mean.shape == var.shape == (shape[1],)
        with pytest.raises(ValueError, match="at least one value per channel"):
            batchnorm_flow_train(torch.zeros(0, 3, device=device), lg.float()[:3], b.float()[:3])


@pytest.mark.parametrize("backend,device", kernel_backends())
@pytest.mark.parametrize("op", OPS)
def test_running_logdet_and_non_contiguous_inputs(backend, device, op):
    big = make((6, 4, 3), op, device=device)[0].float()
    x = big[::2].transpose(1, 2)  # (3, 3, 4): non-contiguous
    params = [p.float() for p in make((3, 3), op, device=device)[1]]
    params[0] = torch.stack([params[0], params[0]], 1)[:, 0]  # a strided (C,) parameter
    l0 = torch.randn(6, device=device)[::2]
    assert not (x.is_contiguous() or params[0].is_contiguous() or l0.is_contiguous())
    with flowkern.backend(backend):
        y, ld = call(op, True, x, params, l0)
        _, ld_none = call(op, True, x, params, None)
    y_ref, ld_ref = call(op, False, x, params, l0)
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(ld, ld_ref)
    torch.testing.assert_close(ld, ld_none + l0)


def test_float64_running_logdet_keeps_its_precision():
    needs_cpu_build()
    x, params = make((2, 3), "actnorm")
    l0 = torch.tensor([1e10, -1e10], dtype=torch.float64)
    with flowkern.backend("cpu"):
        _, ld = actnorm(x, *params, logdet=l0)
    assert ld.dtype == torch.float64
    # l0 + sum(log_scale) rounds to float64's eps (|l0| + sum |log_scale|), a few times over
    # (1.1e-6 for l0 = 1e10; a float32 accumulator would be off by ~600): was atol 1e-5.
    bound = 4 * T.EPS[torch.float64] * (l0.abs() + params[1].abs().sum())
    assert ((ld - l0 - params[1].sum()).abs() <= bound).all()


# ---- determinism ------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend,device", kernel_backends())
@pytest.mark.parametrize("shape", [(700, 90), (300, 2, 8, 8), (30000, 3)], ids=["rows", "planes", "narrow"])
def test_backward_is_deterministic(backend, device, shape):
    """Two backward runs are bit-identical (chunked partial sums in a fixed order, no atomics),
    also with a different number of threads on the CPU."""
    if backend == "triton" and device == "cpu":
        shape = (70, 5, 3)  # the interpreter is slow; still several chunks
    results = []
    for threads in (None, 1, None):
        previous = torch.get_num_threads()
        if threads:
            torch.set_num_threads(threads)
        try:
            with flowkern.backend(backend):
                grads = []
                for op in ("actnorm", "batchnorm", "train"):
                    x, params = make(shape, op, device=device)
                    x, params = x.float().requires_grad_(), [p.float().requires_grad_() for p in params]
                    ld0 = torch.zeros(shape[0], device=device, requires_grad=True)
                    y, ld = call(op, True, x, params, ld0)
                    w = torch.linspace(-1, 1, y.numel(), device=device).reshape(y.shape)
                    grads += torch.autograd.grad((y * w).sum() + ld.sum(), [x, *params])
                with torch.no_grad():
                    grads += batch_stats(x.detach())
        finally:
            torch.set_num_threads(previous)
        results.append(grads)
    for other in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(results[0], other))


# ---- the layers -------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend,device", kernel_backends())
@pytest.mark.parametrize("shape,torch_bn", [((16, 5), nn.BatchNorm1d), ((6, 4, 3, 5), nn.BatchNorm2d)],
                         ids=["1d", "2d"])
def test_batchnorm_layer_running_statistics_match_torch(backend, device, shape, torch_bn):
    momentum, eps = 0.2, 1e-4
    ref = torch_bn(shape[1], momentum=momentum, eps=eps).to(device)
    layer = BatchNormFlow(shape[1], momentum=momentum, eps=eps).to(device)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        layer.log_gamma.copy_(torch.randn(shape[1], generator=g) * 0.5)
        layer.beta.copy_(torch.randn(shape[1], generator=g))
        ref.weight.copy_(layer.log_gamma.exp())
        ref.bias.copy_(layer.beta)
    with flowkern.backend(backend):
        for step in range(4):
            x = (torch.randn(shape, generator=g) * (1 + step) + step - 1.5).to(device)
            y, _ = layer(x)
            T.check_batchnorm_against_torch(f"training step {step}", layer, x, y)  # was rtol / atol 1e-4
            ref(x)  # torch's running-statistics update, to compare with the layer's
            torch.testing.assert_close(layer.running_mean, ref.running_mean)
            torch.testing.assert_close(layer.running_var, ref.running_var)
        # eval mode: the running statistics, and inverse is its exact inverse
        layer.eval(), ref.eval()
        x = (torch.randn(shape, generator=g) * 2).to(device)
        y, ld = layer(x)
        T.check_batchnorm_against_torch("eval", layer, x, y)  # was rtol / atol 1e-4
        # the running statistics' exact inverse, within the rounding pulled back (was 1e-5)
        T.check_flow_roundtrip(layer, x)


@pytest.mark.parametrize("backend,device", kernel_backends())
def test_batchnorm_layer_training_gradients_match_reference(backend, device):
    shape = (6, 3, 2, 2)
    x = make(shape, "train", device=device)[0].float()
    layer = BatchNormFlow(3).to(device)
    with torch.no_grad():
        layer.log_gamma.copy_(torch.tensor([0.1, -0.3, 0.5]))

    def step(m, v):
        v = v.detach().requires_grad_()
        with torch.enable_grad():
            y, ld = m(v)
            grads = torch.autograd.grad(y.pow(2).sum() + ld.sum(), [v, *m.parameters()])
        return (*grads, m.running_var.clone())

    fn, params = T.layer_fn(copy.deepcopy(layer).cpu(), step)
    with flowkern.backend(backend):
        got = step(layer, x)
    # vs the float64 layer, conditioned (was the float32 reference backend within rtol 1e-4 / atol 1e-5).
    # d/dbeta = 2 sum y over the batch cancels to 0 for beta = 0 (y's batch mean is beta): plus
    # that sum's rounding (tolerances.sum_rounding) and y's errors no perturbation shows
    # (tolerances.batchnorm_train_error), summed.
    err, y0 = T.batchnorm_train_error(layer, x)
    dims = (0, 2, 3)
    beta = layer.beta.detach().double().cpu().view(1, -1, 1, 1)
    y64 = (y0 + beta).transpose(0, 1).reshape(3, -1)
    extra = (0.0, 0.0, 2 * (T.sum_rounding(y64, T.EPS[torch.float32]) + err.sum(dims)), 0.0)
    T.check_against("training gradients", fn, (x.cpu(), *params), got, torch.float32, normwise=True,
                    names=("x", "log_gamma", "beta", "running_var"), extra=extra)


@pytest.mark.parametrize("backend,device", kernel_backends())
def test_actnorm_layer_initialisation_uses_the_statistics_kernel(backend, device):
    x = make((32, 4, 3, 3), "actnorm", device=device, x_scale=3.0, x_offset=-2.0)[0].float()
    with flowkern.backend(backend):
        layer = ActNorm(4).to(device)
        y, _ = layer(x)
    # shift = -mean, log_scale = -log(sqrt(var) + eps) of the batch vs float64 statistics, y's
    # channel means and stds within their rounding (tolerances.check_actnorm_init; was atol 1e-5)
    T.check_actnorm_init(layer, x, y)


def test_compile_fullgraph_forward_and_backward_match_eager():
    needs_cpu_build()
    torch._dynamo.reset()
    flow = flowkern.Flow([ActNorm(4), BatchNormFlow(4), ActNorm(4)])
    x = make((9, 4, 2, 3), "actnorm", x_scale=2.0)[0].float()

    def loss_of(v):
        z, ld = flow(v)
        return (z.square().sum((1, 2, 3)) - ld).mean()

    def step(fn, v):  # the compiled forward's backward is AOTAutograd's compiled graph
        loss = fn(v)
        loss.backward()
        return loss

    with flowkern.backend("cpu"):
        flow(x)  # the eager first batch initialises the ActNorms
        snapshot = {k: v.clone() for k, v in flow.state_dict().items()}
        initialised = copy.deepcopy(flow)
        eager = step(loss_of, x)
        eager_state = {k: v.clone() for k, v in flow.state_dict().items()}
        flow.zero_grad()
        with torch.no_grad():  # in place: load_state_dict would make ActNorm re-read its buffer
            for k, v in flow.state_dict().items():
                v.copy_(snapshot[k])
        compiled = step(torch.compile(loss_of, fullgraph=True, dynamic=False), x)
    # The compiled loss, gradients and running statistics (updated in the graph) vs the float64
    # flow, conditioned (were eager float32 within rtol / atol 1e-5, 1e-6 for the statistics);
    # the loss plus its sum's rounding (tolerances.sum_rounding of z^2 and the log-dets), the
    # running statistics plus momentum times the batch statistics' (tolerances.stats_extra of
    # the batch norm's input).
    bn = flow.layers[1]

    def loss_grads_stats(m, v):
        v = v.detach()
        with torch.enable_grad():
            z, ld = m(v)
            loss = (z.square().sum((1, 2, 3)) - ld).mean()
            grads = torch.autograd.grad(loss, list(m.parameters()))
        return (loss, *grads, m.layers[1].running_mean.clone(), m.layers[1].running_var.clone())

    fn, params = T.layer_fn(initialised, loss_grads_stats, "cpu")
    eps = T.EPS[torch.float32]
    with torch.no_grad(), flowkern.backend("reference"):
        f64 = copy.deepcopy(initialised).double()
        h = f64.layers[0](x.double())[0]  # the batch norm's input
        z, ld = f64(x.double())
    n = h.numel() // h.shape[1]
    stats = T.stats_extra(T.make_case("batch_stats", dict(x=h)), eps, None)
    terms = torch.cat([z.square().flatten(1), ld[:, None]], 1).reshape(1, -1)
    extra = ((T.sum_rounding(terms, eps) / x.shape[0])[0],) + (0.0,) * len(params) + (
        bn.momentum * stats["out:0"], bn.momentum * n / (n - 1) * stats["out:1"])
    got = (compiled, *[p.grad for p in flow.parameters()], bn.running_mean, bn.running_var)
    T.check_against("compiled", fn, (x, *params), got, torch.float32, extra=extra, normwise=True)
    for k, v in flow.state_dict().items():  # the rest of the state: untouched by either
        if "running" not in k:
            assert torch.equal(v, eager_state[k]), k


# ---- torch.func ---------------------------------------------------------------------------------

@pytest.mark.parametrize("backend,device", kernel_backends())
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("inverse", [False, True], ids=["fwd", "inv"])
def test_logdet_equals_log_abs_det_jacobian(backend, device, op, inverse):
    x, params = make((1, 2, 3), op, device=device)
    x, params = x.float(), [p.float() for p in params]
    with flowkern.backend(backend):
        jac = torch.func.jacrev(lambda v: call(op, True, v, params, None, inverse)[0])(x)
        _, ld = call(op, True, x, params, None, inverse)
    jac = jac.reshape(6, 6).double().cpu()
    # J is diagonal, m_c per channel in float32: each within a few ulps of the exact factor (its
    # log-scale rounds to eps |log m|); the log-det sums the log m's in float32: both within
    # 16 eps sum (1 + |log m|) of the exact log-det, of each other within twice that (was 1e-5).
    log_m = torch.diagonal(jac).abs().log()
    bound = 32 * T.EPS[torch.float32] * (1 + log_m.abs()).sum()
    err = (ld.double().cpu()[0] - torch.linalg.slogdet(jac).logabsdet).abs()
    assert err <= bound, f"log-det vs log|det J|: {err:.3g} > {bound:.3g}"


@pytest.mark.parametrize("backend,device", kernel_backends())
@pytest.mark.parametrize("op", OPS)
def test_vmap_and_per_sample_gradients(backend, device, op):
    """vmap over x folds into the rows; per-sample parameter gradients (vmap of grad) equal a loop."""
    xs, params = make((3, 4, 2, 3), op, device=device)
    xs, params = xs.float(), [p.float() for p in params]

    def loss(p, v):
        out, ld = call(op, True, v.unsqueeze(0), p, None)
        return (out * out).sum() + ld.sum()

    with flowkern.backend(backend):
        out, ld = torch.func.vmap(lambda v: call(op, True, v, params, None))(xs.unsqueeze(1))
        per_sample = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0))(params, xs)
        for i in range(3):
            o_i, ld_i = call(op, True, xs[i:i + 1], params, None)
            torch.testing.assert_close(out[i], o_i)
            torch.testing.assert_close(ld[i], ld_i)
            # each sample's gradient vs the float64 reference's, conditioned (was rtol / atol 1e-5)
            def ref_grad(v, *p):
                with flowkern.backend("reference"):
                    return torch.func.grad(loss)(list(p), v)

            check_against = T.check_against
            check_against(f"per-sample {i}", ref_grad, (xs[i].cpu(), *[q.cpu() for q in params]),
                          tuple(g[i] for g in per_sample), torch.float32, normwise=True)


@pytest.mark.parametrize("backend,device", kernel_backends())
def test_backward_saves_the_output_not_the_input(backend, device):
    x, params = make((4, 3, 5), "batchnorm", device=device)
    x, params = x.float().requires_grad_(), [p.float().requires_grad_() for p in params]
    saved = []
    with flowkern.backend(backend), torch.autograd.graph.saved_tensors_hooks(
            lambda t: saved.append(t) or t, lambda t: t):
        y, _ = batchnorm_flow(x, *params, eps=EPS)
    assert any(t is y or (t.shape == y.shape and torch.equal(t, y)) for t in saved)
    assert sum(t.numel() for t in saved) == x.numel() + 4 * 3  # out and the four (C,) parameters


@pytest.mark.parametrize("backend,device", kernel_backends())
def test_inference_runs_without_an_autograd_node(backend, device):
    x, params = make((4, 3), "actnorm", device=device)
    params = [p.float().requires_grad_() for p in params]
    with flowkern.backend(backend), torch.no_grad():
        y, ld = actnorm(x.float(), *params)
    assert y.grad_fn is None and ld.grad_fn is None


def test_auto_uses_the_compiled_kernels():
    needs_cpu_build()
    x, params = make((4, 3), "batchnorm")
    x, params = x.float().requires_grad_(), [p.float() for p in params]
    with flowkern.backend("auto"):
        y, _ = batchnorm_flow(x, *params)
        y_train, _, _, _ = batchnorm_flow_train(x, *params[2:])
        ya, _ = actnorm(x, *params[:2])
    assert type(y.grad_fn).__name__.startswith("BatchNormFlowFunctionBackward")
    assert type(y_train.grad_fn).__name__.startswith("BatchNormFlowTrainFunctionBackward")
    assert type(ya.grad_fn).__name__.startswith("ActNormFunctionBackward")


@pytest.mark.triton
def test_triton_refuses_float64():
    if "triton" not in flowkern.available_backends():
        pytest.skip("triton not available")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    x, params = make((2, 3), "actnorm", device=device)
    with flowkern.backend("triton"), pytest.raises(TypeError, match="compute in float32"):
        actnorm(x, *params)


def test_kernel_ops_check_their_arguments():
    needs_cpu_build()
    x = torch.zeros(2, 3)
    with pytest.raises(RuntimeError, match="parameters must have shape"):
        torch.ops.flowkern.actnorm_fwd(x, torch.zeros(4), torch.zeros(3), False, None)
    with pytest.raises(RuntimeError, match="dtype"):
        torch.ops.flowkern.actnorm_fwd(x, torch.zeros(3, dtype=torch.float64), torch.zeros(3), False, None)
    with pytest.raises(RuntimeError, match="float32 or float64"):
        torch.ops.flowkern.batch_stats(x.half())
    with pytest.raises(RuntimeError, match="at least one value per channel"):
        torch.ops.flowkern.batch_stats(torch.zeros(0, 3))
    with pytest.raises(RuntimeError, match="forward-only"):
        p = torch.ones(3)
        torch.ops.flowkern.batchnorm_flow_bwd(x, None, x, p, p, p, p, 1e-5, True, True)
