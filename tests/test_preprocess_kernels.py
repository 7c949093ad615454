"""The fused dequantize_logit kernels (compiled CPU/CUDA, Triton) against the float64 reference,
their counter-based noise, the fused inverse, and the DequantizeLogit layer."""
from __future__ import annotations

import math

import pytest
import torch

import flowkern
from flowkern.nn import Dequantize, DequantizeLogit, Flow, Logit, StandardNormal
from flowkern.ops import dequantize, dequantize_logit, dequantize_logit_inverse, quantize
from flowkern.reference import (counter_uniform, dequantize_logit_inverse_ref, dequantize_logit_ref, logit_ref,
                                quantize_ref)
from flowkern.reference.dequantize import draw_seed

from conftest import kernel_backends
from tolerances import EPS, check_against, check_agree, check_op_roundtrip, shift_moves, sum_rounding

LOG256 = math.log(256)
ALL_PIXELS = torch.arange(256, dtype=torch.uint8)
SHAPES = [(1, 1), (3, 3), (2, 129), (2, 784), (2, 3, 5), (5, 1, 4, 4)]


def need_cpu():
    if "cpu" not in flowkern.available_backends():
        pytest.skip("compiled CPU backend not built")


def pixels(shape, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, shape, dtype=torch.uint8, generator=g).to(device)


def splitmix_uniform(seed: int, n: int, bits: int = 24):
    """SplitMix64 in Python integers: the definition counter_uniform must follow."""
    mask = (1 << 64) - 1
    state = seed & mask
    out = []
    for i in range(n):
        z = (state + (i + 1) * 0x9E3779B97F4A7C15) & mask
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
        z ^= z >> 31
        out.append((z >> (64 - bits)) / 2 ** bits)
    return out


def run(fn, x, noise, ld_in, w_out, w_ld, **kw):
    """Outputs and the gradients of <w_out, y> + <w_ld, logdet> for the noise and the running log-det."""
    leaves = [noise.detach().clone().requires_grad_(True), ld_in.detach().clone().requires_grad_(True)]
    y, ld = fn(x, leaves[0], logdet=leaves[1], **kw)
    loss = (y.double() * w_out).sum() + (ld.double() * w_ld).sum()
    return (y, ld, *torch.autograd.grad(loss, leaves))


# ---- the counter-based noise -------------------------------------------------------------------

@pytest.mark.parametrize("seed", [0, 1, -1, 12345, -(2 ** 63), 2 ** 63 - 1, 0xDEADBEEFCAFEF00D])
def test_counter_uniform_is_splitmix64(seed):
    """The int64 torch version wraps around exactly like uint64 arithmetic, for every seed."""
    u32 = counter_uniform((3, 5), seed, torch.float32)
    u64 = counter_uniform((15,), seed, torch.float64)
    assert u32.dtype == torch.float32 and u32.shape == (3, 5) and u64.dtype == torch.float64
    assert u32.flatten().tolist() == splitmix_uniform(seed, 15, 24)
    assert u64.tolist() == splitmix_uniform(seed, 15, 53)
    assert counter_uniform((2, 2), seed, torch.float16).dtype == torch.float32  # the compute dtype


@pytest.mark.parametrize("backend,device", kernel_backends())
def test_kernel_noise_is_the_counter_noise_bit_for_bit(backend, device):
    """The noise a kernel draws from a seed is exactly counter_uniform's: given that noise, the same
    kernel produces the same bits. So every backend draws the same u for the same seed."""
    x = pixels((3, 2, 7, 5), device)
    dtypes = [torch.float32] + ([torch.float64] if backend != "triton" else [])
    with flowkern.backend(backend):
        for dtype in dtypes:
            for seed in (0, -3, 2 ** 63 - 1, 987654321987):
                y, ld = dequantize_logit(x, seed=seed, alpha=1e-3, dtype=dtype)
                u = counter_uniform(x.shape, seed, dtype, device)
                y2, ld2 = dequantize_logit(x, u, alpha=1e-3, dtype=dtype)
                assert torch.equal(y, y2) and torch.equal(ld, ld2)


