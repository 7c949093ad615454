"""Invertible layers built on flowkern's ops, and Flow, which composes them.

Every layer maps data -> latent with forward(x, context=None, logdet=None) -> (y, logdet) and
back with inverse(z, context=None, logdet=None) -> (x, logdet).
"""
from .coupling import MLP, AdditiveCoupling, AffineCoupling, ConvAffineCoupling, ConvNet, coupling_mask
from .flow import Flow, FlowLayer, StandardNormal
from .linear import Invertible1x1Conv, LinearLU, Permutation
from .norm import ActNorm, BatchNormFlow
from .preprocess import Dequantize, DequantizeLogit, Logit, bits_per_dim
from .reshape import Split, Squeeze, Unsqueeze
from .spline import SplineCoupling

__all__ = [
    "ActNorm", "AdditiveCoupling", "BatchNormFlow", "AffineCoupling", "ConvAffineCoupling", "ConvNet", "Dequantize",
    "DequantizeLogit", "Flow", "FlowLayer",
    "Invertible1x1Conv", "LinearLU", "Logit", "MLP", "Permutation", "SplineCoupling", "Split", "Squeeze", "StandardNormal",
    "Unsqueeze", "bits_per_dim", "coupling_mask",
]
