"""flowkern: fused kernels for normalizing flows.

    import flowkern
    flow = flowkern.models.RealNVP(features=784, layers=8)
    loss = -flow.log_prob(x).mean()
    with flowkern.backend("reference"): ...   # or flowkern.set_backend("cpu" | "cuda" | "triton" | "auto")
    print(flowkern.info())                    # the CPU kernels' ISA, CUDA, Triton, the backends
    model = flowkern.accelerate(model)        # an nflows / zuko model on the fused kernels
"""
from . import interop, models, nn, ops, reference
from ._info import Info, info
from ._backend import BACKENDS, BackendUnavailable, available_backends, backend, get_backend, set_backend
from .interop import accelerate
from .nn import Flow, StandardNormal

__version__ = "0.1.0"
__all__ = [
    "BACKENDS", "BackendUnavailable", "Flow", "accelerate", "Info", "StandardNormal", "available_backends", "backend", "get_backend",
    "info", "interop",
    "models", "nn", "ops", "reference", "set_backend",
]