@pytest.mark.parametrize("backend,device", kernel_backends())
def test_same_seed_same_result_on_every_backend(backend, device):
    x = pixels((4, 33), device)
    with flowkern.backend("reference"):
        y_ref, ld_ref = dequantize_logit(x.cpu(), seed=77, alpha=1e-6)
    with flowkern.backend(backend):
        y, ld = dequantize_logit(x, seed=77, alpha=1e-6)
    # Same u (the counter noise of the seed); y and the log-det within the conditioned bound of
    # the float64 op on that noise (tolerances.check_agree), instead of rtol 1e-6 / atol 1e-6, 1e-4;
    # the reference backend the same way.
    assert y_ref.shape == y.shape and ld_ref.shape == ld.shape
    for b in ("reference", backend):
        check_agree("dequantize_logit", dict(x_uint8=x), dict(alpha=1e-6, dtype=torch.float32,
                                                            case_dtype=torch.float32, seed=77),
                    backend=b, device=device if b == backend else "cpu")


def recovered_noise(x, y, alpha):
    """u = 256 v - x from the logits (float64 arithmetic; off by ~1e-4 for float32 y)."""
    v = (torch.sigmoid(y.double()) - alpha) / (1 - 2 * alpha)
    return (v * 256 - x.double()).cpu()


@pytest.mark.parametrize("backend,device", kernel_backends())
def test_counter_noise_is_uniform(backend, device):
    # 102,400 draws, every pixel value 400 times, one fixed seed: the bounds are generous.
    x = ALL_PIXELS.repeat(400, 1).to(device)
    with flowkern.backend(backend):
        y, _ = dequantize_logit(x, seed=2024, alpha=0.0)
    u = recovered_noise(x, y, 0.0)
    assert bool((u > -1e-3).all()) and bool((u < 1 + 1e-3).all())
    u = u.clamp(0, 1).flatten()
    n = u.numel()
    s, _ = torch.sort(u)
    i = torch.arange(1, n + 1, dtype=torch.float64)
    ks = torch.maximum(i / n - s, s - (i - 1) / n).max().item()
    assert ks < 0.01  # Kolmogorov-Smirnov; the 1e-6 critical value at n = 1e5 is ~0.0085
    counts = torch.histc(u, bins=20, min=0.0, max=1.0)
    chi2 = ((counts - n / 20) ** 2 / (n / 20)).sum().item()
    assert chi2 < 80  # 19 degrees of freedom: mean 19, P(chi2 > 60) ~ 3e-6
    per_value = u.reshape(400, 256).mean(0)  # independent of the pixel value
    assert (per_value - 0.5).abs().max().item() < 6 * math.sqrt(1 / 12 / 400)
    # Neighbours (along a row and across rows) are uncorrelated.
    grid = u.reshape(400, 256)
    for a, b in ((grid[:, :-1], grid[:, 1:]), (grid[:-1], grid[1:])):
        corr = torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1].item()
        assert abs(corr) < 0.02


def test_counter_noise_float64_has_53_bits():
    u = counter_uniform((4096,), 5, torch.float64)
    assert bool((u * 2 ** 53 == (u * 2 ** 53).round()).all())
    assert bool(((u * 2 ** 24) != (u * 2 ** 24).round()).any())  # more bits than float32's 24
    assert bool((u >= 0).all()) and bool((u < 1).all())


@pytest.mark.parametrize("backend,device", kernel_backends())
def test_seeds_reproducible_and_distinct(backend, device):
    x = pixels((3, 50), device)
    with flowkern.backend(backend):
        a, _ = dequantize_logit(x, seed=1)
        b, _ = dequantize_logit(x, seed=1)
        c, _ = dequantize_logit(x, seed=2)
        g = lambda: torch.Generator().manual_seed(9)  # noqa: E731
        d, _ = dequantize_logit(x, generator=g())
        e, _ = dequantize_logit(x, generator=g())
        torch.manual_seed(3)
        f1, _ = dequantize_logit(x)
        f2, _ = dequantize_logit(x)  # a fresh seed per call
        torch.manual_seed(3)
        f3, _ = dequantize_logit(x)
    assert torch.equal(a, b) and not torch.equal(a, c) and torch.equal(d, e)
    assert torch.equal(f1, f3) and not torch.equal(f1, f2)
    # Different seeds differ almost everywhere, not in a few elements.
    assert (a != c).float().mean().item() > 0.99


