"""Host-side helpers every Triton op module shares."""
from __future__ import annotations

import functools
from typing import Callable, Tuple

import torch
from torch import Tensor


def on_input_device(fn: Callable) -> Callable:
    """Runs a Triton op's entry point with its first CUDA tensor's device current. Triton
    launches on the current device and its stream, not the tensors' (the compiled C++ ops have
    a device guard; a Python op has none): tensors on cuda:1 while cuda:0 is current would fail
    to launch, or with peer access run on the wrong GPU. Eager only: under torch.compile the
    generated code guards its own launches."""

    @functools.wraps(fn)
    def guarded(*args, **kwargs):
        if not torch.compiler.is_compiling():
            for a in args:
                if isinstance(a, Tensor) and a.is_cuda:
                    if a.device.index is not None and a.device.index != torch.cuda.current_device():
                        with torch.cuda.device(a.device):
                            return fn(*args, **kwargs)
                    break
        return fn(*args, **kwargs)

    return guarded


def rows_cols(x: Tensor) -> Tuple[int, int]:
    """(rows, elements per row) of x viewed as (B, N); with B == 0 the per-row size still
    follows the shape (there is no row to divide by)."""
    cols = 1
    for d in x.shape[1:]:
        cols *= d
    return x.shape[0], cols


def logdet_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def interpreted(kernel) -> bool:
    """Whether `kernel` runs under TRITON_INTERPRET=1."""
    try:
        from triton.runtime.interpreter import InterpretedFunction
    except ImportError:
        return False
    return isinstance(kernel, InterpretedFunction)


def register_interpreter_fakes(kernel, op_fakes: list[tuple[object, Callable]]) -> None:
    """Shape-only fakes for triton_ops whose kernels are interpreted.

    triton_op uses the op body itself as the fake (meta) kernel: on a GPU, wrap_triton turns
    the launch into a traceable higher-order op that does nothing on fake tensors. Under
    TRITON_INTERPRET=1, wrap_triton hands back the interpreted kernel unchanged, which then
    tries to read the fake tensors' data and fails, so FakeTensor/meta propagation (opcheck,
    torch.compile's shape pass) needs a shape-only fake. torch.compile still cannot trace the
    interpreted kernels (it decomposes the body into them); that needs a real GPU.
    """
    if interpreted(kernel):
        for op, fake in op_fakes:
            op.register_fake(fake)
