"""RealNVP for flattened images: a stack of couplings with alternating masks."""
from __future__ import annotations

from ..nn import AffineCoupling, Flow, StandardNormal

COUPLINGS = ("affine",)


class RealNVP(Flow):
    """`layers` couplings on (B, features) with MLP conditioners of width `hidden`; layer i
    transforms the odd features when i is even and the even ones when i is odd.

    coupling="affine" uses AffineCoupling(scale=scale); context > 0 makes it conditional.
    """

    def __init__(self, features: int = 784, layers: int = 8, hidden: int = 512, coupling: str = "affine",
                 *, scale: str = "sigmoid", context: int = 0):
        if coupling not in COUPLINGS:
            raise ValueError(f"coupling must be one of {COUPLINGS}, got {coupling!r}")
        if not isinstance(layers, int) or layers < 1:
            raise ValueError(f"layers must be a positive int, got {layers!r}")
        blocks = [AffineCoupling(features, hidden, mask="alternate", flip=i % 2 == 1, scale=scale, context=context)
                  for i in range(layers)]
        super().__init__(blocks, StandardNormal(features))
        self.features = features