# ---- against the float64 reference -------------------------------------------------------------

@pytest.mark.parametrize("backend,device", kernel_backends())
@pytest.mark.parametrize("alpha", [1e-6, 0.05])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_matches_reference(backend, device, alpha, shape):
    x = pixels(shape, device)
    noise = counter_uniform(shape, 11, torch.float32, device)
    ld_in = torch.randn(shape[0], device=device)
    w_out = torch.randn(shape, dtype=torch.float64, device=device)
    w_ld = torch.randn(shape[0], dtype=torch.float64, device=device)
    with flowkern.backend(backend):
        got = run(dequantize_logit, x, noise, ld_in, w_out, w_ld, alpha=alpha)
        y_seed, ld_seed = dequantize_logit(x, seed=11, alpha=alpha, logdet=ld_in)
    assert got[0].dtype == torch.float32 and got[1].dtype == torch.float32 and got[1].shape == (shape[0],)
    # y, the log-det and the gradients of the noise and the running log-det within the
    # conditioned bound (tolerances.check_agree; the log-det by the row-sum rule).
    check_agree("dequantize_logit", dict(x_uint8=x, noise=noise, logdet=ld_in),
                dict(alpha=alpha, dtype=torch.float32, case_dtype=torch.float32), backend=backend, device=device)
    assert torch.equal(y_seed, got[0]) and torch.equal(ld_seed, got[1])


@pytest.mark.parametrize("alpha", [1e-6, 0.05])
def test_float64_matches_reference(alpha):
    need_cpu()
    x = pixels((3, 77))
    noise = counter_uniform(x.shape, 4, torch.float64)
    ld_in = torch.randn(3, dtype=torch.float64)
    w_out = torch.randn(3, 77, dtype=torch.float64)
    w_ld = torch.randn(3, dtype=torch.float64)
    ref = run(dequantize_logit_ref, x, noise, ld_in, w_out, w_ld, alpha=alpha, dtype=torch.float64)
    with flowkern.backend("cpu"):
        got = run(dequantize_logit, x, noise, ld_in, w_out, w_ld, alpha=alpha, dtype=torch.float64)
        y_seed, _ = dequantize_logit(x, seed=4, alpha=alpha, dtype=torch.float64)
    assert got[0].dtype == torch.float64 and got[1].dtype == torch.float64
    for name, a, b in zip(["y", "logdet", "grad_noise", "grad_logdet_in"], got, ref):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-11, msg=name)
    assert torch.equal(y_seed, got[0])


@pytest.mark.parametrize("backend,device", kernel_backends())
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_outputs_compute_in_float32_and_round_once(backend, device, dtype):
    if backend == "triton" and device == "cpu" and dtype == torch.bfloat16:
        pytest.skip("the Triton interpreter truncates float32 -> bfloat16 (a GPU rounds to nearest)")
    x = pixels((4, 67), device)
    noise = counter_uniform(x.shape, 8, torch.float32, device)
    ref64, reflp = (dequantize_logit_ref(x, noise, dtype=d) for d in (torch.float64, dtype))
    with flowkern.backend(backend):
        y, ld = dequantize_logit(x, noise, dtype=dtype)
        y_seed, ld_seed = dequantize_logit(x, seed=8, dtype=dtype)
        y_half_noise, _ = dequantize_logit(x, noise.to(dtype), dtype=dtype)  # noise of the output's dtype
    assert y.dtype == dtype and ld.dtype == torch.float32
    assert torch.equal(y_seed, y) and torch.equal(ld_seed, ld)
    check_agree("dequantize_logit", dict(x_uint8=x, noise=noise), dict(alpha=1e-6, dtype=dtype, case_dtype=dtype),
                backend=backend, device=device, dtype=dtype)
    ref_half_noise, _ = dequantize_logit_ref(x, noise.to(dtype), dtype=dtype)
    torch.testing.assert_close(y_half_noise, ref_half_noise)


