"""Dequantize / quantize / Logit preprocessing: ranges, exact log-dets, noise, errors, bits/dim."""
from __future__ import annotations

import math

import pytest
import torch

import flowkern
from flowkern.nn.flow import Flow, StandardNormal
from flowkern.reference.dequantize import counter_uniform, draw_seed
from flowkern.nn.preprocess import Dequantize, Logit, bits_per_dim
from flowkern.ops.dequantize import dequantize, dequantize_logit, logit, quantize

from layer_checks import (check_batch_sizes, check_gradcheck, check_logdet_jacobian, check_round_trip,
                          check_running_logdet)

LOG256 = math.log(256)
ALL_PIXELS = torch.arange(256, dtype=torch.uint8)


def below_one(dtype):
    """The largest value of dtype below 1: the noise most likely to round x + u up to x + 1."""
    return torch.nextafter(torch.ones((), dtype=dtype), torch.zeros((), dtype=dtype))


# ----------------------------------------------------------------------------- dequantize

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_dequantize_range_and_exact_logdet(dtype):
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (3, 2, 5, 7), dtype=torch.uint8, generator=g)
    v, ld = dequantize(x, generator=g, dtype=dtype)
    assert v.shape == x.shape and v.dtype == dtype
    xf = x.to(torch.float64)
    assert bool((v.double() >= xf / 256).all()) and bool((v.double() < (xf + 1) / 256).all())
    ld_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    assert ld.dtype == ld_dtype
    assert torch.equal(ld, torch.full((3,), -70 * LOG256, dtype=ld_dtype))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_noise_next_to_one_stays_below_next_pixel(dtype):
    # x + u rounds up to x + 1 when u is within half an ulp of 1 (float32: 255 + (1 - 2^-24) == 256).
    x = ALL_PIXELS.reshape(1, 256)
    for noise_dtype in {dtype, torch.float32, torch.float64}:
        noise = below_one(noise_dtype).expand(1, 256)
        v, _ = dequantize(x, noise, dtype=dtype)
        xf = x.double()
        assert bool((v.double() >= xf / 256).all()) and bool((v.double() < (xf + 1) / 256).all())
        assert torch.equal(quantize(v)[0], x.to(dtype))


def test_dequantize_given_noise_is_exact():
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 256, (4, 9), dtype=torch.uint8, generator=g)
    noise = torch.rand(4, 9, dtype=torch.float64, generator=g)
    v, _ = dequantize(x, noise, dtype=torch.float64)
    assert torch.equal(v, (x.double() + noise) / 256)
    # Dyadic noise: exact in float32 as well.
    noise32 = torch.randint(0, 64, (4, 9), generator=g).float() / 64
    v32, _ = dequantize(x, noise32)
    assert torch.equal(v32, (x.float() + noise32) / 256)


def test_dequantize_generator_reproducible():
    x = torch.randint(0, 256, (5, 3, 4), dtype=torch.uint8)
    a, _ = dequantize(x, generator=torch.Generator().manual_seed(7))
    b, _ = dequantize(x, generator=torch.Generator().manual_seed(7))
    c, _ = dequantize(x, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_dequantize_layer_uses_global_rng():
    layer = Dequantize()
    x = torch.randint(0, 256, (4, 6), dtype=torch.uint8)
    torch.manual_seed(3)
    a, _ = layer(x)
    b, _ = layer(x)
    torch.manual_seed(3)
    a2, _ = layer(x)
    assert torch.equal(a, a2) and not torch.equal(a, b)  # reproducible, and fresh noise per call


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.float64])
def test_quantize_inverts_dequantize_for_all_pixel_values(dtype):
    x = ALL_PIXELS.repeat(8, 1)  # (8, 256): every value, eight noise draws each
    g = torch.Generator().manual_seed(2)
    for noise in (None, torch.zeros(8, 256)):
        v, ld = dequantize(x, noise, generator=g, dtype=dtype)
        back, ld_back = quantize(v)
        assert back.dtype == dtype and torch.equal(back, x.to(dtype))
        assert torch.equal(back.to(torch.uint8), x)
        torch.testing.assert_close(ld_back, -ld, rtol=0, atol=0)


