"""RealNVP for flattened images: a stack of couplings with alternating masks."""
from __future__ import annotations

from typing import Optional, Union

import torch

from ..nn import AdditiveCoupling, AffineCoupling, Flow, Permutation, SplineCoupling, StandardNormal
from ._common import NORMS, norm_layer, preprocess_layers

COUPLINGS = ("affine", "additive", "spline")


class RealNVP(Flow):
    """`layers` couplings on (B, features) with MLP conditioners of width `hidden`; layer i
    transforms the odd features when i is even and the even ones when i is odd.

    The alternating masks are laid out as two halves: after the preprocessing a fixed
    Permutation("evens_first") puts the even features first, the couplings split each row into
    its two contiguous halves (views, no gather), and a last Permutation restores the order, so
    forward() returns z in the input's feature order. The model is the same function as
    couplings with interleaved masks (the same features feed the same conditioner inputs, in the
    same order); ActNorm/BatchNorm parameters are indexed in the permuted order.

    Args:
        coupling: "affine" (AffineCoupling with `scale`), "additive" (NICE, volume preserving) or
            "spline" (SplineCoupling with `bins` and `bound`: Neural Spline Flows).
        norm: None, "actnorm" or "batchnorm": a normalisation layer before each coupling.
        context: width of a conditioning vector (0: unconditional).
        dequantize: True or "uniform" starts with the fused DequantizeLogit(alpha) layer, so the
            flow takes 8-bit pixels (integer tensors) and bits_per_dim works; "variational" starts
            with VariationalDequantize (Flow++'s learned noise; bits_per_dim is then its tighter
            bound); False or "none": the flow takes real-valued data.
        conditioner: the couplings' conditioner networks: "mlp" (default) or "residual"
            (flowkern.nn.ResidualNet), `hidden` wide, or a factory f(in_features, out_features)
            -> nn.Module called once per coupling (see flowkern.nn.nets).
        embedding: a module the context goes through first (Flow's embedding); `context` is
            then its output width.
        memory_saving: backprop without keeping activations, rebuilding them with the layers'
            exact inverses; an int k also keeps every k-th layer's input, bounding the rebuilt
            inputs' rounding drift (see Flow and flowkern.nn.memory).
    """

    def __init__(self, features: int = 784, layers: int = 8, hidden: int = 512, coupling: str = "affine",
                 *, norm: Optional[str] = None, scale: str = "tanh", context: int = 0,
                 dequantize: Union[bool, str] = False, alpha: float = 1e-6, bins: int = 8, bound: float = 3.0,
                 memory_saving: Union[bool, int] = False, conditioner="mlp", embedding=None):
        if isinstance(conditioner, torch.nn.Module):
            raise TypeError("conditioner: a model builds one network per coupling; pass 'mlp', 'residual' or a "
                            "factory f(in_features, out_features) -> nn.Module, not a module")
        if coupling not in COUPLINGS:
            raise ValueError(f"coupling must be one of {COUPLINGS}, got {coupling!r}")
        if norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
        if not isinstance(layers, int) or layers < 1:
            raise ValueError(f"layers must be a positive int, got {layers!r}")
        if not isinstance(features, int) or features < 2:
            raise ValueError(f"features must be an int >= 2, got {features!r}")
        blocks = preprocess_layers(dequantize, alpha, features)
        to_halves = Permutation(features, "evens_first")
        blocks.append(to_halves)
        evens = (features + 1) // 2
        # In the permuted order the odd features are the second half.
        odd_half = torch.arange(features) >= evens
        for i in range(layers):
            if norm is not None:
                blocks.append(norm_layer(norm, features))
            mask = odd_half if i % 2 == 0 else ~odd_half
            net = {"context": context, "conditioner": conditioner}
            if coupling == "affine":
                blocks.append(AffineCoupling(features, hidden, mask=mask, scale=scale, **net))
            elif coupling == "spline":
                blocks.append(SplineCoupling(features, hidden, bins=bins, bound=bound, mask=mask, **net))
            else:
                blocks.append(AdditiveCoupling(features, hidden, mask=mask, **net))
        blocks.append(Permutation(features, to_halves.inverse_permutation))
        super().__init__(blocks, StandardNormal(features), memory_saving=memory_saving, embedding=embedding)
        self.features = features

    @property
    def couplings(self) -> list:
        """The coupling layers, in order."""
        return [layer for layer in self.layers if isinstance(layer, (AffineCoupling, AdditiveCoupling, SplineCoupling))]
