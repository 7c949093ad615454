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
from flowkern.reference.affine_coupling import SCALES, affine_coupling_merge_ref, log_scale_ref

from conftest import kernel_backends
from tolerances import (EPS, affine_scale_grad_error, check_against, check_op_roundtrip, flow_roundtrip_bound, layer_fn,
                        sum_rounding)
from test_affine_coupling import backward_path  # noqa: F401  (fixture: saved factor or recompute)



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
    with flowkern.backend(backend):
        out, ld, grads = run(affine_coupling_merge, whole, params, ld_in, w_out, w_ld, k, kept_first, **kw)
    assert out.shape == whole.shape and out.dtype == torch.float32 and ld.shape == (rows,)
    # Within the conditioned bound: 2x the float32 reference's own error plus what 8-ulp
    # perturbations of the inputs and the incoming gradients move the float64 reference, plus,
    # for sigmoid and tanh, the scale's gradient's by-design error (the kernels take d log m / ds
    # from the saved factor m: tolerances.affine_scale_grad_error, as test_properties allows).
    w64, p64 = whole.double().cpu(), params.double().cpu()
    moved = slice(k, k + n) if kept_first else slice(0, n)
    grad_error = torch.zeros_like(p64)
    if scale != "exp":
        grad_error[:, n:] = affine_scale_grad_error(w64[:, moved], p64[:, :n], p64[:, n:], kw, w_out.cpu()[:, moved],
                                                    w_ld.cpu(), EPS[torch.float32])
    # The log-det sums ld_in and the n log m's of each row, terms that may cancel: their sum's
    # rounding (tolerances.sum_rounding), which sign patterns of perturbations need not show.
    log_m = log_scale_ref(p64[:, n:], scale, 1.5).flatten(1)
    logdet_rounding = sum_rounding(torch.cat([ld_in.double().cpu()[:, None], log_m], 1), EPS[torch.float32])
    check_against("merge", lambda *a: (lambda o, l, g: (o, l, *g))(*run(affine_coupling_merge_ref, *a, k, kept_first,
                                                                        **kw)),
                  (whole.cpu(), params.cpu(), ld_in.cpu(), w_out.cpu(), w_ld.cpu()), (out, ld, *grads), torch.float32,
                  names=("out", "logdet", "grad_input", "grad_params", "grad_logdet_in"),
                  extra=(0.0, logdet_rounding, 0.0, grad_error))


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
    # On row-strided views (columns of a wider buffer): x back within y's rounding over m, the
    # kept half bit-identical, the log-dets cancelling within 64 eps (sum |log m| + 1).
    for inverse in (False, True):
        check_op_roundtrip("affine_coupling_merge", dict(kept=whole[:, :6], x=whole[:, 6:], params=params),
                           dict(scale="tanh", clamp=2.0, kept_first=True, inverse=inverse),
                           backend=backend, device=device, layout="rowslice")


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
        affine_coupling_merge(kept, x, params, scale="softsign")


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

        def forward_and_grads(m, xi):
            xi = xi.detach().requires_grad_()
            y, ld = m(xi)
            grads = torch.autograd.grad((y * y).sum() + ld.sum(), [xi, *m.parameters()])
            return (y, ld, *grads)

        with flowkern.backend(backend):
            got = forward_and_grads(layer, x)
            back, _ = layer.inverse(got[0].detach())
        # The layer on `backend` within the conditioned bound of the float64 layer (x and every
        # weight perturbed by 8 ulps); the round trip within y's rounding pulled back by the
        # layer's inverse (tolerances.flow_roundtrip_bound).
        fn, params = layer_fn(layer, forward_and_grads)
        check_against(type(layer).__name__, fn, (x.cpu(), *params), got, torch.float32, normwise=True)
        err = (back.double() - x.double()).abs().cpu()
        bound, _ = flow_roundtrip_bound(layer, x, EPS[torch.float32])
        assert (err <= bound).all(), f"round trip: worst err {err.max():.3g}, bound there {bound.flatten()[err.argmax()]:.3g}"


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
    # One pass from the output: the input rebuilt and the gradients, as functions of what the
    # pass is given (out, params and the incoming gradients), within the conditioned bound of
    # that map in float64: out's rounding pulled back by the inverse is in the perturbations
    # (instead of rtol / atol 1e-4, 1e-9 in float64). The regular backward's gx, gp the same way.
    def from_output(o, p_, g_, gld_):
        x_ = affine_coupling_merge_ref(o[:, kept_cols], o[:, moved_cols], p_,
                                       **dict(kw, inverse=not inverse))[0].detach().requires_grad_(True)
        p_ = p_.detach().requires_grad_(True)
        o2, l2 = affine_coupling_merge_ref(x_[:, kept_cols], x_[:, moved_cols], p_, **kw)
        return (x_.detach(), *torch.autograd.grad([o2, l2], [x_, p_], [g_, gld_]))

    def from_input(x_, p_, g_, gld_):
        x_, p_ = x_.detach().requires_grad_(True), p_.detach().requires_grad_(True)
        o2, l2 = affine_coupling_merge_ref(x_[:, kept_cols], x_[:, moved_cols], p_, **kw)
        return torch.autograd.grad([o2, l2], [x_, p_], [g_, gld_])

    dt = whole.dtype
    in_dtypes = (None, None, None, torch.float64 if dt == torch.float64 else torch.float32)
    extra = (0.0, 0.0, 0.0)
    if scale != "exp":  # the scale's gradient's by-design error (tolerances.affine_scale_grad_error)
        p64, x64 = params.double().cpu(), whole.double().cpu()
        err = affine_scale_grad_error(x64[:, moved_cols], p64[:, :n], p64[:, n:], kw, g.double().cpu()[:, moved_cols],
                                      gld.double().cpu(), EPS[torch.float32 if dt == torch.float32 else dt])
        extra = (0.0, 0.0, torch.cat([torch.zeros_like(err), err], 1))
    check_against("from output", from_output, (out.detach().cpu(), params.cpu(), g.cpu(), gld.cpu()),
                  (rebuilt, gx2, gp2), dt, in_dtypes=in_dtypes, names=("rebuilt", "grad_x", "grad_params"),
                  extra=extra)
    check_against("regular backward", from_input, (whole.cpu(), params.cpu(), g.cpu(), gld.cpu()), (gx, gp), dt,
                  in_dtypes=in_dtypes, names=("grad_x", "grad_params"), extra=extra[1:])