def test_quantize_clamps_out_of_range_values():
    v = torch.tensor([[-0.5, -1e-9, 0.0, 0.999, 1.0, 7.0]])
    x, ld = quantize(v)
    assert torch.equal(x, torch.tensor([[0.0, 0.0, 0.0, 255.0, 255.0, 255.0]]))
    assert torch.equal(ld, torch.full((1,), 6 * LOG256))


def test_dequantize_noise_is_uniform():
    # 102,400 draws, every pixel value 400 times; u recovered exactly as 256 v - x.
    x = ALL_PIXELS.repeat(400, 1)
    v, _ = dequantize(x, generator=torch.Generator().manual_seed(1234))
    u = (v * 256 - x.float()).double().flatten()
    assert bool((u >= 0).all()) and bool((u < 1).all())
    n = u.numel()
    s, _ = torch.sort(u)
    i = torch.arange(1, n + 1, dtype=torch.float64)
    ks = torch.maximum(i / n - s, s - (i - 1) / n).max().item()
    assert ks < 0.01  # Kolmogorov-Smirnov; the 1e-6 critical value at n = 1e5 is ~0.0085
    counts = torch.histc(u, bins=20, min=0.0, max=1.0)
    expected = n / 20
    chi2 = ((counts - expected) ** 2 / expected).sum().item()
    assert chi2 < 80  # 19 degrees of freedom: mean 19, P(chi2 > 60) ~ 3e-6
    # The noise does not depend on the pixel value: the mean of u for each x is near 1/2.
    per_value = u.reshape(400, 256).mean(0)
    assert (per_value - 0.5).abs().max().item() < 6 * math.sqrt(1 / 12 / 400)


def test_dequantize_other_integer_dtypes_and_non_contiguous():
    g = torch.Generator().manual_seed(4)
    x = torch.randint(0, 256, (6, 10), dtype=torch.uint8, generator=g)
    noise = torch.rand(6, 10, generator=g)
    v, ld = dequantize(x, noise)
    for dt in (torch.int16, torch.int32, torch.int64):
        v2, ld2 = dequantize(x.to(dt), noise)
        assert torch.equal(v2, v) and torch.equal(ld2, ld)
    v3, _ = dequantize(x[:, ::2], noise[:, ::2])
    assert torch.equal(v3, v[:, ::2])


def test_dequantize_layer_batch_sizes_logdet_and_dtype():
    layer = Dequantize()
    for b in (0, 1):
        x = torch.randint(0, 256, (b, 3, 4), dtype=torch.uint8)
        v, ld = layer(x)
        assert v.shape == x.shape and ld.shape == (b,)
        back, ld_back = layer.inverse(v)
        assert torch.equal(back, x.float()) and ld_back.shape == (b,)
    x = torch.randint(0, 256, (3, 8), dtype=torch.uint8)
    check_running_logdet(layer, x)
    v, ld = layer(x)
    back, ld_back = layer.inverse(v)  # float pixel values (check_round_trip would compare dtypes)
    assert torch.equal(back.to(torch.uint8), x) and torch.equal(ld_back, -ld)
    # The output dtype follows module casts, like a layer with parameters.
    v, ld = Dequantize().double()(x)
    assert v.dtype == torch.float64 and ld.dtype == torch.float64
    l0 = torch.tensor([1e-12, 2.0, 3.0], dtype=torch.float64)
    _, ld = dequantize(x, dtype=torch.float64, logdet=l0)
    assert ld.dtype == torch.float64 and torch.equal(ld, l0 - 8 * LOG256)


# ----------------------------------------------------------------------------- logit

def _unit(*shape, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(*shape, generator=g, dtype=torch.float64) * 0.98 + 0.01).to(dtype)


def test_logit_round_trip_and_running_logdet():
    layer = Logit(1e-3)
    v = _unit(4, 3, 5)
    check_round_trip(layer, v)
    check_running_logdet(layer, v)
    y, _ = layer(v)
    l0 = torch.randn(4)
    _, ld_inv = layer.inverse(y)
    _, ld_inv_acc = layer.inverse(y, None, l0)
    torch.testing.assert_close(ld_inv_acc, ld_inv + l0)


