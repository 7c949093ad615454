"""Second derivatives: the fused kernels have none, so a backward asked for one raises instead
of silently dropping the second-order terms (as once_differentiable alone did: autograd.grad
with inputs= routed around its error node, and a gradient that did not itself require grad
never reached it); first-order gradients, torch.func included, keep working; the reference
backend gives true second derivatives."""
from __future__ import annotations

import pytest
import torch

import flowkern
from flowkern import ops
from flowkern.models import RealNVP

SECOND = "no derivative of its own"


def _perturbed_realnvp():
    torch.manual_seed(0)
    m = RealNVP(4, layers=2, hidden=8).double()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return m


def test_input_hessian_of_a_flow_raises_on_kernels_and_works_on_the_reference():
    m = _perturbed_realnvp()
    x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    with pytest.raises(RuntimeError, match=SECOND):
        torch.autograd.grad(m.log_prob(x).sum(), x, create_graph=True)
    with flowkern.backend("reference"):
        (s,) = torch.autograd.grad(m.log_prob(x).sum(), x, create_graph=True)
        (h,) = torch.autograd.grad(s.pow(2).sum(), x)
    assert h.abs().max() > 0


def test_gradient_penalty_through_gaussian_nll_raises():
    z = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    with pytest.raises(RuntimeError, match=SECOND):
        torch.autograd.grad(ops.gaussian_nll(z).sum(), z, create_graph=True)
    with flowkern.backend("reference"):
        nll = ops.gaussian_nll(z).sum()
        (g,) = torch.autograd.grad(nll, z, create_graph=True)
        (nll + (g ** 2).sum()).backward()
    torch.testing.assert_close(z.grad, 3 * z.detach())  # d/dz (|z|^2/2 + |z|^2)


def test_nested_func_gradients_raise_first_order_func_works():
    x, t, s = (torch.randn(2, 3, dtype=torch.float64) for _ in range(3))

    def loss(s_):
        return ops.affine_coupling(x, t, s_, scale="sigmoid")[0].sum()

    g = torch.func.grad(loss)(s)
    with flowkern.backend("reference"):
        torch.testing.assert_close(g, torch.func.grad(loss)(s))
    torch.func.vmap(torch.func.grad(loss))(s.unsqueeze(0).expand(4, -1, -1))  # vmap of a first-order grad
    with pytest.raises(RuntimeError, match=SECOND):
        torch.func.jacrev(torch.func.grad(loss))(s)


def test_memory_saving_backprop_refuses_second_order():
    m = _perturbed_realnvp()
    m.memory_saving = True
    x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    with pytest.raises(RuntimeError, match=SECOND):
        torch.autograd.grad(m.log_prob(x).sum(), x, create_graph=True)
    (g,) = torch.autograd.grad(m.log_prob(x).sum(), x)  # first order still works
    assert torch.isfinite(g).all()
