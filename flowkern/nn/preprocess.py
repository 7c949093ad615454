"""Preprocessing layers for 8-bit images: DequantizeLogit (fused), Dequantize, Logit, and bits_per_dim.

A flow over images starts Flow([DequantizeLogit(alpha), ...], base=StandardNormal(shape)), the
fused form of Flow([Dequantize(), Logit(alpha), ...]) (the ready-made models use it):

    Dequantize   x in {0, ..., 255}^D  ->  v = (x + u) / 256,  u ~ U[0, 1)^D fresh each call,
                 log-det -D log 256 per row
    Logit        v -> y = logit(alpha + (1 - 2 alpha) v), with its log-det

With these log-dets Flow.log_prob(x) is the log-density of the dequantized image x + u on the
pixel scale [0, 256)^D. Its expectation over u is the Theis et al. (2016) lower bound on the
discrete log P(x), and bits_per_dim(log_prob, D) = -log_prob / (D ln 2) is the bits/dim papers
report for 8-bit data (a uniform model scores exactly 8). Sampling runs the other way:
Logit.inverse, then Dequantize.inverse quantizes to float pixel values (.to(torch.uint8)).
DequantizeLogit does both steps in one kernel each way; its noise is counter-based (a hash of a
seed drawn from torch's global RNG and the element index, generated inside the kernel).
"""
from __future__ import annotations

import math
import operator
from typing import Optional, Tuple

import torch

from ..ops.dequantize import (check_alpha, check_dtype, dequantize, dequantize_logit, dequantize_logit_inverse, logit,
                              quantize)
from .flow import FlowLayer


class Dequantize(FlowLayer):
    """Uniform dequantization of integer pixels (B, ...) in [0, 255] (uint8 preferred).

    forward(x) -> (v, logdet): v = (x + u) / 256 with fresh u ~ U[0, 1) from torch's global RNG
    (seed it with torch.manual_seed), logdet = -D log 256 added to the running one.
    inverse(v) -> (x, logdet): x = clamp(floor(256 v), 0, 255) as float pixel values in v's
    dtype, logdet = +D log 256. Context is ignored.

    The output dtype is `dtype` (default: torch.get_default_dtype(), as a parameter's) and
    follows module casts like a parameter would
    (Flow(...).double() makes it float64), so the layers after it get the dtype they expect.
    """

    def __init__(self, dtype: Optional[torch.dtype] = None):
        super().__init__()
        dtype = torch.get_default_dtype() if dtype is None else dtype  # as a parameter would be
        check_dtype(dtype)
        # Holds no value: a floating buffer that .double()/.half()/.to(dtype) convert, so the
        # output dtype moves with the rest of the flow.
        self.register_buffer("_dtype_anchor", torch.zeros((), dtype=dtype), persistent=False)

    @property
    def dtype(self) -> torch.dtype:
        return self._dtype_anchor.dtype

    def forward(self, x: torch.Tensor, context: Optional[torch.Tensor] = None,
                logdet: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        return dequantize(x, dtype=self.dtype, logdet=logdet)

    def inverse(self, z: torch.Tensor, context: Optional[torch.Tensor] = None,
                logdet: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        return quantize(z, logdet=logdet)

    def extra_repr(self) -> str:
        return f"dtype={self.dtype}"


class Logit(FlowLayer):
    """Logit transform with alpha in [0, 0.5), elementwise over any shape (B, ...).

    forward(v) -> (y, logdet): v' = alpha + (1 - 2 alpha) v, y = log v' - log(1 - v'),
    logdet += sum(log(1 - 2 alpha) - log v' - log(1 - v')). inverse(y) -> (v, logdet):
    v = (sigmoid(y) - alpha) / (1 - 2 alpha), logdet negated. Context is ignored.
    """

    def __init__(self, alpha: float = 1e-6):
        super().__init__()
        self.alpha = check_alpha(alpha)

    def forward(self, x: torch.Tensor, context: Optional[torch.Tensor] = None,
                logdet: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        return logit(x, alpha=self.alpha, logdet=logdet)

    def inverse(self, z: torch.Tensor, context: Optional[torch.Tensor] = None,
                logdet: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        return logit(z, alpha=self.alpha, inverse=True, logdet=logdet)

    def extra_repr(self) -> str:
        return f"alpha={self.alpha:g}"


class DequantizeLogit(Dequantize):
    """Dequantize followed by Logit(alpha), fused into one kernel each way (flowkern.ops.dequantize_logit).

    forward(x) -> (y, logdet): integer pixels x (B, ...) (uint8 preferred) to logits y of the
    layer's dtype, v = (x + u) / 256, y = logit(alpha + (1 - 2 alpha) v), with fresh counter-based
    noise u each call, its seed drawn from torch's global RNG (seed it with torch.manual_seed);
    logdet += -D log 256 + the logit's log-det. inverse(y) -> (x, logdet): pixel values
    clamp(floor(256 v), 0, 255) in y's dtype (.to(torch.uint8) for an image), the negated
    log-det. Context is ignored.

    A Dequantize (Flow.bits_per_dim accepts a flow that starts with it); the output dtype follows
    module casts like Dequantize's.
    """

    def __init__(self, alpha: float = 1e-6, dtype: Optional[torch.dtype] = None):
        super().__init__(dtype)
        self.alpha = check_alpha(alpha)

    def forward(self, x: torch.Tensor, context: Optional[torch.Tensor] = None,
                logdet: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        return dequantize_logit(x, alpha=self.alpha, dtype=self.dtype, logdet=logdet)

    def inverse(self, z: torch.Tensor, context: Optional[torch.Tensor] = None,
                logdet: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        return dequantize_logit_inverse(z, alpha=self.alpha, logdet=logdet)

    def extra_repr(self) -> str:
        return f"alpha={self.alpha:g}, dtype={self.dtype}"


def bits_per_dim(log_prob: torch.Tensor, dims: int) -> torch.Tensor:
    """Per-sample bits/dim, -log_prob / (dims * ln 2), of a log-density on the pixel scale.

    log_prob: any shape, e.g. Flow.log_prob(x) of a flow that starts with Dequantize (the
    log-density of x + u over [0, 256)^D, in nats); dims: D, the number of pixel values per
    sample (e.g. 784 for MNIST, 3072 for CIFAR-10). Average the result over the data set (and
    the noise) for the figure papers report; 8 is a uniform model.
    """
    if not isinstance(log_prob, torch.Tensor):
        raise TypeError(f"log_prob must be a torch.Tensor, got {type(log_prob).__name__}")
    try:
        if isinstance(dims, bool):
            raise TypeError
        dims = operator.index(dims)
    except TypeError:
        raise TypeError(f"dims must be an int, got {type(dims).__name__}") from None
    if dims <= 0:
        raise ValueError(f"dims must be a positive int, got {dims}")
    return -log_prob / (dims * math.log(2.0))