@pytest.mark.parametrize("backend,device", kernel_backends())
@pytest.mark.parametrize("u", [0.0, 0.5, 1 - 2 ** -24, 1 - 2 ** -12])
def test_all_pixel_values_and_noise_at_the_cell_edges(backend, device, u):
    """Every pixel value with u at 0, 1/2 and right below 1, where x + u rounds up to x + 1 in
    float32 and the kernels must clamp it below, as the reference does."""
    x = ALL_PIXELS.reshape(2, 128).to(device)
    noise = torch.full((2, 128), u, device=device)
    with flowkern.backend(backend):
        y, ld = dequantize_logit(x, noise)
    assert torch.isfinite(y).all() and torch.isfinite(ld).all()
    check_agree("dequantize_logit", dict(x_uint8=x, noise=noise),
                dict(alpha=1e-6, dtype=torch.float32, case_dtype=torch.float32), backend=backend, device=device)
    # each y stays in its pixel's cell: logit of the cell's ends, in float64
    cell = lambda k: logit_ref((x.double() + k) / 256, alpha=1e-6)[0]  # noqa: E731
    assert bool((y.double() >= cell(0) - 1e-5).all()) and bool((y.double() <= cell(1) + 1e-5).all())


@pytest.mark.parametrize("backend,device", kernel_backends())
def test_round_trip_for_all_pixel_values(backend, device):
    x = ALL_PIXELS.repeat(16, 1).to(device)  # every value, 16 noise draws each
    dtypes = [torch.float32] + ([torch.float64] if backend != "triton" else [])
    with flowkern.backend(backend):
        for dtype in dtypes:  # (a float16 y has too few bits to hold a pixel's cell)
            y, ld = dequantize_logit(x, seed=5, dtype=dtype)
            back, ld_back = dequantize_logit_inverse(y)
            assert back.dtype == dtype and torch.equal(back.to(torch.uint8), x), dtype
            # pixels back bit-exact away from cell edges, the log-dets cancelling within their
            # sums' rounding and the inverse's log-det taken at the rounded y (check_roundtrip's
            # dequantize_logit rule), instead of rtol 1e-5 / atol 2e-3
            check_op_roundtrip("dequantize_logit", dict(x_uint8=x), dict(alpha=1e-6, dtype=dtype, case_dtype=dtype,
                                                                       seed=5),
                               backend=backend, device=device, dtype=dtype)
        # given noise away from the cell edges, through both layers' paths
        for u in (1e-3, 0.25, 0.5, 0.75, 0.999):
            y, _ = dequantize_logit(x, torch.full(x.shape, u, device=device))
            assert torch.equal(dequantize_logit_inverse(y)[0].to(torch.uint8), x)
            assert torch.equal(quantize(logit_ref(y, inverse=True)[0])[0].to(torch.uint8), x)


@pytest.mark.parametrize("backend,device", kernel_backends())
def test_round_trip_is_off_by_at_most_one_at_the_cell_edges(backend, device):
    """Noise within float32 rounding of a cell edge (u ~ 0 or ~ 1) can come back in the
    neighbouring cell after a float32 round trip, in every implementation (the reference too):
    never further; the test above holds the round trip exact for u in [1e-3, 0.999]."""
    x = ALL_PIXELS.repeat(5, 1).to(device)
    edges = torch.tensor([0.0, 2.0 ** -24, 1e-6, 1 - 1e-6, 1 - 2.0 ** -24], device=device)
    noise = edges[:, None].expand(5, 256).contiguous()
    with flowkern.backend(backend):
        back, _ = dequantize_logit_inverse(dequantize_logit(x, noise)[0])
    assert bool(((back - x.float()).abs() <= 1).all())


# ---- the fused inverse -------------------------------------------------------------------------

def inverse_run(fn, y, ld_in, w_ld, **kw):
    leaves = [y.detach().clone().requires_grad_(True), ld_in.detach().clone().requires_grad_(True)]
    pixels_out, ld = fn(leaves[0], logdet=leaves[1], **kw)
    loss = (ld.double() * w_ld).sum() + pixels_out.double().sum()
    return (pixels_out, ld, *torch.autograd.grad(loss, leaves))