@pytest.mark.parametrize("alpha", [0.0, 1e-6, 0.05])
def test_logit_logdet_equals_jacobian(alpha):
    check_logdet_jacobian(Logit(alpha), _unit(3, 6, dtype=torch.float64))
    check_logdet_jacobian(Logit(alpha), _unit(2, 2, 3, dtype=torch.float64, seed=1))
    # ... and the inverse's log-det is log|det J| of the inverse map.
    inverse_layer = Logit(alpha)
    inverse_layer.forward = lambda y, context=None, logdet=None: Logit(alpha).inverse(y, context, logdet)
    check_logdet_jacobian(inverse_layer, torch.randn(3, 5, dtype=torch.float64) * 3)


def test_logit_gradcheck_and_batch_sizes():
    check_gradcheck(Logit(0.05), _unit(3, 4, dtype=torch.float64))
    check_gradcheck(Logit(0.0), _unit(2, 5, dtype=torch.float64, seed=2))
    check_batch_sizes(Logit(), (3, 4))


def test_logit_finite_at_the_ends_and_accurate_near_one():
    v = torch.stack([torch.zeros(()), below_one(torch.float32), torch.ones(())]).reshape(1, 3)
    v = v.requires_grad_()
    y, ld = logit(v, alpha=1e-6)
    assert bool(y.isfinite().all()) and bool(ld.isfinite().all())
    (y.sum() + ld.sum()).backward()
    assert bool(v.grad.isfinite().all())
    # Near 1, float32 keeps its relative accuracy (1 - v' is not computed as a difference from 1).
    near_one = 1 - torch.tensor([[1, 3, 17, 1000, 2 ** 20]], dtype=torch.float64) * 2.0 ** -24
    y32, ld32 = logit(near_one.float(), alpha=1e-6)
    y64, ld64 = logit(near_one, alpha=1e-6)
    # v is exact in float32 and 1 - v' = (1 - 2 alpha)(1 - v) + alpha keeps a few ulps of relative
    # accuracy, so each log has a few ulps absolute: y and the log-det within
    # 16 eps (|log v'| + |log(1 - v')| + 1) of the float64 values (was rtol 1e-5).
    vv = 1e-6 + (1 - 2e-6) * near_one
    size = 16 * 2.0 ** -24 * (vv.log().abs() + torch.log1p(-vv).abs() + 1)
    assert ((y32.double() - y64).abs() <= size).all() and ((ld32.double() - ld64).abs() <= size.sum(1)).all()
    # The inverse is finite far into both tails.
    v_back, ld_back = logit(torch.tensor([[-1e4, -50.0, 50.0, 1e4]]), alpha=1e-6, inverse=True)
    assert bool(v_back.isfinite().all()) and bool(ld_back.isfinite().all())


def test_logit_half_computes_in_float32():
    v = _unit(3, 7)
    y16, ld16 = logit(v.half(), alpha=1e-3)
    y32, ld32 = logit(v.half().float(), alpha=1e-3)
    assert y16.dtype == torch.float16 and ld16.dtype == torch.float32
    assert torch.equal(y16, y32.half()) and torch.equal(ld16, ld32)


# ----------------------------------------------------------------------------- dequantize_logit

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_dequantize_logit_equals_composition(dtype):
    # Bit for bit on the reference backend (the fused kernels are held to the float64 reference
    # by the 2x rule in test_preprocess_kernels.py).
    x = torch.randint(0, 256, (4, 2, 3), dtype=torch.uint8)
    noise = torch.rand(4, 2, 3, dtype=dtype)
    l0 = torch.randn(4, dtype=dtype)
    with flowkern.backend("reference"):
        y, ld = dequantize_logit(x, noise, alpha=0.01, dtype=dtype, logdet=l0)
        v, ld_v = dequantize(x, noise, dtype=dtype, logdet=l0)
        y2, ld2 = logit(v, alpha=0.01, logdet=ld_v)
        assert torch.equal(y, y2) and torch.equal(ld, ld2)
        # Drawing the noise: a seed from the generator, then the counter noise of that seed.
        y, ld = dequantize_logit(x, alpha=0.01, dtype=dtype, generator=torch.Generator().manual_seed(5))
        seed = draw_seed(torch.Generator().manual_seed(5))
        v, ld_v = dequantize(x, counter_uniform(x.shape, seed, dtype), dtype=dtype)
        y2, ld2 = logit(v, alpha=0.01, logdet=ld_v)
        assert torch.equal(y, y2) and torch.equal(ld, ld2)
        # Sampling direction: quantize(logit^-1(y)) gives the pixels back.
        back, _ = quantize(logit(y, alpha=0.01, inverse=True)[0])
        assert torch.equal(back.to(torch.uint8), x)


