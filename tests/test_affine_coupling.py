"""flowkern.ops.affine_coupling: every backend against the float64 reference."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import flowkern
from flowkern.ops import affine_coupling
from flowkern.reference import affine_coupling_ref
from flowkern.reference.affine_coupling import SCALES, log_scale_ref

from conftest import kernel_backends
from tolerances import EPS, affine_scale_grad_error, check_against, check_agree, check_op_roundtrip, sum_rounding

SHAPES = [(1, 1), (3, 3), (2, 129), (2, 784), (2, 3, 5), (1, 1300)]


@pytest.fixture(params=["save-factor", "recompute"])
def backward_path(request, monkeypatch):
    """Both ways the backward can get m: the factor saved by the forward, or recomputed from s."""
    import sys
    module = sys.modules["flowkern.ops.affine_coupling"]
    monkeypatch.setattr(module, "SAVE_FACTOR_ON", {"cpu", "cuda"} if request.param == "save-factor" else set())
    return request.param


def make_inputs(shape, dtype=torch.float32, device="cpu", s_scale=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    x, t, s = (torch.randn(shape, generator=g, dtype=torch.float64) for _ in range(3))
    return x.to(device, dtype), t.to(device, dtype), (s * s_scale).to(device, dtype)


@pytest.mark.parametrize("backend,device", kernel_backends())
@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("inverse", [False, True], ids=["fwd", "inv"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_matches_reference(backend, device, scale, inverse, shape, backward_path):
    x, t, s = make_inputs(shape, device=device)
    ld_in = torch.randn(shape[0], device=device)
    kw = dict(scale=scale, clamp=1.5, inverse=inverse)
    with flowkern.backend(backend):
        out, ld = affine_coupling(x, t, s, logdet=ld_in, **kw)
    assert out.dtype == x.dtype and ld.dtype == torch.float32 and ld.shape == (shape[0],)
    # Outputs and every input's gradient within the conditioned bound (tolerances.check_agree).
    check_agree("affine_coupling", dict(x=x, shift=t, scale_raw=s, logdet=ld_in), kw, backend=backend, device=device)


@pytest.mark.parametrize("backend,device", kernel_backends())
@pytest.mark.parametrize("scale", SCALES)
def test_logdet_is_optional_and_grad_without_logdet(backend, device, scale):
    x, t, s = make_inputs((4, 10), device=device)
    with flowkern.backend(backend):
        out, ld = affine_coupling(x, t, s.requires_grad_(), scale=scale)
        out.sum().backward()  # logdet unused: its gradient is zero

    def ref(x, t, s):
        s = s.detach().requires_grad_()
        out, ld = affine_coupling_ref(x, t, s, scale=scale)
        return ld, torch.autograd.grad(out.sum(), s)[0]

    # The log-det: its sum's rounding besides (tolerances.sum_rounding of the log m's).
    sums = sum_rounding(log_scale_ref(s.detach().double().cpu(), scale, 2.0), EPS[torch.float32])
    check_against("no logdet", ref, (x.cpu(), t.cpu(), s.detach().cpu()), (ld, s.grad), torch.float32,
                  names=("logdet", "grad_scale_raw"), extra=(sums, 0.0))


@pytest.mark.parametrize("backend,device", kernel_backends())
@pytest.mark.parametrize("scale", SCALES)
def test_round_trip_and_negated_logdet(backend, device, scale):
    x, t, s = make_inputs((5, 129), device=device, s_scale=2.0)
    # Small m makes x = (y - t) / m cancel catastrophically in float32: the bound is y's
    # rounding over m (tolerances.affine_roundtrip_bound), whatever any CPU's rounding gives;
    # the log-dets cancel within their sums' rounding (64 eps (sum |log m| + 1)).
    for inverse in (False, True):
        check_op_roundtrip("affine_coupling", dict(x=x, shift=t, scale_raw=s),
                           dict(scale=scale, clamp=2.0, inverse=inverse), backend=backend, device=device)


@pytest.mark.parametrize("backend,device", kernel_backends())
@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("inverse", [False, True], ids=["fwd", "inv"])
def test_logdet_equals_log_abs_det_jacobian(backend, device, scale, inverse):
    x, t, s = make_inputs((1, 6), device=device)
    with flowkern.backend(backend):
        jac = torch.func.jacrev(lambda v: affine_coupling(v, t, s, scale=scale, inverse=inverse)[0])(x)
        _, ld = affine_coupling(x, t, s, scale=scale, inverse=inverse)
    jac = jac.reshape(6, 6).double().cpu()
    # The Jacobian is diagonal, m_i in float32: each m_i within a few ulps of exp(log m_i) (its
    # log-scale rounds to eps |log m_i|), the kernel's log-det sums log m_i in float32: both within
    # 16 eps sum_i (1 + |log m_i|) of the exact log-det, so of each other within twice that.
    log_m = log_scale_ref(s.double().cpu(), scale, 2.0)
    if inverse:
        log_m = -log_m
    bound = 32 * EPS[torch.float32] * (1 + log_m.abs()).sum()
    err = (ld.double().cpu()[0] - torch.linalg.slogdet(jac).logabsdet).abs()
    assert err <= bound, f"log-det vs log|det J|: {err:.3g} > {bound:.3g}"


@pytest.mark.parametrize("backend,device", kernel_backends())
def test_vmap_folds_into_rows(backend, device):
    """torch.func.vmap over the op (and over its backward) equals a Python loop."""
    xs, ts, ss = (torch.randn(3, 4, 5, device=device) for _ in range(3))
    t_shared = torch.randn(4, 5, device=device)
    with flowkern.backend(backend):
        out, ld = torch.func.vmap(lambda a, b, c: affine_coupling(a, b, c, scale="sigmoid"), in_dims=(0, None, 2))(
            xs, t_shared, ss.permute(1, 2, 0))
        grads = torch.func.vmap(torch.func.grad(lambda a, c: affine_coupling(a, t_shared, c)[1].sum()))(xs, ss)
        for i in range(3):
            o_i, ld_i = affine_coupling(xs[i], t_shared, ss[i], scale="sigmoid")
            torch.testing.assert_close(out[i], o_i)
            torch.testing.assert_close(ld[i], ld_i)
    assert grads.shape == xs.shape and torch.all(grads == 0)  # the log-det does not depend on x


@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("inverse", [False, True], ids=["fwd", "inv"])
def test_gradcheck_float64(scale, inverse):
    if "cpu" not in flowkern.available_backends():
        pytest.skip("compiled CPU backend not built")
    x, t, s = make_inputs((3, 5), dtype=torch.float64)
    ld = torch.randn(3, dtype=torch.float64)
    inputs = tuple(a.requires_grad_() for a in (x, t, s, ld))
    with flowkern.backend("cpu"):
        assert torch.autograd.gradcheck(
            lambda a, b, c, d: affine_coupling(a, b, c, scale=scale, inverse=inverse, logdet=d), inputs)


@pytest.mark.parametrize("backend,device", kernel_backends())
@pytest.mark.parametrize("batch", [0, 1])
def test_batch_zero_and_one(backend, device, batch):
    x, t, s = make_inputs((batch, 7), device=device)
    with flowkern.backend(backend):
        y, ld = affine_coupling(x, t, s.requires_grad_(), scale="sigmoid")
        (y.sum() + ld.sum()).backward()
    ref, ld_ref = affine_coupling_ref(x, t, s.detach(), scale="sigmoid")
    assert y.shape == (batch, 7) and ld.shape == (batch,) and s.grad.shape == (batch, 7)
    torch.testing.assert_close(y, ref)
    torch.testing.assert_close(ld, ld_ref)


@pytest.mark.parametrize("backend,device", kernel_backends())
def test_non_contiguous_inputs(backend, device):
    big = torch.randn(6, 40, 3, device=device)
    x, t, s = big[::2, :, 0], big[1::2, :, 1], big[::2, :, 2].t().contiguous().t()
    ld_in = torch.randn(6, device=device)[::2]
    assert not (x.is_contiguous() or t.is_contiguous() or ld_in.is_contiguous())
    with flowkern.backend(backend):
        y, ld = affine_coupling(x, t, s, scale="exp", logdet=ld_in)
    y_ref, ld_ref = affine_coupling_ref(x, t, s, scale="exp", logdet=ld_in)
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(ld, ld_ref)


@pytest.mark.parametrize("backend,device", kernel_backends())
@pytest.mark.parametrize("scale,s_value,inverse", [
    ("exp", 80.0, False), ("exp", -80.0, False), ("exp", 200.0, True), ("exp", -80.0, True),
    ("sigmoid", 1e4, False), ("sigmoid", -1e4, False), ("sigmoid", -1e4, True),
    ("tanh", 1e4, False), ("tanh", -1e4, True), ("tanh", 1e30, False),
    ("softplus", 1e4, False), ("softplus", -1e4, False), ("softplus", -1e4, True), ("softplus", 30.0, True),
    ("rational", 1e30, False), ("rational", -1e30, True),
])
def test_extreme_scales_stay_finite(backend, device, scale, s_value, inverse, backward_path):
    x = torch.randn(3, 33, device=device)
    t = torch.randn(3, 33, device=device)
    s = torch.full((3, 33), s_value, device=device, requires_grad=True)
    with flowkern.backend(backend):
        y, ld = affine_coupling(x, t, s, scale=scale, inverse=inverse)
        (y.sum() + ld.sum()).backward()
    assert torch.isfinite(y).all() and torch.isfinite(ld).all() and torch.isfinite(s.grad).all()
    sums = sum_rounding(log_scale_ref(s.detach().double().cpu(), scale, 2.0), EPS[torch.float32])
    check_against("extreme scales", lambda x, t, s: affine_coupling_ref(x, t, s, scale=scale, inverse=inverse),
                  (x.cpu(), t.cpu(), s.detach().cpu()), (y, ld), torch.float32, names=("out", "logdet"),
                  extra=(0.0, sums))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_inputs_on_cpu_compute_in_float32(dtype):
    if "cpu" not in flowkern.available_backends():
        pytest.skip("compiled CPU backend not built")
    x, t, s = make_inputs((4, 17), dtype=dtype)
    with flowkern.backend("cpu"):
        y, ld = affine_coupling(x, t, s, scale="sigmoid")
    y_ref, ld_ref = affine_coupling_ref(x.float(), t.float(), s.float(), scale="sigmoid")
    assert y.dtype == dtype and ld.dtype == torch.float32
    torch.testing.assert_close(y, y_ref.to(dtype))
    torch.testing.assert_close(ld, ld_ref)


def test_float64_logdet_is_float64():
    x, t, s = make_inputs((2, 3), dtype=torch.float64)
    for name in ("reference", *(b for b in ("cpu",) if b in flowkern.available_backends())):
        with flowkern.backend(name):
            assert affine_coupling(x, t, s)[1].dtype == torch.float64


# ---- bad input: a clear error that names the argument ------------------------------------------

@pytest.mark.parametrize("backend_name", ["reference", "auto"])
@pytest.mark.parametrize("kwargs,error,match", [
    (dict(shift=torch.zeros(4, 6)), ValueError, "shift must have the shape"),
    (dict(scale_raw=torch.zeros(4)), ValueError, "scale_raw must have the shape"),
    (dict(x=torch.zeros(4, 5, dtype=torch.int64)), TypeError, "x must be a floating-point"),
    (dict(shift=torch.zeros(4, 5, dtype=torch.float64)), TypeError, "shift must have the dtype"),
    (dict(scale_raw=torch.zeros(4, 5, device="meta")), ValueError, "scale_raw is on meta"),
    (dict(scale="softsign"), ValueError, "scale must be one of"),
    (dict(clamp=0.0), ValueError, "clamp must be a positive"),
    (dict(logdet=torch.zeros(5)), ValueError, r"logdet must have shape \(batch,\)"),
    (dict(logdet=torch.zeros(4, dtype=torch.int32)), TypeError, "logdet must be a floating-point"),
    (dict(x=[[1.0]]), TypeError, "x must be a torch.Tensor"),
    (dict(x=torch.tensor(1.0), shift=torch.tensor(1.0), scale_raw=torch.tensor(1.0)), ValueError, "batch dimension"),
])
def test_bad_input_raises_naming_the_argument(backend_name, kwargs, error, match):
    args = dict(x=torch.zeros(4, 5), shift=torch.zeros(4, 5), scale_raw=torch.zeros(4, 5))
    args.update(kwargs)
    x, shift, scale_raw = args.pop("x"), args.pop("shift"), args.pop("scale_raw")
    with flowkern.backend(backend_name), pytest.raises(error, match=match):
        affine_coupling(x, shift, scale_raw, **args)


# ---- the backend switch -------------------------------------------------------------------------

def test_backend_switch_and_context_manager():
    assert "reference" in flowkern.available_backends() and "auto" in flowkern.available_backends()
    flowkern.set_backend("reference")
    assert flowkern.get_backend() == "reference"
    with flowkern.backend("auto"):
        assert flowkern.get_backend() == "auto"
    assert flowkern.get_backend() == "reference"
    with pytest.raises(ValueError, match="backend must be one of"):
        flowkern.set_backend("fastest")
    with pytest.raises(TypeError):
        flowkern.set_backend(3)


def test_unavailable_backend_is_an_error_not_a_fallback():
    if "cuda" not in flowkern.available_backends():
        with pytest.raises(flowkern.BackendUnavailable, match="'cuda' is not available"):
            flowkern.set_backend("cuda")
    if "cpu" in flowkern.available_backends():
        with flowkern.backend("cpu"), pytest.raises(flowkern.BackendUnavailable, match="runs on cpu tensors"):
            x = torch.zeros(2, 3, device="meta")
            affine_coupling(x, x, x)


def test_env_var_selects_backend():
    code = "import flowkern; print(flowkern.get_backend())"
    out = subprocess.run([sys.executable, "-c", code], env={"FLOWKERN_BACKEND": "reference", "PATH": ""},
                         capture_output=True, text=True, check=True).stdout.strip()
    assert out == "reference"
    bad = subprocess.run([sys.executable, "-c", code], env={"FLOWKERN_BACKEND": "nope", "PATH": ""},
                         capture_output=True, text=True)
    assert bad.returncode != 0 and "backend must be one of" in bad.stderr


def test_auto_uses_compiled_op_when_built():
    if "cpu" not in flowkern.available_backends():
        pytest.skip("compiled CPU backend not built")
    x, t, s = make_inputs((2, 4))
    with flowkern.backend("auto"):
        y, _ = affine_coupling(x, t, s.requires_grad_())
    assert type(y.grad_fn).__name__.startswith("AffineCouplingFunctionBackward")


@pytest.mark.parametrize("backend,device", kernel_backends())
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("scale", SCALES)
def test_half_types_on_gpu(backend, device, dtype, scale):
    """fp16/bf16 on a GPU: loaded, computed in fp32, stored once; logdet float32."""
    if device != "cuda":
        pytest.skip("half-precision kernels are GPU-only (the CPU path upcasts; see the test above)")
    x, t, s = make_inputs((8, 300), dtype=dtype, device=device)
    ld_in = torch.randn(8, device=device)
    with flowkern.backend(backend):
        out, ld = affine_coupling(x, t, s, logdet=ld_in, scale=scale)
    assert out.dtype == dtype and ld.dtype == torch.float32
    # The conditioned bound in the half type (4x the half reference's own error, perturbations
    # of 8 half ulps), the log-det in float32 (tolerances.check_agree).
    check_agree("affine_coupling", dict(x=x, shift=t, scale_raw=s, logdet=ld_in),
                dict(scale=scale, clamp=2.0, inverse=False), backend=backend, device=device, dtype=dtype)


@pytest.mark.parametrize("backend,device", kernel_backends())
def test_double_backward_raises_instead_of_lying(backend, device):
    x, t, s = (a.requires_grad_() for a in make_inputs((2, 3), device=device))
    with flowkern.backend(backend):
        y, ld = affine_coupling(x, t, s, scale="sigmoid")
        with pytest.raises(RuntimeError, match="no derivative of its own.*flowkern.backend\\('reference'\\)"):
            torch.autograd.grad((y ** 2).sum() + ld.sum(), s, create_graph=True)


@pytest.mark.parametrize("backend,device", kernel_backends())
def test_func_grad_with_respect_to_scale_only(backend, device):
    """torch.func over the conditioner's outputs while x is plain data (functional_call style)."""
    x, t, s = make_inputs((3, 4), device=device)
    loss = lambda s_: affine_coupling(x, t, s_, scale="sigmoid")[1].sum() + affine_coupling(x, t, s_)[0].sum()
    with flowkern.backend("reference"):
        expected = torch.func.grad(loss)(s)
    with flowkern.backend(backend):
        got = torch.func.grad(loss)(s)
        per_sample = torch.func.vmap(torch.func.grad(loss))(s.expand(2, 3, 4))
    del expected  # the reference's float32 autograd is the yardstick check_against runs itself

    def ref(x, t, s):
        with flowkern.backend("reference"):
            return torch.func.grad(loss_of(x, t))(s)

    def loss_of(x, t):
        return lambda s_: affine_coupling(x, t, s_, scale="sigmoid")[1].sum() + affine_coupling(x, t, s_)[0].sum()

    check_against("func.grad", ref, (x.cpu(), t.cpu(), s.cpu()), got, torch.float32)
    check_against("vmap(func.grad)", ref, (x.cpu(), t.cpu(), s.cpu()), per_sample[1], torch.float32)


