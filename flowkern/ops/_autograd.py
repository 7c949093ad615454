"""The autograd plumbing every kernel-backed op shares.

An op gives three functions: run(*inputs) -> the kernel outputs (out, logdet, *extras),
save(ctx, inputs, outputs) storing what its backward needs, and backward(ctx, grad_out,
grad_logdet) -> one gradient per input. kernel_functions() wraps them in two
autograd.Functions:

- the everyday one, old-style (ctx in forward): a setup_context Function binds its arguments
  with inspect.signature on every call, ~30 us here, as much as a kernel at MNIST sizes;
- one with setup_context, used only under torch.func transforms (jacrev, vmap, grad), which
  require it; vmap reaches the kernel ops themselves, whose rules are in _vmap.py.

The backward kernels have no derivative of their own, so a backward asked for one raises
(second_order_error) rather than returning a wrong answer: under create_graph=True (a gradient
penalty, a Hessian-vector product) and inside nested torch.func gradient transforms
(jacrev(grad(f))). once_differentiable alone is not enough: it raises only when the incoming
gradient itself requires grad, and autograd.grad(..., inputs=...) can route around its error
node, both of which silently dropped the second-order terms.
"""
from __future__ import annotations

import functools
from typing import Callable, Optional

import torch
from torch.autograd.function import once_differentiable


_DIFFERENTIATING = ("TransformType.Grad", "TransformType.Jvp")


def second_order_error(name: str) -> None:
    """Raises if this backward's own result is to be differentiated: eager autograd with
    create_graph=True (grad mode on inside a backward outside torch.func), or two or more
    gradient transforms of torch.func active around it. First-order torch.func.grad / jacrev
    (one Grad level, vmaps allowed) passes. Not checked while torch.compile traces the backward
    (Dynamo cannot trace the interpreter stack; AOTAutograd differentiates once)."""
    if torch.compiler.is_compiling():
        return
    stack = torch._C._functorch.get_interpreter_stack()
    if stack is None:
        higher = torch.is_grad_enabled()
    else:
        higher = sum(str(i.key()) in _DIFFERENTIATING for i in stack) >= 2
    if higher:
        raise RuntimeError(
            f"flowkern: {name}'s fused backward kernel has no derivative of its own, and this backward was asked "
            "for one (create_graph=True, e.g. a gradient penalty or a Hessian-vector product, or nested "
            "torch.func gradients). Run that code under flowkern.backend('reference'), whose ops are plain "
            "differentiable PyTorch; first-order gradients work on every backend.")


def first_order_backward(name: str) -> Callable:
    """Decorates an autograd.Function backward whose kernels have no derivative: it raises
    (second_order_error) when asked for one, checked before once_differentiable turns grad mode
    off, and otherwise runs once_differentiable."""

    def wrap(fn: Callable) -> Callable:
        inner = once_differentiable(fn)

        @functools.wraps(fn)
        def backward(ctx, *grads):
            second_order_error(name)
            return inner(ctx, *grads)

        return backward

    return wrap


def kernel_functions(name: str, run: Callable, save: Callable, backward: Callable):
    """(Plain, Func) autograd.Function classes over one op's kernels; see the module docstring."""

    @first_order_backward(name)
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
    backward_fn = staticmethod(_backward)
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
    return functorch_wrapped(*tensors)


def functorch_wrapped(*tensors: Optional[torch.Tensor]) -> bool:
    """Whether any of the tensors is a torch.func (vmap, grad, jacrev) wrapper."""
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
