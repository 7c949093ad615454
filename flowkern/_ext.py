"""Loads the compiled extension flowkern._C, when it was built and this CPU can run it.

setup.py compiles the CPU kernels for the build machine's vector ISA and records it in
flowkern/_build_info.py. Importing an AVX-512 build on a CPU without AVX-512 would die on an
illegal instruction, so the check happens here, before the import.
"""
from __future__ import annotations

import functools
import warnings
from typing import Optional

import torch

_ISA_RANK = {"DEFAULT": 0, "AVX2": 1, "AVX512": 2}


def _host_isa_rank() -> int:
    cpu = getattr(torch, "cpu", None)
    if cpu is not None and hasattr(cpu, "_is_avx512_supported"):
        if cpu._is_avx512_supported():
            return 2
        return 1 if cpu._is_avx2_supported() else 0
    return _ISA_RANK.get(torch.backends.cpu.get_cpu_capability().upper(), 0)


def _load():
    """Returns (module or None, reason it is missing or None)."""
    try:
        from . import _build_info
    except ImportError:
        return None, "flowkern was not built (run `pip install --no-build-isolation -e .`)"
    if _build_info.CPU_CAPABILITY is None:
        return None, "flowkern was installed without its extension (FLOWKERN_NO_EXT=1)"
    if _ISA_RANK.get(_build_info.CPU_CAPABILITY, 0) > _host_isa_rank():
        reason = (f"flowkern._C was built for {_build_info.CPU_CAPABILITY} and this CPU lacks it; "
                  "rebuild on this machine (or set FLOWKERN_CPU_CAPABILITY=AVX2/DEFAULT when building)")
        warnings.warn(reason + "; using the reference/Triton backends", RuntimeWarning, stacklevel=3)
        return None, reason
    try:
        from . import _C
    except ImportError as exc:
        reason = f"flowkern._C failed to import: {exc}"
        warnings.warn(reason + "; using the reference/Triton backends", RuntimeWarning, stacklevel=3)
        return None, reason
    return _C, None


_C, UNAVAILABLE_REASON = _load()


def available() -> bool:
    return _C is not None


def with_cuda() -> bool:
    return _C is not None and bool(_C.with_cuda)


@functools.lru_cache(maxsize=None)
def _has_op(name: str) -> bool:
    return _C is not None and torch._C._dispatch_has_kernel_for_dispatch_key(f"flowkern::{name}", "CPU")


@torch.compiler.assume_constant_result  # fixed once the library is loaded: torch.compile folds it
def has_op(name: str) -> bool:
    """Whether the loaded extension registered flowkern::<name> (an older build may lack it)."""
    return _has_op(name)


def module() -> Optional[object]:
    return _C
