"""The autograd plumbing every kernel-backed op shares.

An op gives three functions: run(*inputs) -> the kernel outputs (out, logdet, *extras),
save(ctx, inputs, outputs) storing what its backward needs, and backward(ctx, grad_out,
grad_logdet) -> one gradient per input. kernel_functions() wraps them in two
autograd.Functions:

- the everyday one, old-style (ctx in forward): a setup_context Function binds its arguments
  with inspect.signature on every call, ~30 us here, as much as a kernel at MNIST sizes;
- one with setup_context, used only under torch.func transforms (jacrev, vmap, grad), which
  require it; vmap reaches the kernel ops themselves, whose rules are in _vmap.py.

Both backwards are once_differentiable: the backward kernels have no derivative of their own,
so double backward raises rather than returning a wrong answer.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch.autograd.function import once_differentiable


def kernel_functions(name: str, run: Callable, save: Callable, backward: Callable):
    """(Plain, Func) autograd.Function classes over one op's kernels; see the module docstring."""

    def _backward(ctx, grad_out, grad_logdet, *_grad_extras):
        return backward(ctx, grad_out, grad_logdet)

    def _save(ctx, inputs, outputs):
        ctx.set_materialize_grads(False)  # no zero tensors for unused outputs
        save(ctx, inputs, outputs)

    def plain_forward(ctx, *inputs):
        outputs = run(*inputs)
        _save(ctx, inputs, outputs)
        return outputs[0], outputs[1]

    def func_forward(*inputs):
        return tuple(run(*inputs))

    def setup_context(ctx, inputs, output):
        if len(output) > 2:
            ctx.mark_non_differentiable(*output[2:])
        _save(ctx, inputs, output)

    # type() rather than a class statement: autograd names the backward node after the class
    # when it is created, and "AffineCouplingFunctionBackward" reads better than a generic name.
    backward_fn = staticmethod(once_differentiable(_backward))
    plain = type(name, (torch.autograd.Function,), {
        "forward": staticmethod(plain_forward), "backward": backward_fn, "__module__": __name__})
    func = type(name + "Func", (torch.autograd.Function,), {
        "forward": staticmethod(func_forward), "setup_context": staticmethod(setup_context),
        "backward": backward_fn, "generate_vmap_rule": True, "__module__": __name__})
    return plain, func


def under_functorch_or_forward_ad(*tensors: Optional[torch.Tensor]) -> bool:
    """torch.func wraps tensors so that requires_grad says nothing; forward AD has no jvp in
    these Functions and must raise rather than drop the tangents: both go through Func."""
    if torch.compiler.is_compiling():
        return False
    if torch.autograd.forward_ad._current_level >= 0:
        return True
    return any(t is not None and torch._C._functorch.is_functorch_wrapped_tensor(t) for t in tensors)


def needs_grad(*tensors: Optional[torch.Tensor]) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def eager_autograd(x: torch.Tensor) -> bool:
    """Whether eager autograd will differentiate through x here: what a layer's plain
    autograd.Function (one without setup_context or a vmap rule) needs before it replaces
    ordinary tensor ops. Under torch.compile and torch.func the ordinary ops stay."""
    return (torch.is_grad_enabled() and x.requires_grad and not torch.compiler.is_compiling()
            and not under_functorch_or_forward_ad(x))


def apply(functions, run: Callable, tensors: tuple, *inputs):
    """Runs an op through Func, Plain or (inference) the bare kernels; returns (out, logdet)."""
    plain, func = functions
    if under_functorch_or_forward_ad(*tensors):
        outputs = func.apply(*inputs)
    elif needs_grad(*tensors):
        return plain.apply(*inputs)
    else:  # sampling, evaluation: no autograd node, nothing saved
        outputs = run(*inputs)
    return outputs[0], outputs[1]


def contiguous_grads(grad_out: Optional[torch.Tensor], grad_logdet: Optional[torch.Tensor], like: torch.Tensor):
    """The incoming gradients as the kernels take them: contiguous (an expanded scalar from
    .sum() has stride 0), zeros for an unused output, None for an unused log-det."""
    grad_out = torch.zeros_like(like) if grad_out is None else grad_out.contiguous()
    return grad_out, (None if grad_logdet is None else grad_logdet.contiguous())