def test_dequantize_logit_half():
    x = torch.randint(0, 256, (3, 5), dtype=torch.uint8)
    noise = torch.rand(3, 5)
    y, ld = dequantize_logit(x, noise, alpha=1e-3, dtype=torch.float16)
    y32, ld32 = dequantize_logit(x, noise, alpha=1e-3, dtype=torch.float32)
    assert y.dtype == torch.float16 and ld.dtype == torch.float32
    assert torch.equal(y, y32.half()) and torch.equal(ld, ld32)


# ----------------------------------------------------------------------------- bits/dim

def hand_bits_per_dim(pixels, noise, alpha):
    """Bits/dim of x under Dequantize -> Logit(alpha) -> N(0, I), in plain math. Per pixel i:
        v_i = (x_i + u_i) / 256                      dequantized, in [0, 1)
        a_i = alpha + (1 - 2 alpha) v_i              squeezed into (alpha, 1 - alpha)
        y_i = ln(a_i / (1 - a_i))                    the logit, the base's variable
    log p(x + u) = sum_i [-y_i^2 / 2 - ln(2 pi) / 2]                    log N(y; 0, I)
                 + sum_i [ln(1 - 2 alpha) - ln a_i - ln(1 - a_i)]        log |dy/dv|
                 - D ln 256                                              log |dv/d(x + u)|
    bits/dim = -log p(x + u) / (D ln 2)."""
    D = len(pixels)
    log_p = -D * math.log(256)
    for x, u in zip(pixels, noise):
        v = (x + u) / 256
        a = alpha + (1 - 2 * alpha) * v
        y = math.log(a / (1 - a))
        log_p += -y * y / 2 - math.log(2 * math.pi) / 2
        log_p += math.log(1 - 2 * alpha) - math.log(a) - math.log(1 - a)
    return -log_p / (D * math.log(2))


def test_bits_per_dim_by_hand():
    alpha = 0.05
    images = [[0, 17, 128, 255], [3, 3, 200, 91]]
    noises = [[0.5, 0.25, 0.0, 0.75], [0.125, 0.9, 0.3, 0.999]]
    x = torch.tensor(images, dtype=torch.uint8).reshape(2, 2, 2)
    noise = torch.tensor(noises, dtype=torch.float64).reshape(2, 2, 2)
    base = StandardNormal((2, 2)).double()
    v, ld = dequantize(x, noise, dtype=torch.float64)
    y, ld = logit(v, alpha=alpha, logdet=ld)
    bpd = bits_per_dim(base.log_prob(y) + ld, 4)
    expected = torch.tensor([hand_bits_per_dim(p, u, alpha) for p, u in zip(images, noises)], dtype=torch.float64)
    torch.testing.assert_close(bpd, expected, rtol=1e-12, atol=0)
    y2, ld2 = dequantize_logit(x, noise, alpha=alpha, dtype=torch.float64)
    torch.testing.assert_close(bits_per_dim(base.log_prob(y2) + ld2, 4), expected, rtol=1e-12, atol=0)

    # The same through Flow, whose Dequantize draws from the global RNG: recover its noise.
    flow = Flow([Dequantize(), Logit(alpha)], base=StandardNormal((2, 2))).double()
    torch.manual_seed(11)
    log_prob = flow.log_prob(x)
    torch.manual_seed(11)
    u = (flow.layers[0](x)[0] * 256 - x.double()).reshape(2, 4).tolist()
    expected = torch.tensor([hand_bits_per_dim(p, n, alpha) for p, n in zip(images, u)], dtype=torch.float64)
    torch.testing.assert_close(bits_per_dim(log_prob, 4), expected, rtol=1e-12, atol=0)


class _UniformUnitCube(torch.nn.Module):
    """The uniform density on [0, 1)^D: log p = 0."""

    def log_prob(self, z):
        return torch.zeros(z.shape[0], dtype=torch.float64 if z.dtype == torch.float64 else torch.float32)


