"""flowkern.ops.affine_coupling_merge (a coupling layer's transform and merge in one pass) and the
layers that use it: every backend against the float64 reference, on views with row strides."""
from __future__ import annotations

import pytest
import torch

import flowkern
from flowkern.nn import AffineCoupling, ConvAffineCoupling
from flowkern.nn.coupling import split_columns
from flowkern.ops import affine_coupling_merge
from flowkern.reference import affine_coupling_ref
from flowkern.reference.affine_coupling import affine_coupling_merge_ref

from conftest import assert_close_2x, kernel_backends
from test_affine_coupling import backward_path  # noqa: F401  (fixture: saved factor or recompute)

SCALES = ("exp", "sigmoid", "tanh")


def make_inputs(rows, k, n, spatial=(), device="cpu", seed=0):
    """kept and x as the two halves of one (rows, k + n, *spatial) tensor and params as a
    (rows, 2n, *spatial) tensor: the views a coupling layer hands the op."""
    g = torch.Generator().manual_seed(seed)
    whole = torch.randn(rows, k + n, *spatial, generator=g, dtype=torch.float64)
    params = torch.randn(rows, 2 * n, *spatial, generator=g, dtype=torch.float64)
    return whole.to(device, torch.float32), params.to(device, torch.float32)


def run(fn, whole, params, ld_in, w_out, w_ld, k, kept_first, **kw):
    """Outputs and gradients of <w_out, out> + <w_ld, logdet> for the whole input, params and
    the incoming log-det; kept is the first k columns of `whole` when kept_first, else the last."""
    leaves = [a.detach().clone().requires_grad_(True) for a in (whole, params, ld_in)]
    w = leaves[0]
    if kept_first:
        kept, x = w[:, :k], w[:, k:]
    else:
        x, kept = w[:, :w.shape[1] - k], w[:, w.shape[1] - k:]
    out, ld = fn(kept, x, leaves[1], kept_first=kept_first, logdet=leaves[2], **kw)
    loss = (out.double() * w_out).sum() + (ld.double() * w_ld).sum()
    return out, ld, torch.autograd.grad(loss, leaves)


@pytest.mark.parametrize("backend,device", kernel_backends())
@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("inverse", [False, True], ids=["fwd", "inv"])
@pytest.mark.parametrize("kept_first", [True, False], ids=["kept-first", "kept-last"])
@pytest.mark.parametrize("rows,k,n,spatial", [(3, 5, 4, ()), (2, 392, 392, ()), (1, 1, 1, ()), (2, 2, 3, (3, 4))],
                         ids=["3x5+4", "2x392+392", "1x1+1", "images"])
def test_matches_reference(backend, device, scale, inverse, kept_first, rows, k, n, spatial, backward_path):
    whole, params = make_inputs(rows, k, n, spatial, device)
    ld_in = torch.randn(rows, device=device)
    w_out = torch.randn(whole.shape, dtype=torch.float64, device=device)
    w_ld = torch.randn(rows, dtype=torch.float64, device=device)
    kw = dict(scale=scale, clamp=1.5, inverse=inverse)
    ref64 = run(affine_coupling_merge_ref, whole.double(), params.double(), ld_in.double(), w_out, w_ld, k,
                kept_first, **kw)
    ref32 = run(affine_coupling_merge_ref, whole, params, ld_in, w_out, w_ld, k, kept_first, **kw)
    with flowkern.backend(backend):
        got = run(affine_coupling_merge, whole, params, ld_in, w_out, w_ld, k, kept_first, **kw)
    assert got[0].shape == whole.shape and got[0].dtype == torch.float32 and got[1].shape == (rows,)
    for name, a, b, c in [("out", got[0], ref64[0], ref32[0]), ("logdet", got[1], ref64[1], ref32[1])]:
        assert_close_2x(name, a, b, c, atol=1e-5)
    for name, a, b, c in zip(["grad_input", "grad_params", "grad_logdet_in"], got[2], ref64[2], ref32[2]):
        assert_close_2x(name, a, b, c, atol=1e-5)


def test_reference_is_the_split_transform_and_cat():
    whole, params = make_inputs(4, 3, 5)
    kept, x = whole[:, :3], whole[:, 3:]
    out, ld = affine_coupling_merge_ref(kept, x, params, kept_first=False, scale="sigmoid")
    y, ld2 = affine_coupling_ref(x, params[:, :5], params[:, 5:], scale="sigmoid")
    torch.testing.assert_close(out, torch.cat([y, kept], 1))
    torch.testing.assert_close(ld, ld2)


@pytest.mark.parametrize("backend,device", kernel_backends())
def test_inverse_undoes_forward_and_no_grad_path(backend, device):
    whole, params = make_inputs(5, 6, 7, device=device)
    with flowkern.backend(backend):
        y, ld = affine_coupling_merge(whole[:, :6], whole[:, 6:], params, scale="tanh")
        back, ld_inv = affine_coupling_merge(y[:, :6], y[:, 6:], params, scale="tanh", inverse=True)
    torch.testing.assert_close(back, whole, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ld + ld_inv, torch.zeros_like(ld), rtol=0, atol=1e-4)


