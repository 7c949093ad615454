"""The contract every flowkern layer keeps, as reusable checks (used by the per-layer tests).

A layer maps data -> latent with forward(x, context=None, logdet=None) -> (y, logdet) and back
with inverse(y, context=None, logdet=None) -> (x, logdet); logdet is the running log|det J|
of the direction taken, shape (batch,), added to the logdet passed in.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from tolerances import check_flow_roundtrip


def check_round_trip(layer, x, context=None, exact=False):
    """inverse(forward(x)) == x, and the two log-dets are negatives of each other: bit for bit
    where the layer only moves values (exact=True: permutations, reshapes), else within the
    intermediates' rounding pulled back through the layers before them, computed in float64
    (tolerances.check_flow_roundtrip), not within a hand-set atol."""
    if not exact:
        return check_flow_roundtrip(layer, x, context)
    y, ld = layer(x, context)
    x2, ld_inv = layer.inverse(y, context)
    assert y.shape[0] == x.shape[0] and ld.shape == (x.shape[0],)
    torch.testing.assert_close(x2, x, rtol=0, atol=0)
    torch.testing.assert_close(ld_inv, -ld, rtol=0, atol=0)
    return y, ld


def check_running_logdet(layer, x, context=None):
    """forward(x, logdet=l0) adds into l0."""
    l0 = torch.randn(x.shape[0], dtype=torch.float64 if x.dtype == torch.float64 else torch.float32)
    _, ld = layer(x, context)
    _, ld_acc = layer(x, context, l0)
    torch.testing.assert_close(ld_acc, ld + l0)


def check_logdet_jacobian(layer, x, context=None):
    """The log-det equals log|det J| of the map, per row, in float64 (torch.func.jacrev).
    x: (B, ...) float64 with a small number of features per row.

    The bound, in float64 (eps = 2^-53): slogdet's LU is backward stable, det of J + dJ with
    |dJ| <= n eps |J| per entry (x 4 for jacrev's own rounding of J), which moves log|det| by
    |tr(J^-1 dJ)| <= n * 4 n eps |J| |J^-1| = 4 n^2 eps cond(J); the layer's log-det sums n log
    terms of O(1 + |log-det|): 64 eps (n + |log-det|) (tolerances' row rule)."""
    layer = layer.double()
    n = x[0].numel()
    eps = 2.0 ** -53
    for i in range(x.shape[0]):
        xi = x[i:i + 1]
        ci = None if context is None else context[i:i + 1]

        def f(v, ci=ci):
            return layer(v.reshape(xi.shape), ci)[0].reshape(-1)

        jac = torch.func.jacrev(f)(xi.reshape(-1))
        assert jac.shape == (n, n), f"the layer changed the number of features: {tuple(jac.shape)}"
        _, ld = layer(xi, ci)
        want = torch.linalg.slogdet(jac).logabsdet
        bound = 4 * n * n * eps * torch.linalg.cond(jac) + 64 * eps * (n + want.abs())
        err = (ld[0] - want).abs()
        assert err <= bound, f"row {i}: log-det {ld[0].item()!r} vs log|det J| {want.item()!r}: {err:.3g} > {bound:.3g}"


def check_gradcheck(layer, x, context=None):
    """torch.autograd.gradcheck of the output and the log-det, in float64, w.r.t. x and params."""
    layer = layer.double()
    x = x.double().detach().requires_grad_()

    def f(v):
        y, ld = layer(v, context)
        return y, ld

    assert torch.autograd.gradcheck(f, (x,), eps=1e-6, atol=1e-5)
    params = [p for p in layer.parameters() if p.requires_grad]
    if params:
        y, ld = layer(x, context)
        loss = (y * torch.randn_like(y)).sum() + ld.sum()
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        assert any(g is not None for g in grads), "no parameter gets a gradient"


def check_batch_sizes(layer, event_shape, context_features: int = 0, dtype=torch.float32):
    """Batches of 0 and 1 go through forward, inverse and backward."""
    for b in (0, 1):
        x = torch.randn(b, *event_shape, dtype=dtype, requires_grad=True)
        ctx = torch.randn(b, context_features, dtype=dtype) if context_features else None
        y, ld = layer(x, ctx)
        assert ld.shape == (b,)
        (y.sum() + ld.sum()).backward()
        assert x.grad.shape == x.shape
        x2, _ = layer.inverse(y.detach(), ctx)
        assert x2.shape == x.shape


def standard_normal_logpdf(z: torch.Tensor) -> torch.Tensor:
    z = z.reshape(z.shape[0], -1).double()
    return -0.5 * (z ** 2).sum(1) - 0.5 * z.shape[1] * math.log(2 * math.pi)


def perturb_(module: torch.nn.Module, scale: float = 0.3, seed: int = 0) -> torch.nn.Module:
    """Random non-zero weights everywhere (a fresh coupling is the identity, which tests little)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * scale)
    return module