@pytest.mark.parametrize("backend,device", kernel_backends())
def test_forward_mode_ad_raises_instead_of_dropping_tangents(backend, device):
    x, t, s = make_inputs((3, 4), device=device)
    with flowkern.backend(backend), pytest.raises(RuntimeError, match="jvp"):
        torch.func.jvp(lambda s_: affine_coupling(x, t, s_)[1], (s,), (torch.ones_like(s),))


@pytest.mark.parametrize("backend,device", kernel_backends())
@pytest.mark.parametrize("inverse", [False, True], ids=["fwd", "inv"])
def test_tanh_with_a_clamp_beyond_float_range(backend, device, inverse):
    """clamp 120: the factor exp(-120) underflows float32 to 0 (the output is still finite, so
    must the log-det and its gradient be)."""
    x, t = make_inputs((2, 5), device=device)[:2]
    sign = 1.0 if inverse else -1.0  # the direction in which the factor shrinks
    s = torch.tensor([[1e4, 3e3, 1e3, -3.0, 0.5]] * 2, device=device) * sign
    s.requires_grad_()
    with flowkern.backend(backend):
        y, ld = affine_coupling(x, t, s, scale="tanh", clamp=120.0, inverse=inverse)
        (gs,) = torch.autograd.grad(ld.sum(), s)
    assert torch.isfinite(y).all()

    def ref(x, t, s):
        s = s.detach().requires_grad_()
        _, ld = affine_coupling_ref(x, t, s, scale="tanh", clamp=120.0, inverse=inverse)
        return ld, torch.autograd.grad(ld.sum(), s)[0]

    # Where tanh(s / clamp) rounds to within an ulp of 1 (s = 1e3, 3e3), d log m / ds = 1 - tanh^2
    # keeps no relative accuracy in float32 (the reference's as the kernel's): an absolute error of
    # eps times what multiplies it (tolerances.affine_scale_grad_error; here w_out = 0, w_ld = 1).
    s64 = s.detach().double().cpu()
    kw = dict(scale="tanh", clamp=120.0)
    grad_error = affine_scale_grad_error(x.double().cpu(), t.double().cpu(), s64, kw, torch.zeros_like(s64),
                                         torch.ones(s64.shape[0], dtype=torch.float64), EPS[torch.float32])
    sums = sum_rounding(log_scale_ref(s64, "tanh", 120.0), EPS[torch.float32])
    check_against("clamp 120", ref, (x.cpu(), t.cpu(), s.detach().cpu()), (ld, gs), torch.float32,
                  names=("logdet", "grad_scale_raw"), extra=(sums, grad_error))


@pytest.mark.triton
def test_triton_refuses_float64():
    if "triton" not in flowkern.available_backends():
        pytest.skip("triton not available")
    x, t, s = make_inputs((2, 3), dtype=torch.float64, device="cuda" if torch.cuda.is_available() else "cpu")
    with flowkern.backend("triton"), pytest.raises(TypeError, match="compute in float32"):
        affine_coupling(x, t, s)