def test_argument_errors():
    whole, params = make_inputs(2, 3, 4)
    kept, x = whole[:, :3], whole[:, 3:]
    with pytest.raises(ValueError, match="params must have shape"):
        affine_coupling_merge(kept, x, params[:, :7])
    with pytest.raises(ValueError, match="kept must have"):
        affine_coupling_merge(kept[:1], x, params)
    with pytest.raises(TypeError, match="params must have the dtype"):
        affine_coupling_merge(kept, x, params.double())
    with pytest.raises(ValueError, match="scale must be one of"):
        affine_coupling_merge(kept, x, params, scale="softplus")


def test_split_columns_backward_is_one_cat():
    x = torch.randn(3, 7, dtype=torch.float64, requires_grad=True)
    a, b = split_columns(x, 3)
    assert a.shape == (3, 3) and b.shape == (3, 4) and a.grad_fn is not None
    (a * 2).sum().backward()  # b unused: its gradient is zero
    torch.testing.assert_close(x.grad, torch.cat([torch.full((3, 3), 2.0), torch.zeros(3, 4)], 1).double())
    x.grad = None
    a, b = split_columns(x, 3)
    (a.sum() + (b * b).sum()).backward()
    torch.testing.assert_close(x.grad, torch.cat([torch.ones(3, 3, dtype=torch.float64), 2 * x[:, 3:].detach()], 1))


@pytest.mark.parametrize("backend,device", kernel_backends())
@pytest.mark.parametrize("kept_first", [True, False])
def test_layers_with_block_masks_match_reference_backend(backend, device, kept_first):
    """AffineCoupling with a two-block mask (RealNVP's layout) takes the merge op; outputs and
    every parameter gradient match the same layer under the reference backend."""
    torch.manual_seed(0)
    mask = torch.arange(10) < 4 if not kept_first else torch.arange(10) >= 4
    layers = [AffineCoupling(10, 16, mask=mask, scale="sigmoid"), ConvAffineCoupling(4, 8, scale="exp")]
    inputs = [torch.randn(6, 10), torch.randn(2, 4, 3, 3)]
    for layer, x in zip(layers, inputs):
        layer = layer.to(device)
        with torch.no_grad():
            for p in layer.parameters():
                p.add_(0.1 * torch.randn_like(p))
        x = x.to(device)
        results = []
        for b in ("reference", backend):
            layer.zero_grad()
            xi = x.clone().requires_grad_()
            with flowkern.backend(b):
                y, ld = layer(xi)
                ((y * y).sum() + ld.sum()).backward()
                back, _ = layer.inverse(y.detach())
            results.append([y, ld, xi.grad, back] + [p.grad.clone() for p in layer.parameters()])
        for a, b in zip(*results):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(results[1][3], x, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("backend,device", kernel_backends())
def test_inverse_with_grad_frees_its_output(backend, device):
    """The inverse saves its own output for the backward: as the whole tensor, not a slice of
    it (a slice was a reference cycle through the node, and every call leaked its output)."""
    import gc
    import weakref

    whole, params = make_inputs(4, 3, 5, device=device)
    params.requires_grad_(True)
    with flowkern.backend(backend):
        out, _ = affine_coupling_merge(whole[:, :3], whole[:, 3:], params, inverse=True)
    ref = weakref.ref(out if out._base is None else out._base)  # the node's own output
    gc.disable()
    try:
        del out
        assert ref() is None
    finally:
        gc.enable()


@pytest.mark.parametrize("backend,device", kernel_backends() + [("reference", "cpu")])
@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("inverse", [False, True], ids=["fwd", "inv"])
@pytest.mark.parametrize("kept_first", [True, False], ids=["kept-first", "kept-last"])
@pytest.mark.parametrize("rows,k,n,spatial", [(3, 5, 4, ()), (2, 2, 3, (3, 4))], ids=["3x5+4", "images"])
def test_backward_from_output(backend, device, scale, inverse, kept_first, rows, k, n, spatial):
    """One pass from the output: the input rebuilt and the same gradients as the op's backward
    from its saved input (memory-saving backprop's fused coupling step)."""
    from flowkern.ops.affine_coupling import affine_coupling_merge_backward_from_output

    whole, params = make_inputs(rows, k, n, spatial, device)
    whole, params = whole.double(), params.double()  # the reference backward's own rounding aside
    if backend == "triton":
        whole, params = whole.float(), params.float()
    g = torch.randn(whole.shape, dtype=whole.dtype, device=device)
    gld = torch.randn(rows, dtype=torch.float64 if whole.dtype == torch.float64 else torch.float32, device=device)
    kept_cols = slice(0, k) if kept_first else slice(n, n + k)
    moved_cols = slice(k, k + n) if kept_first else slice(0, n)
    kw = dict(scale=scale, clamp=1.5, inverse=inverse, kept_first=kept_first)
    x = whole.clone().requires_grad_(True)
    p = params.clone().requires_grad_(True)
    with flowkern.backend(backend):
        out, ld = affine_coupling_merge(x[:, kept_cols], x[:, moved_cols], p, **kw)
        gx, gp = torch.autograd.grad([out, ld], [x, p], [g, gld])
        rebuilt, gx2, gp2 = affine_coupling_merge_backward_from_output(g, gld, out.detach(), params, kept=k, **kw)
    tol = dict(rtol=1e-4, atol=1e-4) if whole.dtype == torch.float32 else dict(rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(rebuilt, whole, **tol)
    # grad through the transform: the kept columns get grad_out's (the conditioner's share is the caller's)
    torch.testing.assert_close(gx2, gx, **tol)
    torch.testing.assert_close(gp2, gp, **tol)