@pytest.mark.parametrize("backend,device", kernel_backends())
@pytest.mark.parametrize("alpha", [1e-6, 0.05])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_inverse_matches_reference(backend, device, alpha, shape):
    g = torch.Generator().manual_seed(1)
    y = (torch.randn(shape, generator=g, dtype=torch.float64) * 4).float().to(device)
    ld_in = torch.randn(shape[0], device=device)
    w_ld = torch.randn(shape[0], dtype=torch.float64, device=device)
    ref32 = inverse_run(dequantize_logit_inverse_ref, y, ld_in, w_ld, alpha=alpha)
    with flowkern.backend(backend):
        got = inverse_run(dequantize_logit_inverse, y, ld_in, w_ld, alpha=alpha)
    assert got[0].dtype == torch.float32 and got[1].dtype == torch.float32
    assert torch.equal(got[0], ref32[0])  # random y: no pixel boundary within rounding
    check_agree("dequantize_logit_inverse", dict(y=y, logdet=ld_in), dict(alpha=alpha), backend=backend, device=device)
    # the composition of the reference ops is the same map
    v, ld = logit_ref(y, alpha=alpha, inverse=True, logdet=ld_in)
    pix, ld = quantize_ref(v, logdet=ld)
    assert torch.equal(pix, ref32[0])
    torch.testing.assert_close(ld, ref32[1])


@pytest.mark.parametrize("backend,device", kernel_backends())
def test_inverse_far_tails_and_nan(backend, device):
    y = torch.tensor([[-1e4, -100.0, -20.0, 0.0, 20.0, 100.0, 1e4, float("nan")]], device=device)
    with flowkern.backend(backend):
        px, ld = dequantize_logit_inverse(y[:, :7])
        px_nan, ld_nan = dequantize_logit_inverse(y)
    ref_px, ref_ld = dequantize_logit_inverse_ref(y[:, :7].double())
    assert torch.equal(px.cpu(), dequantize_logit_inverse_ref(y[:, :7].cpu())[0])
    assert torch.equal(px[:, [0, 1, 2, 4, 5, 6]].cpu(), torch.tensor([[0.0, 0.0, 0.0, 255.0, 255.0, 255.0]]))
    # the log-det at y in the far tails: terms ~ |y| + 6 (log sigmoid(y) ~ -|y|, log 256) whose
    # float32 sum rounds within tolerances.sum_rounding, plus 8-ulp perturbations of y (check_against),
    # instead of rtol 1e-6 / atol 1e-3
    check_against("far tails", lambda v: dequantize_logit_inverse_ref(v)[1], (y[:, :7].cpu(),), (ld,), torch.float32,
                  extra=(sum_rounding(y[:, :7].double().cpu().abs() + 6, EPS[torch.float32]),))
    assert px_nan[0, 7].isnan() and ld_nan.isnan().all()


# ---- shapes, layouts, errors --------------------------------------------------------------------

@pytest.mark.parametrize("backend,device", kernel_backends())
@pytest.mark.parametrize("batch", [0, 1])
def test_batch_zero_and_one(backend, device, batch):
    x = pixels((batch, 3, 5), device)
    noise = torch.rand(batch, 3, 5, device=device, requires_grad=True)
    with flowkern.backend(backend):
        y, ld = dequantize_logit(x, noise)
        (y.sum() + ld.sum()).backward()
        px, ld_inv = dequantize_logit_inverse(y.detach())
        y2, _ = dequantize_logit(x, seed=3)
    assert y.shape == x.shape and ld.shape == (batch,) and noise.grad.shape == x.shape
    assert px.shape == x.shape and ld_inv.shape == (batch,) and y2.shape == x.shape
    assert torch.equal(px.to(torch.uint8), x)