def test_uniform_model_is_eight_bits_per_dim():
    flow = Flow([Dequantize()], base=_UniformUnitCube())
    x = torch.randint(0, 256, (5, 3, 4, 4), dtype=torch.uint8)
    torch.testing.assert_close(bits_per_dim(flow.log_prob(x), 48), torch.full((5,), 8.0))


def test_bits_per_dim_arguments():
    torch.testing.assert_close(bits_per_dim(torch.tensor([-math.log(2) * 10]), 5), torch.tensor([2.0]))
    with pytest.raises(ValueError, match="dims"):
        bits_per_dim(torch.zeros(2), 0)
    with pytest.raises(TypeError, match="dims"):
        bits_per_dim(torch.zeros(2), 2.5)
    with pytest.raises(TypeError, match="log_prob"):
        bits_per_dim([0.0], 2)


# ----------------------------------------------------------------------------- errors

X = torch.zeros(2, 3, dtype=torch.uint8)
V = torch.full((2, 3), 0.5)


@pytest.mark.parametrize("call,error,match", [
    (lambda: dequantize(torch.rand(2, 3)), TypeError, "x_uint8 must be an integer tensor"),
    (lambda: dequantize(torch.zeros(2, 3, dtype=torch.bool)), TypeError, "x_uint8"),
    (lambda: dequantize([[0, 1]]), TypeError, "x_uint8"),
    (lambda: dequantize(torch.tensor(3, dtype=torch.uint8)), ValueError, "x_uint8 must have a batch dimension"),
    (lambda: dequantize(torch.tensor([[0, 256]], dtype=torch.int16)), ValueError, r"x_uint8 .*\[0, 255\]"),
    (lambda: dequantize(torch.tensor([[-1, 3]], dtype=torch.int16)), ValueError, r"x_uint8 .*\[0, 255\]"),
    (lambda: dequantize_logit(torch.tensor([[256]], dtype=torch.int32)), ValueError, "x_uint8"),
    (lambda: dequantize(X, torch.full((2, 3), 1.0)), ValueError, r"noise must lie in \[0, 1\)"),
    (lambda: dequantize(X, torch.full((2, 3), -0.1)), ValueError, r"noise must lie in \[0, 1\)"),
    (lambda: dequantize(X, torch.full((2, 3), float("nan"))), ValueError, "noise"),
    (lambda: dequantize(X, torch.zeros(2, 4)), ValueError, "noise must have the shape"),
    (lambda: dequantize(X, torch.zeros(2, 3, dtype=torch.int64)), TypeError, "noise"),
    (lambda: dequantize_logit(X, torch.ones(2, 3)), ValueError, "noise"),
    (lambda: dequantize(X, dtype=torch.int32), TypeError, "dtype"),
    (lambda: dequantize(X, generator=0), TypeError, "generator"),
    (lambda: dequantize(X, logdet=torch.zeros(3)), ValueError, r"logdet must have shape \(batch,\)"),
    (lambda: dequantize(X, logdet=torch.zeros(2, 1)), ValueError, "logdet"),
    (lambda: quantize(V, logdet=torch.zeros(1)), ValueError, "logdet"),
    (lambda: quantize(X), TypeError, "v must be a floating-point"),
    (lambda: logit(V, logdet=torch.zeros(5)), ValueError, "logdet"),
    (lambda: dequantize_logit(X, logdet=torch.zeros(())), ValueError, "logdet"),
    (lambda: logit(V, alpha=0.5), ValueError, r"alpha must lie in \[0, 0.5\)"),
    (lambda: logit(V, alpha=-1e-3), ValueError, "alpha"),
    (lambda: logit(V, alpha="small"), TypeError, "alpha"),
    (lambda: dequantize_logit(X, alpha=0.5), ValueError, "alpha"),
    (lambda: logit(X), TypeError, "v must be a floating-point"),
    (lambda: Logit(alpha=0.5), ValueError, "alpha"),
    (lambda: Dequantize(dtype=torch.int64), TypeError, "dtype"),
])
def test_bad_arguments(call, error, match):
    with pytest.raises(error, match=match):
        call()
