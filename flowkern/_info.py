"""flowkern.info(): what this installation runs on, for bug reports and for checking a build.

    >>> print(flowkern.info())
    flowkern 0.1.0, torch 2.14.1+cu130, Python 3.11.7
    CPU kernels      AVX2 (built: DEFAULT, AVX2, AVX512; this CPU runs: DEFAULT, AVX2)
    ...
"""
from __future__ import annotations

import dataclasses
import importlib.util
import platform
from typing import Optional, Tuple

import torch

from . import _backend, _ext


@dataclasses.dataclass(frozen=True)
class Info:
    """The build and the machine as flowkern sees them (see flowkern.info())."""
    version: str
    torch: str
    python: str
    machine: str                          # platform.machine(): x86_64, aarch64, ...
    cpu_capability: Optional[str]         # the CPU kernels' vector ISA in use; None: not loaded
    cpu_capabilities_built: Tuple[str, ...]
    cpu_capabilities_host: Tuple[str, ...]  # those this CPU can run
    cpu_capability_override: Optional[str]  # FLOWKERN_CPU_CAPABILITY at import, if set
    cuda_kernels: bool                    # the extension holds the CUDA kernels
    cuda_devices: Tuple[str, ...]         # visible CUDA devices
    triton: Optional[str]                 # triton's version, None when not installed
    triton_interpreted: bool              # TRITON_INTERPRET=1 (Triton on the CPU)
    backends: Tuple[str, ...]             # flowkern.available_backends()
    backend: str                          # the current backend
    unavailable_reason: Optional[str]     # why the compiled kernels are not loaded

    def __str__(self) -> str:
        def listed(items):
            return ", ".join(items) if items else "none"

        if self.cpu_capability is not None:
            cpu = (f"{self.cpu_capability} (built: {listed(self.cpu_capabilities_built)}; "
                   f"this CPU runs: {listed(self.cpu_capabilities_host)})")
        else:
            cpu = f"not loaded: {self.unavailable_reason}"
        if self.cpu_capability_override:
            cpu += f"; {_ext.ENV_VAR}={self.cpu_capability_override}"
        cuda = "built" if self.cuda_kernels else "not built"
        cuda += f"; devices: {listed(self.cuda_devices)}"
        triton = "not installed" if self.triton is None else self.triton + (
            " (TRITON_INTERPRET=1: on the CPU)" if self.triton_interpreted else "")
        rows = [("CPU kernels", cpu), ("CUDA kernels", cuda), ("Triton", triton),
                ("backends", f"{listed(self.backends)}; current: {self.backend}")]
        head = f"flowkern {self.version}, torch {self.torch}, Python {self.python}, {self.machine}"
        return "\n".join([head] + [f"{k:<13} {v}" for k, v in rows])


def _triton_version() -> Optional[str]:
    if importlib.util.find_spec("triton") is None:
        return None
    from importlib import metadata
    try:
        return metadata.version("triton")
    except metadata.PackageNotFoundError:
        return "installed"


def info() -> Info:
    """What flowkern runs on here: the CPU kernels' vector ISA (and which were built), the CUDA
    kernels, Triton, and the backends available. print() it for a readable summary."""
    from . import __version__

    devices = tuple(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())) \
        if torch.cuda.is_available() else ()
    return Info(
        version=__version__, torch=torch.__version__, python=platform.python_version(),
        machine=platform.machine(), cpu_capability=_ext.cpu_capability(),
        cpu_capabilities_built=_ext.built_capabilities(), cpu_capabilities_host=_ext.host_capabilities(),
        cpu_capability_override=_ext.requested_capability(), cuda_kernels=_ext.with_cuda(),
        cuda_devices=devices, triton=_triton_version(), triton_interpreted=_backend._triton_interpreted(),
        backends=tuple(_backend.available_backends()), backend=_backend.get_backend(),
        unavailable_reason=_ext.UNAVAILABLE_REASON)
