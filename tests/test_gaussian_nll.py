"""flowkern.ops.gaussian_nll: every kernel backend against the float64 reference, and its use in
StandardNormal and Flow (log_prob, bits_per_dim)."""
from __future__ import annotations

import math

import pytest
import torch

import flowkern
from flowkern.nn import DequantizeLogit, Flow, StandardNormal
from flowkern.ops import dequantize_logit, gaussian_nll
from flowkern.reference import gaussian_nll_ref

from conftest import kernel_backends
from tolerances import EPS, check_against, check_agree, sum_rounding

SHAPES = [(1, 1), (3, 3), (2, 129), (2, 784), (2, 3, 5), (5, 1, 4, 4), (4,)]


def make(shape, device="cpu", dtype=torch.float32, scale=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(shape, generator=g, dtype=torch.float64) * scale
    ld = torch.randn(shape[0], generator=g, dtype=torch.float64) * 10
    return z.to(device, dtype), ld.to(device, torch.float64 if dtype == torch.float64 else torch.float32)


def run(fn, z, ld, w, **kw):
    leaves = [z.detach().clone().requires_grad_(True), ld.detach().clone().requires_grad_(True)]
    nll = fn(leaves[0], leaves[1], **kw)
    return (nll, *torch.autograd.grad((nll.double() * w).sum(), leaves))


@pytest.mark.parametrize("backend,device", kernel_backends())
@pytest.mark.parametrize("bits", [False, True], ids=["nats", "bits"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_matches_reference(backend, device, bits, shape):
    z, ld = make(shape, device)
    w = torch.randn(shape[0], dtype=torch.float64, device=device)
    with flowkern.backend(backend):
        got = run(gaussian_nll, z, ld, w, bits_per_dim=bits)
    assert got[0].dtype == torch.float32 and got[0].shape == (shape[0],)
    # The per-row sum within the conditioned bound plus its rounding, 16 eps (D + |nll|) for
    # terms of O(1) (tolerances.check_finite_and_agree's row rule); the gradients likewise.
    check_agree("gaussian_nll", dict(z=z, logdet=ld), dict(bits_per_dim=bits), backend=backend, device=device)


def test_float64_matches_reference():
    if "cpu" not in flowkern.available_backends():
        pytest.skip("compiled CPU backend not built")
    z, ld = make((3, 101), dtype=torch.float64, scale=3.0)
    w = torch.randn(3, dtype=torch.float64)
    for bits in (False, True):
        ref = run(gaussian_nll_ref, z, ld, w, bits_per_dim=bits)
        with flowkern.backend("cpu"):
            got = run(gaussian_nll, z, ld, w, bits_per_dim=bits)
        assert got[0].dtype == torch.float64
        # Two float64 evaluations of a well-conditioned sum of 101 squares (terms <= ~50, sum
        # ~450): any order's rounding is <= eps log2(101) sum |terms| ~ 4e-13 (n eps sum ~ 5e-12
        # worst case), the gradients z and w exact to an ulp: rtol 1e-13 (4.5e-11 here) + 1e-12.
        for a, b in zip(got, ref):
            torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-12)


@pytest.mark.parametrize("backend,device", kernel_backends())
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_z_sums_in_float32(backend, device, dtype):
    if backend == "triton" and device == "cpu" and dtype == torch.bfloat16:
        pytest.skip("the Triton interpreter truncates float32 -> bfloat16 (a GPU rounds to nearest)")
    z, ld = make((4, 300), device, dtype=dtype, scale=30.0)  # z^2 up to ~1e4: overflows no float32 sum
    w = torch.randn(4, dtype=torch.float64, device=device)
    with flowkern.backend(backend):
        got = run(gaussian_nll, z, ld, w)
    assert got[0].dtype == torch.float32 and got[1].dtype == dtype
    assert torch.isfinite(got[0]).all()
    # Half z, float32 sums and log-det: the conditioned bound (tolerances.check_against: 4x the
    # half reference's own error, 8-ulp perturbations of z, ld and the weights), plus the float32
    # sum's rounding (tolerances.sum_rounding of the terms z^2 / 2).
    sums = sum_rounding(z.double().cpu() ** 2 / 2, EPS[torch.float32])
    check_against("half nll", lambda z, ld, w: run(gaussian_nll_ref, z, ld, w), (z.cpu(), ld.cpu(), w.cpu()), got,
                  dtype, in_dtypes=(None, torch.float32, torch.float64), extra=(sums, 0.0, 0.0),
                  names=("nll", "grad_z", "grad_logdet"))


@pytest.mark.parametrize("backend,device", kernel_backends())
def test_logdet_is_optional_and_the_formula(backend, device):
    z, _ = make((3, 7), device)
    with flowkern.backend(backend):
        nll = gaussian_nll(z)
        bpd = gaussian_nll(z, bits_per_dim=True)
    # The closed form, 1/2 sum z^2 + D/2 log(2 pi), in float64, within the conditioned bound plus
    # the float32 sum's rounding of its terms (tolerances.sum_rounding), instead of rtol/atol 1e-6.
    def formula(z):
        nll = 0.5 * (z ** 2).sum(1) + 3.5 * math.log(2 * math.pi)
        return nll, nll / (7 * math.log(2))

    terms = torch.cat([z.double().cpu() ** 2 / 2, torch.full((3, 1), 3.5 * math.log(2 * math.pi))], 1)
    sums = sum_rounding(terms, EPS[torch.float32])
    check_against("closed form", formula, (z.cpu(),), (nll, bpd), torch.float32,
                  extra=(sums, sums / (7 * math.log(2))), names=("nll", "bpd"))


@pytest.mark.parametrize("backend,device", kernel_backends())
@pytest.mark.parametrize("batch", [0, 1])
def test_batch_zero_and_one(backend, device, batch):
    z, ld = make((batch, 5), device)
    z.requires_grad_()
    with flowkern.backend(backend):
        nll = gaussian_nll(z, ld)
        nll.sum().backward()
    assert nll.shape == (batch,) and z.grad.shape == z.shape
    torch.testing.assert_close(nll, gaussian_nll_ref(z.detach(), ld))


@pytest.mark.parametrize("backend,device", kernel_backends())
def test_non_contiguous_inputs_and_inference(backend, device):
    big = torch.randn(6, 40, 3, device=device)
    z = big[::2, :, 1]
    ld = torch.randn(6, device=device)[::2]
    assert not (z.is_contiguous() or ld.is_contiguous())
    with flowkern.backend(backend):
        nll = gaussian_nll(z, ld)
    assert nll.grad_fn is None  # no autograd node without grad
    torch.testing.assert_close(nll, gaussian_nll_ref(z, ld))


@pytest.mark.parametrize("backend,device", kernel_backends())
def test_vmap_and_jacobian(backend, device):
    zs = torch.randn(3, 4, 5, device=device)
    lds = torch.randn(3, 4, device=device)
    with flowkern.backend(backend):
        out = torch.func.vmap(gaussian_nll)(zs, lds)
        jac = torch.func.jacrev(lambda z: gaussian_nll(z, lds[0], bits_per_dim=True))(zs[0])
        per_sample = torch.func.vmap(torch.func.grad(lambda z: gaussian_nll(z[None])[0]))(zs[0])
        for i in range(3):
            torch.testing.assert_close(out[i], gaussian_nll(zs[i], lds[i]))
    expected = torch.zeros(4, 4, 5, device=device)
    for r in range(4):
        expected[r, r] = zs[0, r] / (5 * math.log(2))
    torch.testing.assert_close(jac, expected)
    torch.testing.assert_close(per_sample, zs[0])


def test_gradcheck_float64():
    if "cpu" not in flowkern.available_backends():
        pytest.skip("compiled CPU backend not built")
    z, ld = make((3, 5), dtype=torch.float64)
    with flowkern.backend("cpu"):
        for bits in (False, True):
            assert torch.autograd.gradcheck(lambda a, b: gaussian_nll(a, b, bits_per_dim=bits),
                                            (z.requires_grad_(), ld.requires_grad_()))


@pytest.mark.triton
def test_triton_refuses_float64():
    if "triton" not in flowkern.available_backends():
        pytest.skip("triton not available")
    z = torch.zeros(2, 3, dtype=torch.float64, device="cuda" if torch.cuda.is_available() else "cpu")
    with flowkern.backend("triton"), pytest.raises(TypeError, match="compute in float32"):
        gaussian_nll(z)


@pytest.mark.parametrize("backend_name", ["reference", "auto"])
@pytest.mark.parametrize("call,error,match", [
    (lambda: gaussian_nll(torch.zeros(2, 3, dtype=torch.int64)), TypeError, "z must be a floating-point"),
    (lambda: gaussian_nll([[0.0]]), TypeError, "z must be a torch.Tensor"),
    (lambda: gaussian_nll(torch.tensor(1.0)), ValueError, "batch dimension"),
    (lambda: gaussian_nll(torch.zeros(2, 3), torch.zeros(3)), ValueError, r"logdet must have shape \(batch,\)"),
    (lambda: gaussian_nll(torch.zeros(2, 3), torch.zeros(2, dtype=torch.int32)), TypeError, "logdet"),
    (lambda: gaussian_nll(torch.zeros(2, 0), bits_per_dim=True), ValueError, "bits_per_dim needs"),
])
def test_bad_arguments(backend_name, call, error, match):
    with flowkern.backend(backend_name), pytest.raises(error, match=match):
        call()


# ---- StandardNormal and Flow ----------------------------------------------------------------------

class _Shift(flowkern.nn.FlowLayer):
    """y = x + b, log-det 0 (a layer with a parameter, for gradients through Flow.log_prob)."""

    def __init__(self, n):
        super().__init__()
        self.b = torch.nn.Parameter(torch.linspace(-1, 1, n))

    def forward(self, x, context=None, logdet=None):
        ld = torch.zeros(x.shape[0]) if logdet is None else logdet
        return x + self.b, ld + 0.25

    def inverse(self, z, context=None, logdet=None):
        ld = torch.zeros(z.shape[0]) if logdet is None else logdet
        return z - self.b, ld - 0.25


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_flow_log_prob_is_minus_the_nll(backend):
    if backend not in flowkern.available_backends():
        pytest.skip(f"{backend} backend not available")
    flow = Flow([_Shift(6)], base=StandardNormal(6))
    x = torch.randn(5, 6)
    with flowkern.backend(backend):
        lp = flow.log_prob(x)
        (g,) = torch.autograd.grad(lp.sum(), flow.layers[0].b)
        base_lp = flow.base.log_prob(x)
    # The closed forms in float64 within the conditioned bound (x and b perturbed) plus their
    # float32 sums' rounding (tolerances.sum_rounding), instead of rtol 1e-6..1e-5 / atol 1e-5.
    c = 3 * math.log(2 * math.pi)

    def formula(x, b):
        z = x + b
        return -0.5 * (z ** 2).sum(1) - c + 0.25, -z.sum(0), -0.5 * (x ** 2).sum(1) - c

    b = flow.layers[0].b.detach()
    z = (x + b).double()
    eps = EPS[torch.float32]
    const = torch.full((5, 1), c + 0.25, dtype=torch.float64)
    check_against("log_prob", formula, (x, b), (lp, g, base_lp), torch.float32, names=("lp", "grad_b", "base_lp"),
                  extra=(sum_rounding(torch.cat([z ** 2 / 2, const], 1), eps), sum_rounding(z, eps, dims=(0,)),
                         sum_rounding(torch.cat([x.double() ** 2 / 2, const], 1), eps)))
    with pytest.raises(ValueError, match="z must have shape"):
        flow.base.log_prob(torch.zeros(2, 5))


def test_flow_with_another_base_keeps_its_log_prob():
    class Uniform(StandardNormal):
        def log_prob(self, z):
            return torch.zeros(z.shape[0])

    flow = Flow([_Shift(3)], base=Uniform(3))
    torch.testing.assert_close(flow.log_prob(torch.randn(4, 3)), torch.full((4,), 0.25))


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_bits_per_dim_through_the_fused_nll(backend):
    if backend not in flowkern.available_backends():
        pytest.skip(f"{backend} backend not available")
    flow = Flow([DequantizeLogit(0.01)], base=StandardNormal((2, 3)))
    x = torch.randint(0, 256, (4, 2, 3), dtype=torch.uint8)
    with flowkern.backend(backend):
        torch.manual_seed(2)
        bpd = flow.bits_per_dim(x)
        torch.manual_seed(2)
        y, ld = dequantize_logit(x, alpha=0.01)
    assert bpd.shape == (4,) and bpd.dtype == torch.float32
    # vs the float64 nll of the same y and log-det, conditioned, plus the float32 sum's rounding
    # of its terms y^2 / 2, the log-det and the constant (was rtol / atol 1e-6)
    terms = torch.cat([y.double().flatten(1) ** 2 / 2, ld.double()[:, None].abs() + 6], 1)
    check_against("bits per dim", lambda y, ld: gaussian_nll_ref(y, ld) / (6 * math.log(2)), (y, ld), (bpd,),
                  torch.float32, extra=(sum_rounding(terms, EPS[torch.float32]) / (6 * math.log(2)),))
