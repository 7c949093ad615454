"""Host-side helpers every Triton op module shares."""
from __future__ import annotations

from typing import Callable, Tuple

import torch
from torch import Tensor


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
