"""Regression tests for the ops audit: each test pins the corrected behaviour of one confirmed bug.

Tiny shapes; the kernel backends available here run through conftest.kernel_backends.
"""
from __future__ import annotations

import sys

import pytest
import torch

import flowkern
from flowkern import ops

from conftest import kernel_backends

np = pytest.importorskip("numpy")

# flowkern.ops.affine_coupling is the function; the module holds the backward from the output.
affine_module = sys.modules["flowkern.ops.affine_coupling"]


# 1. vmap of dequantize_logit with counter noise: each slice gets the unbatched call's noise.

@pytest.mark.parametrize("backend,device", kernel_backends(with_reference=True))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
def test_dequantize_logit_vmap_counter_noise_per_slice(backend, device, dtype):
    if backend == "triton" and dtype == torch.float64:
        pytest.skip("the Triton kernels compute in float32 and refuse float64")
    flowkern.set_backend(backend)
    xu = torch.full((3, 2, 4), 100, dtype=torch.uint8, device=device)
    xu[1, 0, 0] = 7
    logdet = torch.randn(3, 2, device=device)
    y, ld = torch.func.vmap(lambda p, l: ops.dequantize_logit(p, seed=5, dtype=dtype, logdet=l))(xu, logdet)
    for i in range(3):
        want_y, want_ld = ops.dequantize_logit(xu[i], seed=5, dtype=dtype, logdet=logdet[i])
        assert torch.equal(y[i], want_y) and torch.equal(ld[i], want_ld)
    # Only the log-det batched: the pixels (and so the noise) are shared by every slice.
    y, _ = torch.func.vmap(lambda l: ops.dequantize_logit(xu[0], seed=5, dtype=dtype, logdet=l))(logdet)
    assert all(torch.equal(y[i], ops.dequantize_logit(xu[0], seed=5, dtype=dtype)[0]) for i in range(3))


@pytest.mark.parametrize("backend,device", kernel_backends(with_reference=True))
def test_dequantize_logit_vmap_drawn_seed_per_slice(backend, device):
    flowkern.set_backend(backend)
    xu = torch.full((3, 2, 4), 100, dtype=torch.uint8, device=device)
    torch.manual_seed(3)
    y, _ = torch.func.vmap(ops.dequantize_logit, randomness="same")(xu)
    torch.manual_seed(3)
    want, _ = ops.dequantize_logit(xu[0])
    assert all(torch.equal(y[i], want) for i in range(3))


# 2. affine_coupling_merge on an empty batch: odd strides of empty tensors reach no kernel.

@pytest.mark.parametrize("backend,device", kernel_backends(with_reference=True))
def test_affine_coupling_half_mask_empty_batch_backward(backend, device):
    flowkern.set_backend(backend)
    layer = flowkern.nn.AffineCoupling(4, hidden=8, mask="half").to(device)
    y, ld = layer(torch.randn(0, 4, device=device))
    (y.sum() + ld.sum()).backward()
    assert y.shape == (0, 4) and ld.shape == (0,)
    assert all(p.grad is not None for p in layer.parameters() if p.requires_grad)


@pytest.mark.parametrize("backend,device", kernel_backends(with_reference=True))
@pytest.mark.parametrize("inverse", [False, True])
def test_affine_coupling_merge_empty_strided_views(backend, device, inverse):
    flowkern.set_backend(backend)
    z = torch.randn(0, 12, device=device, requires_grad=True)
    params = torch.randn(0, 12, device=device, requires_grad=True)
    y, ld = ops.affine_coupling_merge(z[:, ::4], z[:, 1::4], params[:, ::2], inverse=inverse)
    assert y.shape == (0, 6) and ld.shape == (0,)
    (y.sum() + ld.sum()).backward()
    assert z.grad.shape == (0, 12) and params.grad.shape == (0, 12)


@pytest.mark.parametrize("backend,device", kernel_backends(with_reference=True))
def test_affine_coupling_merge_backward_from_output_empty_batch(backend, device):
    flowkern.set_backend(backend)
    out = torch.randn(0, 12, device=device)[:, ::2]
    params = torch.randn(0, 16, device=device)[:, ::2]
    grad_out = torch.zeros((), device=device).expand(0, 6)
    rebuilt, grad_in, grad_params = affine_module.affine_coupling_merge_backward_from_output(
        grad_out, torch.zeros(0, device=device), out, params, kept=2)
    assert rebuilt.shape == (0, 6) and grad_in.shape == (0, 6) and grad_params.shape == (0, 8)


# 3. The reference affine coupling computes half inputs in float32.