@pytest.mark.parametrize("backend,device", kernel_backends())
def test_non_contiguous_and_other_integer_inputs(backend, device):
    big = pixels((6, 40, 3), device)
    x = big[::2, :, 1]
    noise_big = torch.rand(6, 40, 3, device=device)
    noise = noise_big[::2, :, 1]
    ld_in = torch.randn(6, device=device)[::2]
    assert not (x.is_contiguous() or noise.is_contiguous() or ld_in.is_contiguous())
    ref = dequantize_logit_ref(x, noise, logdet=ld_in)
    with flowkern.backend(backend):
        y, ld = dequantize_logit(x, noise, logdet=ld_in)
        y_int, ld_int = dequantize_logit(x.to(torch.int32), noise, logdet=ld_in)
        # counter noise follows the logical (row-major) element order, not the memory layout
        y_seed, _ = dequantize_logit(x, seed=6)
        y_seed_c, _ = dequantize_logit(x.contiguous(), seed=6)
        px, _ = dequantize_logit_inverse(y.t().contiguous().t())
    torch.testing.assert_close(y, ref[0])
    torch.testing.assert_close(ld, ref[1])
    assert torch.equal(y_int, y) and torch.equal(ld_int, ld) and torch.equal(y_seed, y_seed_c)
    assert torch.equal(px.to(torch.uint8), x)


@pytest.mark.parametrize("backend,device", kernel_backends())
def test_logdet_is_optional_and_gradients_of_one_output(backend, device):
    x = pixels((3, 9), device)
    noise = torch.rand(3, 9, device=device, requires_grad=True)
    with flowkern.backend(backend):
        y, ld = dequantize_logit(x, noise)
        (g_y,) = torch.autograd.grad(y.sum(), noise)
        y, ld = dequantize_logit(x, noise)
        (g_ld,) = torch.autograd.grad(ld.sum(), noise)
        y_inf, ld_inf = dequantize_logit(x, noise.detach())  # no grad: no autograd node
    # vs the float64 reference's gradients, conditioned (tolerances.check_against; was rtol 1e-5 / atol 1e-6)
    def ref_grads(u):
        u = u.detach().requires_grad_()
        with torch.enable_grad():
            (r_y,) = torch.autograd.grad(dequantize_logit_ref(x.cpu(), u, dtype=u.dtype)[0].sum(), u)
            (r_ld,) = torch.autograd.grad(dequantize_logit_ref(x.cpu(), u, dtype=u.dtype)[1].sum(), u)
        return r_y, r_ld

    # u enters through x + u, which rounds at eps (x + u): those moves besides (tolerances.shift_moves)
    shifted = shift_moves(ref_grads, (noise,), (8 * EPS[torch.float32] * (x.double().cpu() + noise.detach().double().cpu()),))
    check_against("noise gradients", ref_grads, (noise.detach().cpu(),), (g_y, g_ld), torch.float32, names=("y", "ld"),
                  extra=shifted)
    assert y_inf.grad_fn is None and ld_inf.grad_fn is None


@pytest.mark.parametrize("backend,device", kernel_backends())
def test_noise_jacobian_and_vmap(backend, device):
    """jacrev in the noise: diagonal dy/du, and the log-det's gradient, equal the reference's."""
    x = pixels((1, 6), device)
    noise = torch.rand(1, 6, device=device)
    f = lambda u: dequantize_logit(x, u, alpha=0.01)  # noqa: E731
    with flowkern.backend(backend):
        jac_y, jac_ld = torch.func.jacrev(f)(noise)
        ys = torch.func.vmap(lambda u: f(u)[0])(noise.expand(3, 1, 6))
    # vs the float64 reference's Jacobians, conditioned (tolerances.check_against; was rtol 1e-5 / atol 1e-6)
    def ref_jac(u):
        with flowkern.backend("reference"):
            return torch.func.jacrev(lambda v: dequantize_logit(x.cpu(), v, alpha=0.01, dtype=u.dtype))(u)

    shifted = shift_moves(ref_jac, (noise,), (8 * EPS[torch.float32] * (x.double().cpu() + noise.double().cpu()),))
    check_against("noise jacobian", ref_jac, (noise.cpu(),), (jac_y, jac_ld), torch.float32, names=("y", "ld"),
                  extra=shifted)  # plus x + u's rounding, as above
    torch.testing.assert_close(ys[2], f(noise)[0])


