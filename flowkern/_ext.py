"""Loads flowkern's compiled extensions: flowkern._C (the op schemas, and the CUDA kernels when
built with them), then the CPU kernels of the best vector ISA this CPU runs.

setup.py compiles the CPU kernels once per capability (DEFAULT, AVX2, AVX512 on x86-64) into
flowkern._cpu_<capability> and records which in flowkern/_build_info.py. At import this module
picks the highest built capability the running CPU supports, as ATen does for its own kernels;
the environment variable FLOWKERN_CPU_CAPABILITY (read once, at import; like ATen's
ATEN_CPU_CAPABILITY) forces a lower one. A capability module is imported only when the CPU has
every instruction set it was compiled for, so no build dies of an illegal instruction.
"""
from __future__ import annotations

import functools
import importlib
import os
import warnings
from typing import Optional, Tuple

import torch

# Lowest first. Each capability's instruction sets as torch.cpu.get_capabilities() names them:
# exactly the -m flags setup.py compiles it with.
CAPABILITIES = ("DEFAULT", "AVX2", "AVX512")
_REQUIRES = {
    "DEFAULT": (),
    "AVX2": ("avx2", "fma3"),
    "AVX512": ("avx512_f", "avx512_bw", "avx512_vl", "avx512_dq", "avx2", "fma3"),
}
ENV_VAR = "FLOWKERN_CPU_CAPABILITY"


def host_capabilities() -> Tuple[str, ...]:
    """The capabilities this CPU can run, lowest first."""
    get = getattr(torch.cpu, "get_capabilities", None)
    if get is None:  # an older torch: its own dispatch's view of the CPU
        best = torch.backends.cpu.get_cpu_capability().upper()
        rank = CAPABILITIES.index(best) if best in CAPABILITIES else 0
        return CAPABILITIES[:rank + 1]
    have = get()
    return tuple(c for c in CAPABILITIES if all(have.get(flag, False) for flag in _REQUIRES[c]))


def choose(built, host, requested: Optional[str]) -> Tuple[Optional[str], Optional[str]]:
    """(capability to load or None, a warning or None) from the capabilities built, those the
    host runs, and the override (None, or FLOWKERN_CPU_CAPABILITY's value)."""
    usable = [c for c in CAPABILITIES if c in built and c in host]
    if not usable:
        return None, None
    note = None
    if requested is not None and requested.strip():
        want = requested.strip().upper()
        if want not in CAPABILITIES:
            note = (f"{ENV_VAR}={requested!r} is not one of {', '.join(CAPABILITIES)}; "
                    f"using {usable[-1]}")
        else:
            capped = [c for c in usable if CAPABILITIES.index(c) <= CAPABILITIES.index(want)]
            if not capped:
                note = f"{ENV_VAR}={want}: nothing at or below it is built; using {usable[0]}"
                return usable[0], note
            if capped[-1] != want:
                note = (f"{ENV_VAR}={want}: " + ("this CPU lacks it" if want in built else "not built")
                        + f"; using {capped[-1]}")
            return capped[-1], note
    return usable[-1], note


class _Loaded:
    def __init__(self):
        self.core = None            # flowkern._C
        self.cpu = None             # flowkern._cpu_<capability>
        self.capability = None      # the capability loaded
        self.built: Tuple[str, ...] = ()
        self.requested = os.environ.get(ENV_VAR) or None  # the override, as read at import
        self.reason: Optional[str] = None


def _fall_back(state: _Loaded, reason: str) -> _Loaded:
    """The extension is there but unusable: say why, once, and run the reference/Triton backends."""
    state.reason = reason
    warnings.warn(reason + "; using the reference/Triton backends", RuntimeWarning, stacklevel=4)
    return state


def _load() -> _Loaded:
    state = _Loaded()
    try:
        from . import _build_info
    except ImportError:
        state.reason = "flowkern was not built (run `pip install --no-build-isolation -e .`)"
        return state
    state.built = tuple(getattr(_build_info, "CPU_CAPABILITIES", ()))
    if not state.built and hasattr(_build_info, "CPU_CAPABILITY"):  # one-ISA builds before the dispatch
        reason = ("flowkern's extension was built by an older setup.py (one CPU ISA, no dispatch); "
                  "rebuild it: `pip install --no-build-isolation --no-deps -e .`")
        return _fall_back(state, reason)
    if not state.built:
        state.reason = "flowkern was installed without its extension (FLOWKERN_NO_EXT=1)"
        return state
    capability, note = choose(state.built, host_capabilities(), state.requested)
    if note:
        warnings.warn(note, RuntimeWarning, stacklevel=3)
    if capability is None:
        reason = (f"flowkern's CPU kernels were built for {', '.join(state.built)} only, and this CPU "
                  "runs none of them; rebuild with FLOWKERN_BUILD_CAPABILITIES unset")
        return _fall_back(state, reason)
    try:
        state.core = importlib.import_module("flowkern._C")
        state.cpu = importlib.import_module(f"flowkern._cpu_{capability.lower()}")
    except ImportError as exc:
        state.core = state.cpu = None
        return _fall_back(state, f"flowkern's extension failed to import: {exc}")
    state.capability = capability
    return state


_STATE = _load()
_C = _STATE.core
UNAVAILABLE_REASON = _STATE.reason


def available() -> bool:
    return _STATE.cpu is not None


def with_cuda() -> bool:
    return _C is not None and bool(_C.with_cuda)


def cpu_capability() -> Optional[str]:
    """The vector ISA of the CPU kernels in use (DEFAULT, AVX2, AVX512), or None."""
    return _STATE.capability


def built_capabilities() -> Tuple[str, ...]:
    return _STATE.built


def requested_capability() -> Optional[str]:
    """FLOWKERN_CPU_CAPABILITY as it was at import (None when unset)."""
    return _STATE.requested


@functools.lru_cache(maxsize=None)
def _has_op(name: str) -> bool:
    return available() and torch._C._dispatch_has_kernel_for_dispatch_key(f"flowkern::{name}", "CPU")


@torch.compiler.assume_constant_result  # fixed once the library is loaded: torch.compile folds it
def has_op(name: str) -> bool:
    """Whether the loaded extension registered flowkern::<name> (an older build may lack it)."""
    return _has_op(name)


def module() -> Optional[object]:
    return _C
