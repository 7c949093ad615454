"""Invertible layers built on flowkern's ops, and Flow, which composes them.

Every layer maps data -> latent with forward(x, context=None, logdet=None) -> (y, logdet) and
back with inverse(z, context=None, logdet=None) -> (x, logdet).
"""
from .autoregressive import MADE, MaskedAutoregressiveAffine, MaskedAutoregressiveSpline
from .coupling import MLP, AdditiveCoupling, AffineCoupling, ConvAffineCoupling, ConvNet, coupling_mask
from .flow import Flow, FlowLayer, StandardNormal
from .linear import Invertible1x1Conv, LinearLU, Permutation
from .memory import MemorySaving, memory_saving_forward
from .nets import ResidualNet, zero_last_layer
from .norm import ActNorm, BatchNormFlow
from .preprocess import Dequantize, DequantizeLogit, Logit, bits_per_dim
from .reshape import Split, Squeeze, Unsqueeze
from .spline import SplineCoupling
from .vardeq import VariationalDequantize, importance_log_prob

__all__ = [
    "ActNorm", "AdditiveCoupling", "BatchNormFlow", "AffineCoupling", "ConvAffineCoupling", "ConvNet", "Dequantize",
    "DequantizeLogit", "Flow", "FlowLayer",
    "Invertible1x1Conv", "LinearLU", "Logit", "MADE", "MLP", "MaskedAutoregressiveAffine", "MaskedAutoregressiveSpline", "MemorySaving", "Permutation", "ResidualNet", "SplineCoupling", "Split", "Squeeze", "StandardNormal",
    "Unsqueeze", "VariationalDequantize", "bits_per_dim", "coupling_mask", "importance_log_prob", "memory_saving_forward",
    "zero_last_layer",
]