@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("scale", ["exp", "sigmoid", "tanh"])
@pytest.mark.parametrize("inverse", [False, True])
def test_affine_coupling_reference_half_computes_in_float32(dtype, scale, inverse):
    flowkern.set_backend("reference")
    g = torch.Generator().manual_seed(0)
    x, shift, raw = (torch.randn(2, 3072, generator=g).to(dtype) for _ in range(3))
    out, ld = ops.affine_coupling(x, shift, raw, scale=scale, inverse=inverse)
    want, want_ld = ops.affine_coupling(x.float(), shift.float(), raw.float(), scale=scale, inverse=inverse)
    assert out.dtype == dtype and ld.dtype == torch.float32
    assert torch.equal(out, want.to(dtype)) and torch.equal(ld, want_ld)
    # The merge reference goes through the same function.
    y, mld = ops.affine_coupling_merge(x[:, :4], x, torch.cat([shift, raw], dim=1), scale=scale, inverse=inverse)
    assert torch.equal(y[:, 4:], out) and torch.equal(mld, ld)


# 4. The reference batchnorm_flow_train's float16 gradient is finite.

def test_batchnorm_flow_train_reference_float16_gradient_finite():
    flowkern.set_backend("reference")
    torch.manual_seed(0)
    x = (torch.randn(8, 2) * 0.01).half().requires_grad_()
    out, *_ = ops.batchnorm_flow_train(x, torch.zeros(2).half(), torch.zeros(2).half())
    assert out.dtype == torch.float16
    (out.float() * 1000).sum().backward()
    # The true gradient is 0 (the outputs sum to 0 whatever x): rounding error only, no NaN.
    assert x.grad.isfinite().all() and x.grad.abs().max() < 100


# 5. NumPy booleans are flags.

@pytest.mark.parametrize("value", [np.True_, np.False_])
def test_numpy_bool_flag(value):
    x = torch.randn(2, 3)
    out, ld = ops.affine_coupling(x, x, x, inverse=value)
    want, want_ld = ops.affine_coupling(x, x, x, inverse=bool(value))
    assert torch.equal(out, want) and torch.equal(ld, want_ld)
    with pytest.raises(TypeError, match="inverse"):
        ops.affine_coupling(x, x, x, inverse=np.array([True, False]))


# 6. Wide unsigned pixels.

@pytest.mark.parametrize("dtype", [torch.uint16, torch.uint32, torch.uint64])
def test_dequantize_wide_unsigned_pixels(dtype):
    x = torch.full((2, 3), 7, dtype=dtype)
    y, ld = ops.dequantize_logit(x, seed=1)
    want_y, want_ld = ops.dequantize_logit(x.to(torch.uint8), seed=1)
    assert torch.equal(y, want_y) and torch.equal(ld, want_ld)
    v, _ = ops.dequantize(x, torch.full((2, 3), 0.5))
    assert torch.equal(v, torch.full((2, 3), 7.5 / 256))
    with pytest.raises(ValueError, match="x_uint8"):
        ops.dequantize_logit(torch.full((2, 3), 300, dtype=dtype), seed=1)
    with pytest.raises(ValueError, match="x_uint8"):
        ops.dequantize(torch.full((2, 3), 256, dtype=dtype))


# 7. additive_coupling returns a new log-det tensor.

@pytest.mark.parametrize("inverse", [False, True])
def test_additive_coupling_returns_new_logdet(inverse):
    x = torch.randn(2, 3)
    logdet = torch.randn(2)
    _, ld = ops.additive_coupling(x, x, inverse=inverse, logdet=logdet)
    assert ld is not logdet and ld.data_ptr() != logdet.data_ptr()
    assert torch.equal(ld, logdet)


# 8. Scalars too large for a float raise ValueError naming the argument.

@pytest.mark.parametrize("name,call", [
    ("clamp", lambda v: ops.affine_coupling(*(torch.randn(2, 3) for _ in range(3)), clamp=v)),
    ("clamp", lambda v: ops.affine_coupling_merge(torch.randn(2, 1), torch.randn(2, 3), torch.randn(2, 6), clamp=v)),
    ("bound", lambda v: ops.rq_spline(torch.randn(2, 3), torch.randn(2, 3, 23), bins=8, bound=v)),
    ("eps", lambda v: ops.batchnorm_flow(torch.randn(2, 3), *(torch.rand(3) for _ in range(4)), eps=v)),
    ("eps", lambda v: ops.batchnorm_flow_train(torch.randn(2, 3), torch.zeros(3), torch.zeros(3), eps=v)),
    ("alpha", lambda v: ops.logit(torch.rand(2, 3), alpha=v)),
    ("alpha", lambda v: ops.dequantize_logit(torch.zeros(2, 3, dtype=torch.uint8), seed=1, alpha=v)),
])
@pytest.mark.parametrize("value", [10 ** 400, -10 ** 400], ids=["1e400", "-1e400"])
def test_huge_int_scalar_is_value_error(name, call, value):
    with pytest.raises(ValueError, match=name):
        call(value)
