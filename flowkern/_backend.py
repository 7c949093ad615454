"""Which implementation runs a flowkern op.

    "reference"  the pure-PyTorch definitions in flowkern.reference (autograd does the backward)
    "cpu"        the compiled C++ kernels (flowkern._C) on CPU tensors
    "cuda"       the compiled CUDA kernels (flowkern._C built with CUDA) on CUDA tensors
    "triton"     the Triton kernels (CUDA tensors; CPU tensors under TRITON_INTERPRET=1)
    "auto"       the compiled op when it is built for the tensors' device, else Triton for
                 CUDA tensors, else the reference

Choose with flowkern.set_backend(name), the context manager flowkern.backend(name), or the
environment variable FLOWKERN_BACKEND (read once, at import). Asking for a backend that is not
available raises BackendUnavailable; nothing falls back silently.
"""
from __future__ import annotations

import contextlib
import importlib.util
import os
from typing import Iterator

import torch

from . import _ext

BACKENDS = ("auto", "reference", "cpu", "cuda", "triton")


class BackendUnavailable(RuntimeError):
    """The requested backend cannot run here (not built, no GPU, no Triton)."""


def _triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def _triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def why_unavailable(name: str) -> str | None:
    """None when backend `name` can run on this machine, else the reason it cannot."""
    if name in ("auto", "reference"):
        return None
    if name == "cpu":
        return None if _ext.available() else _ext.UNAVAILABLE_REASON
    if name == "cuda":
        if not _ext.available():
            return _ext.UNAVAILABLE_REASON
        if not _ext.with_cuda():
            return "flowkern._C was built without CUDA kernels (FLOWKERN_CUDA=1 forces them)"
        if not torch.cuda.is_available():
            return "no CUDA device is visible"
        return None
    if name == "triton":
        if not _triton_installed():
            return "triton is not installed"
        if not (torch.cuda.is_available() or _triton_interpreted()):
            return "Triton needs a CUDA device, or TRITON_INTERPRET=1 (set before import) to run on the CPU"
        return None
    raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")


def available_backends() -> list[str]:
    """The backends that can run here, "auto" and "reference" included."""
    return [b for b in BACKENDS if why_unavailable(b) is None]


def _validated(name: str) -> str:
    if not isinstance(name, str):
        raise TypeError(f"backend must be a string, one of {BACKENDS}; got {type(name).__name__}")
    name = name.lower()
    reason = why_unavailable(name)
    if reason is not None:
        raise BackendUnavailable(f"backend {name!r} is not available: {reason}")
    return name


_current = _validated(os.environ.get("FLOWKERN_BACKEND", "auto") or "auto")


def set_backend(name: str) -> None:
    """Select the implementation of every flowkern op from now on."""
    global _current
    _current = _validated(name)


def get_backend() -> str:
    return _current


@contextlib.contextmanager
def backend(name: str) -> Iterator[str]:
    """with flowkern.backend("reference"): ... runs the block on that backend."""
    global _current
    previous, _current = _current, _validated(name)
    try:
        yield _current
    finally:
        _current = previous


def resolve(device: torch.device) -> str:
    """The implementation for tensors on `device`: "compiled", "triton" or "reference"."""
    name = _current
    if name == "reference":
        return "reference"
    if name == "auto":
        if _ext.available() and (device.type == "cpu" or (device.type == "cuda" and _ext.with_cuda())):
            return "compiled"
        if device.type == "cuda" and _triton_installed():
            return "triton"
        return "reference"
    if name in ("cpu", "cuda"):
        if device.type != name:
            raise BackendUnavailable(f"backend {name!r} runs on {name} tensors, got tensors on {device}")
        return "compiled"
    if device.type != "cuda" and not _triton_interpreted():
        raise BackendUnavailable(f"backend 'triton' needs CUDA tensors (or TRITON_INTERPRET=1), got {device}")
    return "triton"


def resolve_op(device: torch.device, dtype: torch.dtype, op: str) -> str:
    """resolve(device) for the kernels of op `op` (its forward's name in flowkern._C) on tensors
    of `dtype`. "auto" falls back where those kernels cannot run: an extension built before `op`
    (Triton on CUDA, else the reference), and float64 on Triton, which computes in float32 (the
    reference). An explicit backend raises instead: nothing falls back silently."""
    impl = resolve(device)
    if impl == "compiled" and not _ext.has_op(op):
        if _current != "auto":
            raise BackendUnavailable(f"backend {_current!r}: flowkern._C has no {op} kernel; rebuild it")
        impl = "triton" if device.type == "cuda" else "reference"
    if impl == "triton" and dtype == torch.float64:
        if _current == "triton":
            raise TypeError("the Triton kernels compute in float32; for float64 use backend 'cpu', 'cuda' "
                            "or 'reference'")
        impl = "reference"
    return impl


# The compiled CPU kernels are float32/float64; CUDA and Triton take the half types themselves.
CPU_KERNEL_DTYPES = (torch.float32, torch.float64)


def kernel_dtype(impl: str, device: torch.device, dtype: torch.dtype) -> torch.dtype:
    """The dtype an op's kernels compute `dtype` data in on `device`: float32 for the half types
    on the compiled CPU kernels (the op rounds its result once), else `dtype` itself."""
    if impl == "compiled" and device.type == "cpu" and dtype not in CPU_KERNEL_DTYPES:
        return torch.float32
    return dtype


def kernel_inputs(dtype: torch.dtype, *tensors: torch.Tensor):
    """The tensors as the kernels take them: `dtype`, contiguous (no call when they already are:
    at MNIST sizes these ops take tens of microseconds, and each .to() costs one or two)."""
    return tuple(t if t.dtype == dtype and t.is_contiguous() else t.to(dtype).contiguous() for t in tensors)