def test_gradcheck_float64():
    need_cpu()
    x = pixels((3, 5))
    noise = (torch.rand(3, 5, dtype=torch.float64) * 0.8 + 0.1).requires_grad_()
    ld = torch.randn(3, dtype=torch.float64, requires_grad=True)
    y = (torch.randn(3, 5, dtype=torch.float64) * 3).requires_grad_()
    with flowkern.backend("cpu"):
        assert torch.autograd.gradcheck(
            lambda u, l: dequantize_logit(x, u, alpha=0.05, dtype=torch.float64, logdet=l), (noise, ld))
        # the inverse's log-det (its pixels are a step function)
        assert torch.autograd.gradcheck(lambda v, l: dequantize_logit_inverse(v, alpha=0.05, logdet=l)[1], (y, ld))


@pytest.mark.triton
def test_triton_refuses_float64():
    if "triton" not in flowkern.available_backends():
        pytest.skip("triton not available")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    x = pixels((2, 3), device)
    with flowkern.backend("triton"):
        with pytest.raises(TypeError, match="compute in float32"):
            dequantize_logit(x, seed=1, dtype=torch.float64)
        with pytest.raises(TypeError, match="compute in float32"):
            dequantize_logit_inverse(torch.zeros(2, 3, dtype=torch.float64, device=device))


@pytest.mark.parametrize("call,error,match", [
    (lambda: dequantize_logit(pixels((2, 3)), seed=1.5), TypeError, "seed must be an int"),
    (lambda: dequantize_logit(pixels((2, 3)), seed=True), TypeError, "seed"),
    (lambda: dequantize_logit(pixels((2, 3)), seed=2 ** 64), ValueError, "seed must fit in 64 bits"),
    (lambda: dequantize_logit(pixels((2, 3)), torch.rand(2, 3), seed=1), ValueError, "noise or seed"),
    (lambda: dequantize_logit(pixels((2, 3)), generator="g"), TypeError, "generator"),
    (lambda: dequantize_logit_inverse(torch.zeros(2, 3, dtype=torch.int32)), TypeError, "y must be a floating"),
    (lambda: dequantize_logit_inverse(torch.zeros(2, 3), alpha=0.5), ValueError, "alpha"),
    (lambda: dequantize_logit_inverse(torch.zeros(2, 3), logdet=torch.zeros(3)), ValueError, "logdet"),
])
@pytest.mark.parametrize("backend_name", ["reference", "auto"])
def test_bad_arguments(backend_name, call, error, match):
    with flowkern.backend(backend_name), pytest.raises(error, match=match):
        call()


def test_compiled_op_checks_direct_calls():
    need_cpu()
    x = pixels((2, 3))
    ops = torch.ops.flowkern
    with pytest.raises(RuntimeError, match="uint8"):
        ops.dequantize_logit_fwd(x.int(), None, 0, 1e-6, torch.float32, None)
    with pytest.raises(RuntimeError, match="noise must be"):
        ops.dequantize_logit_fwd(x, torch.rand(2, 3, dtype=torch.float64), 0, 1e-6, torch.float32, None)
    with pytest.raises(RuntimeError, match="alpha"):
        ops.dequantize_logit_fwd(x, None, 0, 0.5, torch.float32, None)
    with pytest.raises(RuntimeError, match="float32 or float64"):
        ops.dequantize_logit_fwd(x, None, 0, 1e-6, torch.float16, None)


# ---- the layer, and a flow under torch.compile ---------------------------------------------------

def test_layer_is_a_dequantize_with_the_fused_ops():
    layer = DequantizeLogit(alpha=1e-3)
    assert isinstance(layer, Dequantize) and "alpha=0.001" in repr(layer)
    x = pixels((4, 2, 3))
    torch.manual_seed(5)
    y, ld = layer(x)
    torch.manual_seed(5)
    y2, ld2 = dequantize_logit(x, alpha=1e-3)  # the layer's noise: a seed from the global RNG
    assert torch.equal(y, y2) and torch.equal(ld, ld2)
    l0 = torch.randn(4)
    torch.manual_seed(5)
    y3, ld3 = layer(x, None, l0)
    assert torch.equal(y3, y)
    torch.testing.assert_close(ld3, ld + l0)
    back, ld_back = layer.inverse(y)
    assert torch.equal(back.to(torch.uint8), x)
    # the log-dets cancel within check_roundtrip's dequantize_logit rule (was rtol 1e-5 / atol 1e-3)
    check_op_roundtrip("dequantize_logit", dict(x_uint8=x), dict(alpha=1e-3, dtype=torch.float32,
                                                               case_dtype=torch.float32, seed=5),
                       backend=flowkern.get_backend(), device="cpu")
    v, ld = DequantizeLogit().double()(x)
    assert v.dtype == torch.float64 and ld.dtype == torch.float64
    with pytest.raises(ValueError, match="alpha"):
        DequantizeLogit(alpha=0.7)


