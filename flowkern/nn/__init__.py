"""Invertible layers built on flowkern's fused ops, and Flow, which composes them."""
from .coupling import MLP, AdditiveCoupling, AffineCoupling, ConvAffineCoupling, ConvNet, coupling_mask
from .flow import Flow, FlowLayer, StandardNormal

__all__ = ["AdditiveCoupling", "AffineCoupling", "ConvAffineCoupling", "ConvNet", "Flow", "FlowLayer", "MLP", "StandardNormal",
           "coupling_mask"]
