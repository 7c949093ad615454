"""RealNVP for flattened images: a stack of couplings with alternating masks."""
from __future__ import annotations

from typing import Optional

from ..nn import AdditiveCoupling, AffineCoupling, Flow, SplineCoupling, StandardNormal
from ._common import NORMS, norm_layer, preprocess_layers

COUPLINGS = ("affine", "additive", "spline")


class RealNVP(Flow):
    """`layers` couplings on (B, features) with MLP conditioners of width `hidden`; layer i
    transforms the odd features when i is even and the even ones when i is odd.

    Args:
        coupling: "affine" (AffineCoupling with `scale`), "additive" (NICE, volume preserving) or
            "spline" (SplineCoupling with `bins` and `bound`: Neural Spline Flows).
        norm: None, "actnorm" or "batchnorm": a normalisation layer before each coupling.
        context: width of a conditioning vector (0: unconditional).
        dequantize: start with Dequantize + Logit(alpha), so the flow takes 8-bit pixels
            (integer tensors) and bits_per_dim works; otherwise it takes real-valued data.
    """

    def __init__(self, features: int = 784, layers: int = 8, hidden: int = 512, coupling: str = "affine",
                 *, norm: Optional[str] = None, scale: str = "sigmoid", context: int = 0,
                 dequantize: bool = False, alpha: float = 1e-6, bins: int = 8, bound: float = 3.0):
        if coupling not in COUPLINGS:
            raise ValueError(f"coupling must be one of {COUPLINGS}, got {coupling!r}")
        if norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
        if not isinstance(layers, int) or layers < 1:
            raise ValueError(f"layers must be a positive int, got {layers!r}")
        blocks = preprocess_layers(dequantize, alpha)
        for i in range(layers):
            if norm is not None:
                blocks.append(norm_layer(norm, features))
            if coupling == "affine":
                blocks.append(AffineCoupling(features, hidden, mask="alternate", flip=i % 2 == 1, scale=scale,
                                             context=context))
            elif coupling == "spline":
                blocks.append(SplineCoupling(features, hidden, bins=bins, bound=bound, mask="alternate",
                                             context=context, flip=i % 2 == 1))
            else:
                blocks.append(AdditiveCoupling(features, hidden, mask="alternate", flip=i % 2 == 1, context=context))
        super().__init__(blocks, StandardNormal(features))
        self.features = features