def test_models_use_the_fused_layer():
    flow = flowkern.models.RealNVP(features=4, layers=2, hidden=4, dequantize=True, alpha=0.01)
    assert isinstance(flow.layers[0], DequantizeLogit) and flow.layers[0].alpha == 0.01
    assert not any(type(layer).__name__ == "Logit" for layer in flow.layers)


def test_flow_of_the_fused_layer_equals_the_two_layers():
    """Flow([DequantizeLogit]) scores (log_prob, bits/dim) as Flow([Dequantize, Logit]) given the
    same noise: the counter noise of the seed the layer draws from the global RNG."""
    x = pixels((3, 2, 2))
    fused = Flow([DequantizeLogit(0.05)], base=StandardNormal((2, 2))).double()
    two = Flow([Dequantize(), Logit(0.05)], base=StandardNormal((2, 2))).double()
    torch.manual_seed(1)
    lp = fused.log_prob(x)
    torch.manual_seed(1)
    bpd = fused.bits_per_dim(x)
    torch.manual_seed(1)
    u = counter_uniform(x.shape, draw_seed(), torch.float64)
    v, ld = dequantize(x, u, dtype=torch.float64)
    z, ld = two.layers[1](v, None, ld)
    expected = two.base.log_prob(z) + ld
    torch.testing.assert_close(lp, expected, rtol=1e-12, atol=1e-9)
    torch.testing.assert_close(bpd, -expected / (4 * math.log(2)), rtol=1e-12, atol=1e-9)


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_compile_fullgraph_log_prob(backend):
    """torch.compile(fullgraph=True) traces a flow that starts with DequantizeLogit (its noise is
    drawn with torch.rand while tracing), through the compiled ops' fake implementations."""
    if backend not in flowkern.available_backends():
        pytest.skip(f"{backend} backend not available")
    from torch._inductor import config as inductor_config

    flow = Flow([DequantizeLogit(1e-3)], base=StandardNormal((2, 3)))
    x = pixels((4, 2, 3))
    with flowkern.backend(backend), inductor_config.patch(fallback_random=True):
        compiled = torch.compile(flow.log_prob, fullgraph=True, dynamic=False)
        torch.manual_seed(0)
        got = compiled(x)
        torch.manual_seed(0)
        noise = torch.rand(4, 2, 3)
        y, ld = dequantize_logit(x, noise, alpha=1e-3)
        expected = flow.base.log_prob(y) + ld
    assert got.shape == (4,) and got.dtype == torch.float32
    del expected  # the float32 reference is the yardstick check_against runs itself

    def log_prob(u):  # on the same noise, in its dtype
        y, ld = dequantize_logit_ref(x, u, alpha=1e-3, dtype=u.dtype)
        return -0.5 * (y ** 2).sum((1, 2)) - 3 * math.log(2 * math.pi) + ld

    # vs the float64 log-prob on the same noise, conditioned, plus the float32 sums' rounding
    # of the terms y^2 / 2, the constant and the log-det's logs (was rtol 1e-5 / atol 1e-4 vs
    # the eager float32 ops)
    y64, ld64 = dequantize_logit_ref(x, noise.double(), alpha=1e-3, dtype=torch.float64)
    v = torch.sigmoid(y64).flatten(1)
    terms = torch.cat([(y64 ** 2 / 2).flatten(1), v.log().abs() + (-v).log1p().abs() + math.log(256) + 1,
                       torch.full((4, 1), 3 * math.log(2 * math.pi))], 1)
    shifted = shift_moves(log_prob, (noise,), (8 * EPS[torch.float32] * (x.double() + noise.double()),))  # x + u's rounding
    check_against("compiled log_prob", log_prob, (noise,), (got,), torch.float32,
                  extra=(sum_rounding(terms, EPS[torch.float32]) + shifted[0],))
